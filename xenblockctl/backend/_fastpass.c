/*
 * The engine's optional native fast path (issue 20): one ring pass's simple requests, end to end.
 *
 * Python (backend/dataplane.py) copies a pass's request slots out of shared memory once
 * (ring.take_slots) and hands that private copy here. `serve` takes the longest prefix of the
 * remaining slots that are *simple* — READ or WRITE with direct or indirect segments, every rule
 * of requests.validate_slot satisfied, every page (indirect descriptor pages included) already in
 * the persistent grant cache — and runs
 * their I/O (preadv2/pwritev2 with the GIL released). It answers nothing itself: it returns the
 * (id, operation, RSP_OKAY) of each request whose I/O moved every byte, and the index of the first
 * slot it did not finish. Python then serves that slot through its own path (which validates,
 * logs and answers every error, and runs or hands off the I/O as it always did) and calls here
 * again for the rest. So anything unusual — another operation, an invalid
 * request, a page not cached, a read that would block, a short transfer, any errno — costs one
 * extra attempt at most and is handled by the one complete implementation, never by a second one.
 *
 * Hostile input: every byte decoded here comes from the private copy (never shared memory), every
 * guest number is range-checked before use, and arithmetic is done in 64 bits on values bounded
 * first (nr_segments <= 11 or <= the advertised indirect maximum <= 4096, sectors <= 8 per
 * segment, sector <= device sectors < 2**55). Indirect descriptor pages are copied once into our
 * own memory and only the copy is decoded; if we then stop (a page not cached, a read that would
 * block), Python reads them again for itself and acts on its copy only — ours decided nothing but
 * to stop. Pages
 * come from the cache's own dict (GrantCache.native_pages: gref -> a view of that page); a buffer
 * export is held on each page's view for the whole call (for the engine's Pages dict: for as long
 * as the page is indexed, see below), so the mapping cannot be closed under the I/O even with the
 * GIL released (and the cache only ever evicts on the ring thread, which is in here). `check` exposes the decoder alone: the
 * tests compare it with validate_slot on arbitrary bytes. `respond` writes a run of answers that
 * are next in ring order into the ring, as ring.py's respond_all would (see fp_respond).
 */
#include "ring_loop.h"
#include "write_gate.h"

#include <sys/epoll.h>
#include <sys/syscall.h>

#include <sys/uio.h>

#define SEGS_PER_PAGE (PAGE / SEG_SIZE)
#define IND_PAGES_MAX 8     /* BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST */
#define OP_INDIRECT 6
#define IOVS_MAX 1024  /* IOV_MAX on Linux: more and preadv says EINVAL (Python's path takes it) */

/* One request as decoded from the copy. Direct requests use the inline arrays; an indirect one's
 * segments live in `heap` (gref/pofs/plen point into it), freed by req_free. */
struct req {
    uint64_t id;
    uint64_t offset; /* bytes on the device */
    uint64_t length;
    uint8_t op;      /* READ or WRITE (an indirect request's indirect_op: the answer's operation) */
    unsigned nseg;
    unsigned nind;   /* indirect pages read (their refs count as used, as acquire() notes them) */
    uint32_t *gref;
    uint16_t *pofs;  /* byte offset in the page */
    uint16_t *plen;  /* bytes in the page */
    uint32_t ind_gref[IND_PAGES_MAX];
    uint32_t gref_in[SEGS_MAX];
    uint16_t pofs_in[SEGS_MAX];
    uint16_t plen_in[SEGS_MAX];
    void *heap;
};

/* A request's own memory comes from the raw allocator: loop() decodes and releases requests
 * without the GIL (PyMem_Malloc's pymalloc needs it). */
static void req_free(struct req *r)
{
    PyMem_RawFree(r->heap);
    r->heap = NULL;
}

/* blkif_slot.h's plan_segments into r (its gref/pofs/plen arrays set). 1: valid. */
static int plan(const unsigned char *desc, unsigned nseg, uint64_t sector, const struct limits *lim,
                struct req *r)
{
    const struct segments seg = {r->gref, r->pofs, r->plen};
    r->nseg = nseg;
    return plan_segments(desc, nseg, sector, lim, &seg, &r->offset, &r->length);
}

/* requests._check_segments for a READ/WRITE with direct segments (slot: entry_size bytes of the
 * private copy). 1: valid; 0: not ours (another operation) or refused (Python refuses it again,
 * with its reason). */
static int decode_direct(const unsigned char *slot, const struct limits *lim, struct req *r)
{
    unsigned nseg = direct_nseg(slot, lim);
    if (nseg == 0)
        return 0;
    r->gref = r->gref_in;
    r->pofs = r->pofs_in;
    r->plen = r->plen_in;
    r->nind = 0;
    r->heap = NULL;
    r->op = slot[0];
    r->id = get_u64(slot + lim->id_offset);
    return plan(slot + lim->id_offset + 16, nseg, get_u64(slot + lim->id_offset + 8), lim, r);
}

static int page_of(PyObject *entries, uint32_t gref, int writable, int nogil, Py_buffer *view, char **page);

/* requests._check_indirect, its descriptor pages read from the cache: they are copied once into
 * our own memory and only that copy is decoded (the guest may change its pages meanwhile).
 * 1: valid (r->heap holds the segments); 0: not ours, or refused, or (nogil) a descriptor page the
 * C index does not hold yet. */
static int decode_indirect(const unsigned char *slot, const struct limits *lim, PyObject *entries,
                           int nogil, struct req *r)
{
    uint8_t iop = slot[1];
    unsigned nseg = get_u16(slot + 2);
    r->heap = NULL;
    if (slot[0] != OP_INDIRECT || lim->max_indirect <= 0 || entries == NULL)
        return 0;
    if (iop != OP_READ && iop != OP_WRITE)
        return 0;
    if (nseg < 1 || nseg > (unsigned)lim->max_indirect)
        return 0;
    if (lim->read_only && iop == OP_WRITE)
        return 0;
    unsigned pages = (nseg + SEGS_PER_PAGE - 1) / SEGS_PER_PAGE; /* <= 8: max_indirect <= 4096 */
    size_t dbytes = (size_t)nseg * SEG_SIZE;
    /* one block: the descriptors' copy, then gref[nseg], pofs[nseg], plen[nseg] */
    char *heap = PyMem_RawMalloc(dbytes + (size_t)nseg * (4 + 2 + 2));
    if (heap == NULL)
        return 0;
    r->heap = heap;
    const unsigned char *grefs = slot + lim->id_offset + 20;
    for (unsigned p = 0; p < pages; p++) {
        Py_buffer view;
        char *page = NULL;
        uint32_t g = get_u32(grefs + 4 * p);
        int got = page_of(entries, g, 0, nogil, &view, &page);
        if (got <= 0) {
            if (got < 0) /* only with the GIL: nogil lookups never touch the interpreter */
                PyErr_Clear();
            req_free(r);
            return 0;
        }
        size_t n = dbytes - (size_t)p * PAGE < PAGE ? dbytes - (size_t)p * PAGE : PAGE;
        memcpy(heap + (size_t)p * PAGE, page, n);
        PyBuffer_Release(&view);
        r->ind_gref[p] = g;
    }
    r->nind = pages;
    r->gref = (uint32_t *)(heap + dbytes); /* dbytes is a multiple of 8: aligned */
    r->pofs = (uint16_t *)(heap + dbytes + (size_t)nseg * 4);
    r->plen = (uint16_t *)(heap + dbytes + (size_t)nseg * 6);
    r->op = iop;
    r->id = get_u64(slot + lim->id_offset);
    if (!plan((const unsigned char *)heap, nseg, get_u64(slot + lim->id_offset + 8), lim, r)) {
        req_free(r);
        return 0;
    }
    return 1;
}

/* nogil: the caller does not hold the GIL; pages only from a Pages' C index (see page_of). */
static int decode(const unsigned char *slot, const struct limits *lim, PyObject *entries, int nogil,
                  struct req *r)
{
    if (slot[0] == OP_INDIRECT)
        return decode_indirect(slot, lim, entries, nogil, r);
    return decode_direct(slot, lim, r);
}

/* check(slot, offset, id_offset, sectors, size_bytes, logical_block_size, read_only,
 *       max_indirect_segments, entries)
 *   -> None | (id, op, byte_offset, length, ((gref, page_offset, page_length), ...)) */
static PyObject *fp_check(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer slot;
    Py_ssize_t offset, id_offset, lbs, max_indirect;
    PyObject *sectors_o, *size_o, *entries;
    int read_only;
    if (!PyArg_ParseTuple(args, "y*nnOOnpnO!", &slot, &offset, &id_offset, &sectors_o, &size_o, &lbs,
                          &read_only, &max_indirect, &PyDict_Type, &entries))
        return NULL;
    struct limits lim;
    struct req r;
    PyObject *out = NULL;
    r.heap = NULL;
    if (parse_limits(sectors_o, size_o, lbs, read_only, id_offset, max_indirect, &lim) < 0)
        goto done;
    if (entry_fits(&slot, offset, id_offset) < 0)
        goto done;
    if (!decode((const unsigned char *)slot.buf + offset, &lim, entries, 0, &r)) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    const struct segments seg = {r.gref, r.pofs, r.plen};
    out = decoded_value(r.id, r.op, r.offset, r.length, r.nseg, &seg);
done:
    req_free(&r);
    PyBuffer_Release(&slot);
    return out;
}

/* --- Pages: the cache's dict of page views, indexed for C --------------------------------------
 *
 * A 1 MiB request names 256 pages; looking each up in the dict (a PyLong key, a dict probe, a
 * buffer export and its release: ~42 ns) cost ~11 us per request. `Pages` is a dict subclass
 * (GrantCache.index_pages puts its ref -> page view dict into one) that also keeps, for each
 * page the C pass has looked up, an open-addressing table entry gref -> a buffer export held on
 * that page's view: later lookups are one probe, no Python object. The export stays held as long
 * as the entry: the cache's own removal (`pop`, `del`, assignment over the ref, `clear`, ...,
 * all overridden below) drops the entry and its export first, so a view the index still points
 * into cannot be released (memoryview.release() would raise BufferError) and its page cannot be
 * unmapped under us. Methods that change many items at once clear the whole index. */
struct islot {
    uint32_t gref;
    int readonly;   /* buf->readonly and buf->buf, copied: a lookup reads the table alone, not */
    char *page;     /* 256 separately allocated Py_buffers per 1 MiB request */
    Py_buffer *buf; /* NULL: empty */
};

typedef struct {
    PyDictObject dict; /* a dict, for Python and for serve()'s "O!" check */
    struct islot *slots;
    unsigned bits;     /* capacity 1 << bits (0: no table yet) */
    Py_ssize_t used;
} PagesObject;

static PyTypeObject PagesType;

static inline size_t index_home(const PagesObject *t, uint32_t gref)
{
    return (uint32_t)(gref * 2654435761u) >> (32 - t->bits); /* Fibonacci hashing */
}

static inline struct islot *index_find(const PagesObject *t, uint32_t gref)
{
    if (t->used == 0)
        return NULL;
    size_t mask = ((size_t)1 << t->bits) - 1;
    for (size_t i = index_home(t, gref);; i = (i + 1) & mask) {
        struct islot *s = &t->slots[i];
        if (s->buf == NULL)
            return NULL;
        if (s->gref == gref)
            return s;
    }
}

/* The first empty slot from gref's home on (there is one: index_reserve keeps the load <= 1/2). */
static struct islot *index_free_slot(const PagesObject *t, uint32_t gref)
{
    size_t mask = ((size_t)1 << t->bits) - 1;
    size_t i = index_home(t, gref);
    while (t->slots[i].buf != NULL)
        i = (i + 1) & mask;
    return &t->slots[i];
}

/* Release an entry's export and empty its slot. */
static void slot_drop(struct islot *s)
{
    PyBuffer_Release(s->buf);
    PyMem_Free(s->buf);
    s->buf = NULL;
}

/* Drop slot i's entry (its export released) and shift the entries after it back (linear probing
 * without tombstones: every entry stays reachable from its home slot). */
static void index_delete_at(PagesObject *t, size_t i)
{
    size_t mask = ((size_t)1 << t->bits) - 1;
    slot_drop(&t->slots[i]);
    t->used--;
    for (size_t j = (i + 1) & mask; t->slots[j].buf != NULL; j = (j + 1) & mask) {
        size_t k = index_home(t, t->slots[j].gref);
        /* j stays where it is if its home lies cyclically in (i, j] */
        int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            t->slots[j].buf = NULL;
            i = j;
        }
    }
}

static void index_discard(PagesObject *t, PyObject *key)
{
    if (t->used == 0 || !PyLong_Check(key))
        return;
    unsigned long long v = PyLong_AsUnsignedLongLong(key);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or huge: never a ref we indexed */
        return;
    }
    if (v > UINT32_MAX)
        return;
    struct islot *s = index_find(t, (uint32_t)v);
    if (s != NULL)
        index_delete_at(t, (size_t)(s - t->slots));
}

static void index_clear(PagesObject *t)
{
    size_t cap = t->bits ? (size_t)1 << t->bits : 0;
    for (size_t i = 0; i < cap; i++) {
        if (t->slots[i].buf != NULL)
            slot_drop(&t->slots[i]);
    }
    t->used = 0;
}

/* Room for one more entry (load factor <= 1/2). -1: out of memory (set). */
static int index_reserve(PagesObject *t)
{
    if (t->bits && (size_t)(t->used + 1) * 2 <= (size_t)1 << t->bits)
        return 0;
    unsigned bits = t->bits ? t->bits + 1 : 6;
    if (bits > 30) {
        PyErr_NoMemory();
        return -1;
    }
    struct islot *slots = PyMem_Calloc((size_t)1 << bits, sizeof *slots);
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    struct islot *old = t->slots;
    size_t old_cap = t->bits ? (size_t)1 << t->bits : 0;
    t->slots = slots;
    t->bits = bits;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].buf != NULL)
            *index_free_slot(t, old[i].gref) = old[i];
    }
    PyMem_Free(old);
    return 0;
}

/* One page from the dict itself: a buffer export on its view in *view (released by the caller).
 * 1: found; 0: not there or unusable; -1: interpreter error (set). */
static int dict_page(PyObject *entries, uint32_t gref, int flags, Py_buffer *view)
{
    PyObject *key = PyLong_FromUnsignedLong(gref);
    if (key == NULL)
        return -1;
    PyObject *pageview = PyDict_GetItemWithError(entries, key); /* borrowed */
    Py_DECREF(key);
    if (pageview == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (PyObject_GetBuffer(pageview, view, flags) < 0) {
        PyErr_Clear(); /* an odd value is not ours to judge: Python's path takes the request */
        return 0;
    }
    if (view->len < PAGE) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* Index a page the C table does not hold yet: look it up in the dict, keep a buffer export on its
 * view in a new table entry. The entry, NULL if the dict has no usable page; -1 in *err for an
 * interpreter error (out of memory, set). */
static struct islot *index_insert(PagesObject *t, uint32_t gref, int *err)
{
    Py_buffer *held = PyMem_Malloc(sizeof *held);
    if (held == NULL) {
        PyErr_NoMemory();
        *err = -1;
        return NULL;
    }
    int got = dict_page((PyObject *)t, gref, PyBUF_SIMPLE, held); /* readonly says what it allows */
    if (got <= 0 || index_reserve(t) < 0) {
        if (got > 0) {
            PyBuffer_Release(held);
            got = -1;
        }
        PyMem_Free(held);
        *err = got;
        return NULL;
    }
    struct islot *s = index_free_slot(t, gref);
    s->gref = gref;
    s->readonly = held->readonly;
    s->page = held->buf;
    s->buf = held;
    t->used++;
    return s;
}

/* A page of a Pages and its address, no Python object touched once the page is indexed (the hot
 * path: a 1 MiB request names 256 of them). The index holds the page's export for as long as the
 * entry, so the caller holds nothing and releases nothing. 1: found (*page set); 0: not there,
 * unusable, or read-only where `writable` is asked; -1: interpreter error (set).
 * nogil (loop()'s first try, the GIL not held): the C table alone, read only; a page it does not
 * hold is 0 (the caller tries again with the GIL, which looks it up in the dict and indexes it).
 * Reading the table without the GIL is safe because only the ring thread changes it — the cache
 * removes pages only in acquire() and close() (grantcache.py), both on or after the ring thread,
 * which is the thread in here — and it removes a page's entry before the page can go. */
static inline int indexed_page(PagesObject *t, uint32_t gref, int writable, int nogil, char **page)
{
    struct islot *s = index_find(t, gref);
    if (s == NULL) {
        if (nogil)
            return 0;
        int err = 0;
        s = index_insert(t, gref, &err);
        if (s == NULL)
            return err;
    }
    if (writable && s->readonly)
        return 0;
    *page = s->page;
    return 1;
}

/* One page of the cache and its address. `entries` is GrantCache.native_pages(): ref -> a view of
 * exactly that page; a plain dict (check(), tests) or a Pages. From a dict, *view holds a buffer
 * export the caller releases; from a Pages the index holds the export and *view holds none (its
 * release is a no-op). 0 if the cache has no such page or its view is unusable (Python's path then
 * maps it or refuses it); -1 only for an interpreter error (out of memory), left set for the
 * caller. */
static int page_of(PyObject *entries, uint32_t gref, int writable, int nogil, Py_buffer *view, char **page)
{
    view->obj = NULL; /* PyBuffer_Release does nothing */
    if (!Py_IS_TYPE(entries, &PagesType)) {
        if (nogil)
            return 0; /* a plain dict is read with the GIL only */
        int got = dict_page(entries, gref, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE, view);
        if (got > 0)
            *page = view->buf;
        return got;
    }
    return indexed_page((PagesObject *)entries, gref, writable, nogil, page);
}

/* A request ready for its I/O: its iovecs and, for pages from a plain dict, their buffer exports
 * (held until the answers are built; a Pages holds its own, so none are taken per page). A direct
 * request's iovecs are inline; an indirect one's, and a dict's exports, live in `heap`. Small on
 * purpose: serve() allocates one per slot of the batch. */
struct prepared {
    struct req r;
    int mode;
    int gated; /* a MODE_GATED write its device's gate let in: run_io watches it for a sleep */
    int iovcnt;
    unsigned nviews;
    Py_buffer *views;
    struct iovec *iov;
    struct iovec iov_in[SEGS_MAX];
    void *heap;
};

static void prepared_release(struct prepared *p)
{
    while (p->nviews > 0)
        PyBuffer_Release(&p->views[--p->nviews]);
    PyMem_RawFree(p->heap);
    p->heap = NULL;
    req_free(&p->r);
}

/* The pages of p's segments, as iovecs (neighbouring bytes of one mapping merged). 1: ready.
 * A 1 MiB request runs this loop 256 times, so it keeps the iovec being built in locals (stores
 * through p->iov could alias p->iovcnt, which the compiler then reloaded for every segment).
 * Capacity: at most one iovec per segment, and p->iov holds nseg of them (iov_in for direct
 * requests, the heap for indirect ones). */
static int prepare_pages(struct prepared *p, PyObject *entries, int nogil)
{
    struct req *r = &p->r;
    int indexed = Py_IS_TYPE(entries, &PagesType);
    p->nviews = 0;
    p->iovcnt = 0;
    p->heap = NULL;
    p->views = NULL;
    p->iov = p->iov_in;
    size_t niov = r->nseg > SEGS_MAX ? r->nseg : 0;
    size_t nviews = indexed ? 0 : r->nseg; /* a buffer export per page only from a plain dict */
    if (nogil && !indexed)
        return 0;
    if (niov + nviews > 0) {
        p->heap = PyMem_RawMalloc(niov * sizeof(struct iovec) + nviews * sizeof(Py_buffer));
        if (p->heap == NULL)
            return 0;
        if (niov)
            p->iov = p->heap;
        p->views = (Py_buffer *)((struct iovec *)p->heap + niov);
    }
    int writable = r->op == OP_READ; /* a guest READ: the device's data goes into its page */
    struct iovec *iov = p->iov;
    int n = 0;          /* iovecs built */
    char *end = NULL;   /* where the last one ends (n > 0) */
    for (unsigned s = 0; s < r->nseg; s++) {
        char *page = NULL;
        int got = indexed ? indexed_page((PagesObject *)entries, r->gref[s], writable, nogil, &page)
                          : page_of(entries, r->gref[s], writable, 0, &p->views[p->nviews], &page);
        if (got <= 0) {
            if (got < 0)
                PyErr_Clear(); /* out of memory for a key: Python's path takes the request */
            p->iovcnt = n;
            return 0;
        }
        if (!indexed)
            p->nviews++;
        char *at = page + r->pofs[s];
        size_t len = r->plen[s];
        if (n > 0 && at == end) { /* the next bytes of the same mapping: the last iovec grows */
            iov[n - 1].iov_len += len;
        } else {
            iov[n].iov_base = at;
            iov[n].iov_len = len;
            n++;
        }
        end = at + len;
    }
    p->iovcnt = n;
    return n <= IOVS_MAX;
}

/* Issue 20 (xenwrite): a run of requests of one kind (READ or WRITE, same mode) that follow each
 * other on the device (each starts where the one before it ends) goes to the kernel as ONE
 * preadv2/pwritev2 of all their iovecs. Linux blkfront cuts a guest's 1 MiB write into 128 KiB
 * requests; written one by one with O_DIRECT on a loop device each waits for the loop worker on its
 * own (measured in dom0 on the Xen lane: 39 MiB/s, against 199 MiB/s for the same bytes in 1 MiB
 * pwritevs, bench/README.md), while kernel blkback submits a ring's bios without waiting for each.
 * A request counts as done only when the bytes moved cover it in full; the first one not covered
 * (an error, a short transfer, a NOWAIT read reaching an uncached page) and everything after it go
 * back to Python as any unfinished request does, which runs it again on its own and reports.
 * Nothing is reordered that the guest ordered: the requests of a run do not overlap (each starts at
 * the previous one's end), and a FLUSH or BARRIER is never in a run (serve stops at any other
 * operation), so it still waits for every earlier write. */
#define MERGE_MAX_BYTES (4u << 20) /* one syscall's share of a pass; the block layer splits further */
static int mergeable(const struct prepared *a, uint64_t end, const struct prepared *b, int iovcnt,
                     uint64_t bytes)
{
    return b->r.op == a->r.op && b->mode == a->mode && b->gated == a->gated && b->r.offset == end &&
           iovcnt + b->iovcnt <= IOVS_MAX && bytes + b->r.length <= MERGE_MAX_BYTES;
}

/* reqs[0..nreq) in ring order, the GIL released; how many finished in full. A gated write (a
 * group's, let in by its device's gate `wg`) that slept in the kernel holds the device's later
 * writes out of the group (write_gate.h: the thread's voluntary switches, counted before the first
 * gated write of the call and again after any that took SLEPT_CHECK_NS or more). */
static Py_ssize_t run_io(struct prepared *reqs, Py_ssize_t nreq, int fd, int wfd, int64_t *wg)
{
    struct iovec iov[IOVS_MAX];
    Py_ssize_t done = 0;
    long switches = -1; /* not counted yet */
    while (done < nreq) {
        struct prepared *p = &reqs[done];
        int flags = p->mode == MODE_NOWAIT ? RWF_NOWAIT : 0;
        Py_ssize_t last = done + 1;
        int iovcnt = p->iovcnt;
        uint64_t bytes = p->r.length;
        while (last < nreq && mergeable(p, p->r.offset + bytes, &reqs[last], iovcnt, bytes)) {
            iovcnt += reqs[last].iovcnt;
            bytes += reqs[last].r.length;
            last++;
        }
        const struct iovec *v = p->iov;
        if (last > done + 1) {
            int at = 0;
            for (Py_ssize_t k = done; k < last; k++) {
                memcpy(&iov[at], reqs[k].iov, (size_t)reqs[k].iovcnt * sizeof *iov);
                at += reqs[k].iovcnt;
            }
            v = iov;
        }
        int64_t t0 = 0;
        if (p->gated && wg != NULL) {
            if (switches < 0)
                switches = gate_switches();
            t0 = wg_now();
        }
        ssize_t n = p->r.op == OP_READ ? preadv2(fd, v, iovcnt, (off_t)p->r.offset, flags)
                                       : pwritev2(wfd, v, iovcnt, (off_t)p->r.offset, flags);
        if (t0 && wg_now() - t0 >= SLEPT_CHECK_NS) {
            long now = gate_switches();
            if (now != switches)
                gate_slept(wg);
            switches = now;
        }
        if (n < 0)
            break; /* Python runs it again its own way, and reports what it finds */
        uint64_t covered = 0;
        while (done < last && covered + reqs[done].r.length <= (uint64_t)n)
            covered += reqs[done++].r.length;
        if (done < last)
            break; /* short: the first request not covered is Python's, as above */
    }
    return done;
}

/* The longest prefix of slots [start, count) of the copy `data` that can run: each decoded, its
 * mode resolved and its pages found, into reqs[0..n) (n returned; prepared_release each after its
 * I/O). With `cut` > 0 no request is added once the run holds `cut` bytes (*run_bytes, in and
 * out: a run prepared in two calls counts from the first) and slots are left: *cut_hit says so.
 * With the GIL held (serve(); the cache's dict, a miss indexed), or without it (`nogil`:
 * loop()'s first try, pages from a Pages' C index only: it stops at a page the index lacks, and
 * the caller goes on from that slot with the GIL). */
static Py_ssize_t prepare_run(const unsigned char *data, Py_ssize_t start, Py_ssize_t count, Py_ssize_t esize,
                              const struct limits *lim, PyObject *entries, const int modes[2], Py_ssize_t host_page,
                              Py_ssize_t cut, int *cut_hit, struct prepared *reqs, int nogil, uint64_t *run_bytes,
                              int64_t *wg, int *gate)
{
    Py_ssize_t nreq = 0;
    for (Py_ssize_t i = start; i < count; i++) {
        struct prepared *p = &reqs[nreq];
        if (!decode(data + i * esize, lim, entries, nogil, &p->r))
            break;
        p->nviews = 0; /* what prepared_release reads, should the request stop before its pages */
        p->heap = NULL;
        p->mode = resolve_mode(modes[p->r.op], p->r.offset, p->r.length, host_page);
        p->gated = 0;
        if (p->mode == MODE_GATED) { /* the gate is asked once a take (*gate: -1 until then) */
            if (*gate < 0)
                *gate = wg != NULL && gate_open(wg);
            p->mode = *gate ? MODE_BLOCK : MODE_STOP;
            p->gated = *gate;
        }
        if ((p->mode != MODE_NOWAIT && p->mode != MODE_BLOCK) || !prepare_pages(p, entries, nogil)) {
            prepared_release(p);
            break;
        }
        nreq++;
        *run_bytes += p->r.length;
        if (cut > 0 && *run_bytes >= (uint64_t)cut && i + 1 < count) {
            *cut_hit = 1;
            break;
        }
    }
    return nreq;
}

/* How many refs reqs[0..done) used, indirect pages included. */
static Py_ssize_t count_refs(const struct prepared *reqs, Py_ssize_t done)
{
    Py_ssize_t nrefs = 0;
    for (Py_ssize_t k = 0; k < done; k++)
        nrefs += reqs[k].r.nind + reqs[k].r.nseg;
    return nrefs;
}

/* The refs reqs[0..done) used into w, in ring order, each request's indirect pages before its
 * segments (as acquire() notes them); no GIL needed. */
static void copy_refs(const struct prepared *reqs, Py_ssize_t done, uint32_t *w)
{
    for (Py_ssize_t k = 0; k < done; k++) {
        const struct req *r = &reqs[k].r;
        memcpy(w, r->ind_gref, r->nind * sizeof(uint32_t));
        w += r->nind;
        memcpy(w, r->gref, r->nseg * sizeof(uint32_t));
        w += r->nseg;
    }
}

/* The refs reqs[0..done) used as bytes of uint32 (for GrantCache.note_used); NULL with a Python
 * error. */
static PyObject *used_refs(const struct prepared *reqs, Py_ssize_t done)
{
    PyObject *refs = PyBytes_FromStringAndSize(NULL, count_refs(reqs, done) * (Py_ssize_t)sizeof(uint32_t));
    if (refs != NULL)
        copy_refs(reqs, done, (uint32_t *)PyBytes_AS_STRING(refs));
    return refs;
}

/* serve(data, start, count, id_offset, sectors, size_bytes, logical_block_size, read_only,
 *       max_indirect_segments, fd, write_fd, read_mode, write_mode, host_page, entries)
 * write_fd: where WRITEs go (io.Executor.write_fd: an O_DIRECT fd on the device, or fd itself); a
 * direct write the kernel refuses (EINVAL: alignment) stops here and Python writes it buffered
 *   -> (answers: list[(id, op, 0)], next_index, refs: bytes of the served requests' uint32 refs,
 *       indirect pages included)
 * An optional 16th argument, cut (bytes, > 0), ends the run early: no request is added once the
 * run holds cut bytes (issue 20, the QD-4 turnaround: the data plane answers each cut run before
 * it copies the next, so the frontend refills while it copies). Then a 4th item says whether the
 * run ended at that limit (True: slot next_index is simply the next run's, not one to hand to
 * Python) or, as without cut, at a slot it could not finish. */
static PyObject *fp_serve(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    Py_ssize_t start, count, id_offset, lbs, host_page, max_indirect;
    PyObject *sectors_o, *size_o, *entries;
    int read_only, fd, wfd, modes[2];
    Py_ssize_t cut = -1; /* not given: the 3-item result, no limit */
    if (!PyArg_ParseTuple(args, "y*nnnOOnpniiiinO!|n", &data, &start, &count, &id_offset, &sectors_o,
                          &size_o, &lbs, &read_only, &max_indirect, &fd, &wfd, &modes[OP_READ],
                          &modes[OP_WRITE], &host_page, &PyDict_Type, &entries, &cut))
        return NULL;
    int cut_hit = 0; /* the run ended at `cut`, not at a slot it could not serve */
    struct limits lim;
    struct prepared *reqs = NULL;
    Py_ssize_t nreq = 0, done = 0;
    PyObject *out = NULL;
    if (parse_limits(sectors_o, size_o, lbs, read_only, id_offset, max_indirect, &lim) < 0)
        goto fail;
    Py_ssize_t esize = entry_size(id_offset);
    if (start < 0 || count < start || count > MAX_SLOTS || data.len / esize < count) {
        PyErr_SetString(PyExc_ValueError, "slot range outside the copied batch");
        goto fail;
    }
    if (host_page <= 0 || (host_page & (host_page - 1)) || fd < 0 || wfd < 0) {
        PyErr_SetString(PyExc_ValueError, "bad host page size or fd");
        goto fail;
    }
    Py_ssize_t todo = count - start;
    if (todo > 0) {
        reqs = PyMem_Malloc((size_t)todo * sizeof *reqs); /* filled as used: not zeroed */
        if (reqs == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    /* 1. decode and find the pages (GIL held): the longest prefix we can run */
    uint64_t run_bytes = 0;
    int gate = -1; /* no gate here: a MODE_GATED write (a group's) stops */
    nreq = prepare_run(data.buf, start, count, esize, &lim, entries, modes, host_page, cut, &cut_hit, reqs, 0,
                       &run_bytes, NULL, &gate);
    /* 2. the I/O, in ring order, without the GIL; the first one not done in full ends the run */
    if (nreq) {
        Py_BEGIN_ALLOW_THREADS
        done = run_io(reqs, nreq, fd, wfd, NULL);
        Py_END_ALLOW_THREADS
    }
    /* 3. answers and the refs used (for the cache's recency), GIL held. Only allocation can fail
     * here, after I/O ran: then we raise, and the data plane treats it as its own bug (logged,
     * ring broken) rather than guess which answers are owed. */
    {
        PyObject *answers = PyList_New(done);
        PyObject *refs = used_refs(reqs, done);
        if (answers == NULL || refs == NULL) {
            Py_XDECREF(answers);
            Py_XDECREF(refs);
            goto fail;
        }
        for (Py_ssize_t k = 0; k < done; k++) {
            PyObject *t = okay_answer(reqs[k].r.id, reqs[k].r.op);
            if (t == NULL) {
                Py_DECREF(answers);
                Py_DECREF(refs);
                goto fail;
            }
            PyList_SET_ITEM(answers, k, t);
        }
        if (cut < 0)
            out = Py_BuildValue("(NnN)", answers, start + done, refs);
        else /* cut only counts if every request of the run finished: else Python's slot is next */
            out = Py_BuildValue("(NnNO)", answers, start + done, refs,
                                cut_hit && done == nreq ? Py_True : Py_False);
    }
fail:
    for (Py_ssize_t k = 0; k < nreq; k++)
        prepared_release(&reqs[k]);
    PyMem_Free(reqs);
    PyBuffer_Release(&data);
    return out;
}

/* --- loop: the persistent-grant pass in ring_loop.h's wait-and-serve loop ------------------------
 *
 * Issue 20, 4 KiB at QD 32: the frontend and the ring thread take strict turns (every pass exactly
 * the 32 requests of the frontend's last turn), and per pass the ring thread crossed into Python for
 * the wake-up, take_slots, the pass's wrapper, _write_run, the push and notify, and the final
 * check: 30-34 % of its time (bench/README.md, fourk20). loop() runs that cycle in C; its serve
 * step is serve()'s own pieces, prepare_run() then run_io().
 *
 * Without the GIL where it can (issue 20, gil20): with the cache's pages in a Pages, prepare_run()
 * first runs without the GIL, reading the C index alone (decode from the private copy, the raw
 * allocator for an indirect request's arrays). Only a slot it stops at — a page the index does not
 * hold yet, a plain dict, or anything it refuses — is tried again, from that slot on, with the GIL
 * (the dict looked up and the page indexed, or the same refusal: then Python's path takes the slot).
 * The refs a run used go into `used`, a C buffer, and reach GrantCache.note_used when the loop
 * holds the GIL anyway: when it reports its counts before a sleep or at an exit (ring_loop.h's
 * `owed`), or after a run that filled half the buffer or did not fit (then that run's requests are
 * kept until after() notes them). So a pass of cached requests takes the GIL once, for the report
 * before the sleep, where it took it twice (prepare, then note_used after the run); the LRU order
 * sees the same refs in the same order, a sleep's worth of runs noted as one use (the cache already
 * counts a run as one). Pages from a plain dict (check(), bench/ring_cpu's `--native dict`) hold
 * buffer exports, released with the GIL after each run as before.
 *
 * The first pass after a wake-up is cut at `cut` bytes, each cut run published before the next
 * one's I/O (DataPlane._cut_for_pass's rule: the QD-4 turnaround). */
#define USED_CAP 8192 /* refs noted later, at most (a sleep's worth of 4 KiB passes: 32 a pass) */
struct fp_loop {
    struct limits lim;
    Py_ssize_t esize, host_page, cut;
    int fd, wfd, modes[2];
    int indexed; /* entries is a Pages: prepare_run() tries without the GIL first */
    int owed;    /* ring_loop.h's OWED_*: what after() has to do */
    PyObject *entries, *note_used;
    int64_t *wg;          /* the device's write gate state (write_gate.h), or NULL: MODE_GATED stops */
    Py_buffer wg_view;    /* its export, held while the loop runs (wg_view.obj NULL: none) */
    struct prepared *reqs; /* room for a whole take; [0, nreq) still held (after() releases them) */
    Py_ssize_t nreq, done;
    uint32_t *used; /* refs of released runs not noted yet */
    Py_ssize_t nused;
};

static Py_ssize_t fp_loop_serve(void *ctx, const unsigned char *copy, Py_ssize_t start, Py_ssize_t count,
                                int after_sleep, uint64_t *ids, uint8_t *ops, PyThreadState **ts, int *more)
{
    struct fp_loop *f = ctx;
    int cut_hit = 0;
    Py_ssize_t cut = after_sleep ? f->cut : 0, n = 0;
    uint64_t bytes = 0;
    int gate = -1; /* asked once for the take, by its first gated write */
    if (f->indexed)
        n = prepare_run(copy, start, count, f->esize, &f->lim, f->entries, f->modes, f->host_page, cut, &cut_hit,
                        f->reqs, 1, &bytes, f->wg, &gate);
    if (!cut_hit && start + n < count) { /* what the index alone could not decide, with the GIL */
        PyEval_RestoreThread(*ts);
        n += prepare_run(copy, start + n, count, f->esize, &f->lim, f->entries, f->modes, f->host_page, cut,
                         &cut_hit, f->reqs + n, 0, &bytes, f->wg, &gate);
        *ts = PyEval_SaveThread();
    }
    const Py_ssize_t done = n ? run_io(f->reqs, n, f->fd, f->wfd, f->wg) : 0;
    f->nreq = n;
    f->done = done;
    for (Py_ssize_t k = 0; k < done; k++) {
        ids[k] = f->reqs[k].r.id;
        ops[k] = f->reqs[k].r.op;
    }
    /* cut only counts if every request of the run finished: else Python's slot is next */
    *more = cut_hit && done == n;
    Py_ssize_t nrefs = f->indexed ? count_refs(f->reqs, done) : 0;
    if (!f->indexed || f->nused + nrefs > USED_CAP) {
        f->owed = OWED_NOW; /* a dict's exports, or refs that do not fit: after() with the GIL */
    } else {
        copy_refs(f->reqs, done, f->used + f->nused);
        f->nused += nrefs;
        for (Py_ssize_t k = 0; k < n; k++) /* nothing of Python's held: no GIL needed */
            prepared_release(&f->reqs[k]);
        f->nreq = f->done = 0;
        if (f->nused > 0)
            f->owed = f->nused >= USED_CAP / 2 ? OWED_NOW : (f->owed > OWED_LATER ? f->owed : OWED_LATER);
    }
    return start + done;
}

/* `refs` (bytes of uint32) to the cache's note_used; -1 with a Python error. */
static int note(PyObject *note_used, PyObject *refs)
{
    PyObject *view = refs == NULL ? NULL : PyMemoryView_FromObject(refs);
    PyObject *ints = view == NULL ? NULL : PyObject_CallMethod(view, "cast", "s", "I");
    PyObject *got = ints == NULL ? NULL : PyObject_CallOneArg(note_used, ints);
    Py_XDECREF(got);
    Py_XDECREF(ints);
    Py_XDECREF(view);
    Py_XDECREF(refs);
    return got == NULL ? -1 : 0;
}

/* With the GIL: the refs noted later, then those of the run still held, to note_used (oldest
 * first), and that run's requests released. */
static int fp_loop_after(void *ctx)
{
    struct fp_loop *f = ctx;
    int rc = 0;
    if (f->nused > 0) {
        rc = note(f->note_used, PyBytes_FromStringAndSize((const char *)f->used, f->nused * (Py_ssize_t)sizeof(uint32_t)));
        f->nused = 0;
    }
    if (rc == 0 && f->done > 0)
        rc = note(f->note_used, used_refs(f->reqs, f->done));
    for (Py_ssize_t k = 0; k < f->nreq; k++)
        prepared_release(&f->reqs[k]);
    f->nreq = f->done = 0;
    f->owed = OWED_NONE;
    return rc;
}

/* One ring's pass for a loop: its ring_loop.h arguments (*a), its pass state (*f) and the loop_pass
 * over them (*lp), from the arguments of loop() below. 0, or -1 with a Python error (fp_close()
 * frees what it got either way; *rest, the pass's arguments, holds the objects f borrows). */
static int fp_open(PyObject *args, struct loop_args *a, struct fp_loop *f, struct loop_pass *lp, PyObject **rest)
{
    memset(f, 0, sizeof *f);
    *rest = NULL;
    if (loop_parse(args, a, rest) < 0)
        return -1;
    Py_ssize_t id_offset, lbs, max_indirect;
    PyObject *sectors_o, *size_o;
    int read_only;
    long long poll_ns = 0;
    PyObject *gate = Py_None;
    if (!PyArg_ParseTuple(*rest, "nOOnpniiiinO!On|LO", &id_offset, &sectors_o, &size_o, &lbs, &read_only,
                          &max_indirect, &f->fd, &f->wfd, &f->modes[OP_READ], &f->modes[OP_WRITE], &f->host_page,
                          &PyDict_Type, &f->entries, &f->note_used, &f->cut, &poll_ns, &gate))
        return -1;
    if (gate != Py_None) {
        if (PyObject_GetBuffer(gate, &f->wg_view, PyBUF_WRITABLE) < 0)
            return -1;
        if (f->wg_view.len < WG_SIZE * (Py_ssize_t)sizeof(int64_t) || ((uintptr_t)f->wg_view.buf & 7)) {
            PyErr_SetString(PyExc_ValueError, "loop: the write gate is not an aligned buffer of WG_SIZE int64");
            return -1;
        }
        f->wg = f->wg_view.buf;
    }
    if (parse_limits(sectors_o, size_o, lbs, read_only, id_offset, max_indirect, &f->lim) < 0)
        return -1;
    if (f->host_page <= 0 || (f->host_page & (f->host_page - 1)) || f->fd < 0 || f->wfd < 0 || f->cut < 0 ||
        !PyCallable_Check(f->note_used) || poll_ns < 0 || poll_ns > 1000000000LL) {
        PyErr_SetString(PyExc_ValueError, "loop: bad host page size, fd, cut, note_used or poll");
        return -1;
    }
    f->esize = entry_size(id_offset);
    f->indexed = Py_IS_TYPE(f->entries, &PagesType);
    f->reqs = PyMem_Malloc((size_t)a->room * sizeof *f->reqs);
    f->used = PyMem_Malloc(USED_CAP * sizeof *f->used);
    if (f->reqs == NULL || f->used == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *lp = (struct loop_pass){f, fp_loop_serve, fp_loop_after, f->esize, id_offset == 8, &f->owed, (int64_t)poll_ns};
    return 0;
}

/* With the GIL: what fp_open() got (loop_parse() must have succeeded if *rest is set). */
static void fp_close(struct loop_args *a, struct fp_loop *f, PyObject *rest)
{
    if (f->reqs != NULL)
        for (Py_ssize_t k = 0; k < f->nreq; k++) /* a Python error in the after step left them */
            prepared_release(&f->reqs[k]);
    PyMem_Free(f->reqs);
    PyMem_Free(f->used);
    f->reqs = NULL;
    f->used = NULL;
    if (f->wg_view.obj != NULL)
        PyBuffer_Release(&f->wg_view);
    f->wg = NULL;
    if (rest != NULL) {
        Py_DECREF(rest);
        loop_release(a);
    }
}

/* loop(<ring_loop.h's LOOP_ARGS>, id_offset, sectors, size_bytes, logical_block_size, read_only,
 *      max_indirect_segments, fd, write_fd, read_mode, write_mode, host_page, entries, note_used, cut,
 *      [poll_ns, [write_gate]])
 *   -> ring_loop()'s tuple; `owner` is the FastPass whose `served` it counts, `note_used` the grant
 *   cache's (called with a uint32 memoryview of the refs of each run), `cut` serve()'s (0: none),
 *   `poll_ns` ring_loop.h's poll for the refill (0, the default: none), `write_gate` the device's
 *   write gate state for MODE_GATED writes (write_gate.h: a writable buffer of WG_SIZE int64; None,
 *   the default: they stop). */
static PyObject *fp_loop(PyObject *self, PyObject *args)
{
    (void)self;
    struct loop_args a;
    struct fp_loop f;
    struct loop_pass lp;
    PyObject *rest = NULL, *out = NULL;
    if (fp_open(args, &a, &f, &lp, &rest) == 0)
        out = ring_loop(&a, &lp);
    fp_close(&a, &f, rest);
    return out;
}

/* --- group_loop: one loop serving several rings (issue 20, many busy disks) ---------------------
 *
 * With one ring thread per ring, a ring at QD 4 among many gets a pass of 4 requests, then sleeps
 * and is woken again: on the 2-CPU test VM 8-100 busy disks cost 0.25 wake-ups and ~0.3 context
 * switches a request against 0.05 with 2 disks (bench/README.md, many_disks, group20), and the
 * engine's CPU a request rose 8 -> 10-13 us. A group's loop serves every member ring in rounds — one
 * take (at most `batch` slots: a flooding guest cannot starve the others) of each ring with work a
 * round — and sleeps only when every ring is idle: the refill poll over all of them, then each
 * one's late unmask and final check (req_event armed, a fence, req_prod again), then one epoll_wait
 * over all their channels. Each ring keeps its own state, counts and stop word, and every exit of a
 * ring (a slot for Python, the overflow check, a stop, a failed read or unmask, a failed notify)
 * is that ring's alone: its tuple goes to deliver(token, tuple) (ring_loop()'s tuple), it leaves
 * the group, and the others go on; its data plane takes it from there as after loop().
 *
 * group_loop(take, deliver, epoll_fd, bell, report_every[, yield[, shared_ns, counters]])
 *   take() -> [(token, <loop()'s arguments>), ...]: rings joining (called first, then whenever the
 *   bell's word is set: bell = (word, eventfd), the word a writable byte the joiner sets before it
 *   writes the eventfd, which is in the epoll set too); deliver(token, tuple) with each ring's exit;
 *   the counts go into each ring's stats before every sleep and every `report_every` requests a
 *   ring (report_every times the rings, of the group's: one GIL take for all rings). With
 *   no ring it sleeps on the bell alone; it returns None once take() returns None (the group
 *   closes) and no ring is left. A Python error (ours: take, deliver, a report) drops every
 *   ring still in the group, not delivered: the caller fails them. `yield`: the refill poll
 *   yields the CPU to any task runnable on it (ring_loop.h's poller): a group that always finds
 *   a refill within the poll never sleeps, and on CPUs it shares with the frontends it held half
 *   of each while they waited for it (bench/README.md, many_disks, many20). `shared_ns`: once a
 *   poll finds that another task took the CPU, the group does not poll for that long (ring_loop.h,
 *   SHARED_GAP_NS; 0: it polls on). `counters`: a writable buffer of one or two int64, set to how
 *   often a poll found the CPU taken and (the second) how often those sleeps ended because the
 *   CPU idled, before each sleep and each report (None: not kept). */
struct fp_member {
    struct loop_args a;
    struct fp_loop f;
    struct loop_pass lp;
    struct ring_run run;
    PyObject *token, *args, *rest;
    int why; /* -1 while it is served, else its EXIT_* */
    int in_epoll;
};

static void member_free(struct fp_member *m, int epfd)
{
    if (m->in_epoll)
        epoll_ctl(epfd, EPOLL_CTL_DEL, m->a.w.fd, NULL);
    run_free(&m->run);
    fp_close(&m->a, &m->f, m->rest);
    Py_XDECREF(m->token);
    Py_XDECREF(m->args);
    PyMem_Free(m);
}

/* With the GIL: take()'s rings into the group. 0, 1 if take() said the group closes (None), or -1
 * with a Python error. */
static int group_join(PyObject *take, struct fp_member ***ms, int *n, int *cap, int epfd)
{
    PyObject *got = PyObject_CallNoArgs(take);
    if (got == NULL)
        return -1;
    if (got == Py_None) {
        Py_DECREF(got);
        return 1;
    }
    if (!PyList_Check(got)) {
        Py_DECREF(got);
        PyErr_SetString(PyExc_TypeError, "group_loop: take() must return a list");
        return -1;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(got) && rc == 0; i++) {
        PyObject *item = PyList_GET_ITEM(got, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "group_loop: take() gives (token, arguments) pairs");
            rc = -1;
            break;
        }
        if (*n == *cap) {
            int ncap = *cap ? *cap * 2 : 16;
            struct fp_member **grown = PyMem_Realloc(*ms, (size_t)ncap * sizeof **ms);
            if (grown == NULL) {
                PyErr_NoMemory();
                rc = -1;
                break;
            }
            *ms = grown;
            *cap = ncap;
        }
        struct fp_member *m = PyMem_Calloc(1, sizeof *m);
        if (m == NULL) {
            PyErr_NoMemory();
            rc = -1;
            break;
        }
        m->why = -1;
        m->token = Py_NewRef(PyTuple_GET_ITEM(item, 0));
        m->args = Py_NewRef(PyTuple_GET_ITEM(item, 1));
        if (fp_open(m->args, &m->a, &m->f, &m->lp, &m->rest) < 0 || run_open(&m->run, &m->a, &m->lp) < 0) {
            member_free(m, epfd);
            rc = -1;
            break;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = m->a.w.fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, m->a.w.fd, &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            member_free(m, epfd);
            rc = -1;
            break;
        }
        m->in_epoll = 1;
        (*ms)[(*n)++] = m;
    }
    Py_DECREF(got);
    return rc;
}

/* With the GIL: every ring that exited, reported, delivered and dropped. 0, or -1 (Python error). */
static int group_deliver(PyObject *deliver, struct fp_member **ms, int *n, int epfd)
{
    int rc = 0, kept = 0;
    for (int i = 0; i < *n; i++) {
        struct fp_member *m = ms[i];
        if (m->why < 0 || rc < 0) {
            ms[kept++] = m;
            continue;
        }
        PyObject *out = NULL, *token = Py_NewRef(m->token);
        if (report(NULL, m->run.stats, m->run.owner, &m->lp, m->run.counts) == 0)
            out = run_result(&m->run, m->why);
        /* out of the epoll set and its buffers released first: once delivered, its data plane may
         * close the channel and unmap the ring */
        member_free(m, epfd);
        PyObject *r = out == NULL ? NULL : PyObject_CallFunctionObjArgs(deliver, token, out, NULL);
        Py_XDECREF(out);
        Py_DECREF(token);
        if (r == NULL)
            rc = -1;
        Py_XDECREF(r);
    }
    *n = kept;
    return rc;
}

static PyObject *fp_group_loop(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *take, *deliver;
    Py_buffer word;
    int epfd, bellfd;
    Py_ssize_t every;
    int yield = 0;
    long long shared_ns = 0;
    PyObject *counters_obj = Py_None;
    Py_buffer counters = {0};
    if (!PyArg_ParseTuple(args, "OOi(w*i)n|pLO", &take, &deliver, &epfd, &word, &bellfd, &every, &yield, &shared_ns,
                          &counters_obj))
        return NULL;
    if (counters_obj != Py_None && PyObject_GetBuffer(counters_obj, &counters, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&word);
        return NULL;
    }
    if (word.len < 1 || epfd < 0 || bellfd < 0 || every <= 0 || shared_ns < 0 || !PyCallable_Check(take) ||
        !PyCallable_Check(deliver) || (counters.buf != NULL && (counters.len < 8 || ((uintptr_t)counters.buf & 7)))) {
        PyBuffer_Release(&counters);
        PyBuffer_Release(&word);
        PyErr_SetString(PyExc_ValueError,
                        "group_loop: bad callables, fds, bell word, report interval, shared time or counters");
        return NULL;
    }
    int64_t *found_shared = counters.buf;
    volatile unsigned char *bell = word.buf;
    struct fp_member **ms = NULL;
    struct ring_run **rs = NULL;
    int n = 0, cap = 0, rcap = 0;
    PyObject *out = NULL;
    struct epoll_event evs[64];
    struct poller poller;
    poller_init(&poller, 0, yield, shared_ns);
    Py_ssize_t unreported = 0;
    bell[0] = 0;
    int closed = group_join(take, &ms, &n, &cap, epfd);
    if (closed < 0)
        goto done;
    PyThreadState *ts = PyEval_SaveThread();
    while (!closed || n > 0) {
        int worked = 0, exited = 0, joined = 0;
        for (int i = 0; i < n; i++) {
            struct fp_member *m = ms[i];
            struct ring_run *run = &m->run;
            if (m->why >= 0) { /* its wake-up read ended it */
                exited = 1;
                continue;
            }
            if (*run->stop) {
                m->why = EXIT_WOKEN;
                exited = 1;
                continue;
            }
            Py_ssize_t before = run->requests;
            int step = ring_step(run, &ts, &m->why);
            if (step == STEP_PYERR)
                goto python_error; /* the GIL is held */
            if (step == STEP_EXIT) {
                exited = 1;
                continue;
            }
            unreported += run->requests - before;
            worked |= step != STEP_IDLE;
            if (step != STEP_FULL && ring_unmask(run) < 0) {
                m->why = EXIT_OSERROR;
                exited = 1;
            }
        }
        if (bell[0]) {
            bell[0] = 0;
            uint64_t drained;
            if (read(bellfd, &drained, sizeof drained) < 0 && errno != EAGAIN) {
                PyEval_RestoreThread(ts);
                PyErr_SetFromErrno(PyExc_OSError);
                goto python_error;
            }
            joined = 1;
        }
        /* `every` requests a ring on average: a report takes the GIL and runs each ring's owed after
         * step (FastPass's note of the pages it used), so a group-wide `every` made it ~10 of a
         * ring's requests at 100 rings and fed Python's collector (bench/README.md, many_disks,
         * report24: 4.9 -> 4.3 us a request, 356 -> 74 collections in a 3 s row) */
        if (!exited && !joined && unreported < every * (Py_ssize_t)n && worked)
            continue; /* another round: a ring with work gets its next take */
        if (!exited && !joined && !worked) {
            /* every ring idle: the refill poll over all of them, then each one's final check */
            if (cap > rcap) {
                struct ring_run **grown = PyMem_RawRealloc(rs, (size_t)cap * sizeof *rs);
                if (grown == NULL) {
                    PyEval_RestoreThread(ts);
                    PyErr_NoMemory();
                    goto python_error;
                }
                rs = grown;
                rcap = cap;
            }
            int served = 0;
            poller.ns = 0; /* the longest poll of the rings here now: a ring that left takes its own */
            for (int i = 0; i < n; i++) {
                rs[i] = &ms[i]->run;
                served |= rs[i]->served;
                poller.ns = ms[i]->lp.poll_ns > poller.ns ? ms[i]->lp.poll_ns : poller.ns;
            }
            if (served) {
                int caught = poll_refill(&poller, rs, n);
                for (int i = 0; i < n; i++)
                    rs[i]->served = 0;
                if (caught)
                    continue;
            }
            int again = 0;
            for (int i = 0; i < n; i++)
                again |= ring_arm(&ms[i]->run);
            if (again)
                continue;
        }
        /* with the GIL: the counts, the exits, the rings joining */
        if (found_shared != NULL) {
            __atomic_store_n(found_shared, poller.found_shared, __ATOMIC_RELAXED);
            if (counters.len >= 16)
                __atomic_store_n(found_shared + 1, poller.found_idle, __ATOMIC_RELAXED);
        }
        PyEval_RestoreThread(ts);
        for (int i = 0; i < n; i++)
            if (ms[i]->why < 0 && report(NULL, ms[i]->run.stats, ms[i]->run.owner, &ms[i]->lp, ms[i]->run.counts) < 0)
                goto python_error;
        unreported = 0;
        if (exited && group_deliver(deliver, ms, &n, epfd) < 0)
            goto python_error;
        if (joined && (closed = group_join(take, &ms, &n, &cap, epfd)) < 0)
            goto python_error;
        ts = PyEval_SaveThread();
        if (exited || joined || worked)
            continue;
        /* asleep until a ring's channel, or the bell, wakes the group */
        int got;
        do
            got = epoll_wait(epfd, evs, 64, -1);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            int e = errno;
            for (int i = 0; i < n; i++) {
                ms[i]->run.err = e;
                ms[i]->why = EXIT_OSERROR;
            }
            continue;
        }
        for (int k = 0; k < got; k++) {
            int fd = evs[k].data.fd;
            if (fd == bellfd)
                bell[0] = 1; /* drained next round (a joiner may have set the word before a drain) */
            for (int i = 0; i < n; i++)
                if (ms[i]->a.w.fd == fd && ms[i]->why < 0) {
                    ring_woken(&ms[i]->run, &ms[i]->why);
                    break;
                }
        }
    }
    PyEval_RestoreThread(ts);
    out = Py_NewRef(Py_None);
    goto done;
python_error:
    out = NULL; /* the GIL is held: every ring left is dropped, for the caller to fail */
done:
    poller_close_idle(&poller);
    for (int i = 0; i < n; i++)
        member_free(ms[i], epfd);
    PyMem_Free(ms);
    PyMem_RawFree(rs);
    PyBuffer_Release(&counters);
    PyBuffer_Release(&word);
    return out;
}

/* short_slice(ns) -> the calling thread's slice (ns) as the kernel now reports it. A group's thread
 * asks for a short EEVDF request (sched_setattr, SCHED_OTHER with sched_runtime: Linux 6.12+,
 * clamped to 0.1-100 ms), its nice kept: a woken task whose slice is shorter than the running one's
 * preempts it at once (PREEMPT_SHORT) even with no lag to its credit, so a group asleep beside a
 * CPU-bound task runs when a ring's notify wakes it, not at the task's next tick; and a task that
 * has run its short request past its share is switched out at the next scheduler event. Its
 * share of the CPU does not change (the slice sets deadlines, not weight). Older kernels take the
 * call and ignore sched_runtime for SCHED_OTHER: the slice read back says (0 there). OSError if
 * either call fails. */
struct fp_sched_attr { /* the kernel's struct sched_attr (SCHED_ATTR_SIZE_VER1, 56 bytes) */
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};

static PyObject *fp_short_slice(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ns;
    if (!PyArg_ParseTuple(args, "K", &ns))
        return NULL;
    struct fp_sched_attr attr;
    memset(&attr, 0, sizeof attr);
    if (syscall(SYS_sched_getattr, 0, &attr, (unsigned)sizeof attr, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (attr.sched_policy != SCHED_OTHER) { /* an admin's RT or batch policy is theirs: left alone */
        errno = EPERM;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    attr.size = sizeof attr;
    attr.sched_flags = 0; /* the nice, read above, is set again as it was */
    attr.sched_runtime = ns;
    if (syscall(SYS_sched_setattr, 0, &attr, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    memset(&attr, 0, sizeof attr);
    if (syscall(SYS_sched_getattr, 0, &attr, (unsigned)sizeof attr, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLongLong(attr.sched_runtime);
}

/* --- the Pages type's methods: every change to the dict drops what the index held for it first --- */
enum { DM_POP, DM_CLEAR, DM_POPITEM, DM_UPDATE, DM_SETDEFAULT, DM_COUNT };
static const char *const dict_method_names[DM_COUNT] = {"pop", "clear", "popitem", "update", "setdefault"};
static PyObject *dict_methods[DM_COUNT]; /* dict's own, called with the Pages as self */

static PyObject *call_dict(int which, PyObject *self, PyObject *args, PyObject *kwargs)
{
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *full = PyTuple_New(n + 1);
    if (full == NULL)
        return NULL;
    PyTuple_SET_ITEM(full, 0, Py_NewRef(self));
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(full, i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    PyObject *out = PyObject_Call(dict_methods[which], full, kwargs);
    Py_DECREF(full);
    return out;
}

static PyObject *pages_pop(PyObject *self, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) >= 1)
        index_discard((PagesObject *)self, PyTuple_GET_ITEM(args, 0));
    return call_dict(DM_POP, self, args, kwargs);
}

#define WHOLE_INDEX_METHOD(name, which)                                                   \
    static PyObject *name(PyObject *self, PyObject *args, PyObject *kwargs)               \
    {                                                                                     \
        index_clear((PagesObject *)self);                                                 \
        return call_dict(which, self, args, kwargs);                                      \
    }
WHOLE_INDEX_METHOD(pages_clear, DM_CLEAR)
WHOLE_INDEX_METHOD(pages_popitem, DM_POPITEM)
WHOLE_INDEX_METHOD(pages_update, DM_UPDATE)
WHOLE_INDEX_METHOD(pages_setdefault, DM_SETDEFAULT)

static int pages_ass_subscript(PyObject *self, PyObject *key, PyObject *value)
{
    index_discard((PagesObject *)self, key); /* del d[ref], d[ref] = other view */
    return PyDict_Type.tp_as_mapping->mp_ass_subscript(self, key, value);
}

static PyObject *pages_ior(PyObject *self, PyObject *other)
{
    index_clear((PagesObject *)self);
    return PyDict_Type.tp_as_number->nb_inplace_or(self, other);
}

static PyObject *pages_indexed(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(((PagesObject *)self)->used);
}

static void pages_dealloc(PyObject *self)
{
    PagesObject *t = (PagesObject *)self;
    index_clear(t);
    PyMem_Free(t->slots);
    t->slots = NULL;
    t->bits = 0;
    PyDict_Type.tp_dealloc(self);
}

static PyMethodDef pages_methods[] = {
    {"pop", (PyCFunction)(void (*)(void))pages_pop, METH_VARARGS | METH_KEYWORDS, NULL},
    {"clear", (PyCFunction)(void (*)(void))pages_clear, METH_VARARGS | METH_KEYWORDS, NULL},
    {"popitem", (PyCFunction)(void (*)(void))pages_popitem, METH_VARARGS | METH_KEYWORDS, NULL},
    {"update", (PyCFunction)(void (*)(void))pages_update, METH_VARARGS | METH_KEYWORDS, NULL},
    {"setdefault", (PyCFunction)(void (*)(void))pages_setdefault, METH_VARARGS | METH_KEYWORDS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pages_getset[] = {
    {"indexed", pages_indexed, NULL, "pages the C pass has looked up and holds an export on", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMappingMethods pages_as_mapping = {.mp_ass_subscript = pages_ass_subscript};
static PyNumberMethods pages_as_number = {.nb_inplace_or = pages_ior};

static PyTypeObject PagesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "xenblockctl.backend._fastpass.Pages",
    .tp_doc = "The grant cache's ref -> page view dict, indexed for the native pass (GrantCache.index_pages).",
    .tp_basicsize = sizeof(PagesObject),
    .tp_flags = Py_TPFLAGS_DEFAULT, /* GC, dict-subclass: inherited from dict */
    .tp_dealloc = pages_dealloc,
    .tp_methods = pages_methods,
    .tp_getset = pages_getset,
    .tp_as_mapping = &pages_as_mapping,
    .tp_as_number = &pages_as_number,
};

/* --- respond: a run of answers written into the ring, ring.py's journal protocol --------------
 *
 * BackRing.respond_all's loop, for the case the native pass makes common: answers to consecutive
 * requests that are next in ring order (nothing held, the first one's slot at rsp_prod_pvt), so
 * each goes straight into its slot. Per answer, in ring.py's order (see its module docstring):
 * the response into the journal (header offset 44), TAG = its index, the response into its slot,
 * COMMITTED = index + 1. Every answer is parsed before the first byte is written, so a malformed
 * one (our bug) raises with the ring untouched. Stores to shared memory are plain stores (x86 TSO,
 * as ring.py relies on), kept in program order by the compiler: release stores for the two
 * index words and a compiler barrier after each. Nothing is read from shared memory here.
 *
 * respond(answers, ring, pvt, ring_size, id_offset) -> the new rsp_prod_pvt */
static PyObject *fp_respond(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *answers;
    Py_buffer ring;
    unsigned long long pvt_in;
    Py_ssize_t ring_size, id_offset;
    if (!PyArg_ParseTuple(args, "O!w*Knn", &PyList_Type, &answers, &ring, &pvt_in, &ring_size, &id_offset))
        return NULL;
    PyObject *out = NULL;
    unsigned char (*rsp)[16] = NULL;
    Py_ssize_t n = PyList_GET_SIZE(answers);
    Py_ssize_t esize = entry_size(id_offset);
    size_t rsize = response_size(id_offset == 8);
    if ((id_offset != 8 && id_offset != 4) || ring_size <= 0 || ring_size > MAX_SLOTS ||
        (ring_size & (ring_size - 1)) || pvt_in > 0xFFFFFFFFull || n > ring_size ||
        ring.len < SRING_HEADER + ring_size * esize || ((uintptr_t)ring.buf & 3)) {
        PyErr_SetString(PyExc_ValueError, "respond: bad ring geometry or alignment, or too many answers");
        goto done;
    }
    rsp = PyMem_Calloc((size_t)n + 1, sizeof *rsp); /* zeroed: padding bytes go out as zeros */
    if (rsp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *t = PyList_GET_ITEM(answers, k);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
            PyErr_SetString(PyExc_TypeError, "respond: an answer is not (id, operation, status)");
            goto done;
        }
        unsigned long long id = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 0));
        long op = PyLong_AsLong(PyTuple_GET_ITEM(t, 1));
        long status = PyLong_AsLong(PyTuple_GET_ITEM(t, 2));
        if (PyErr_Occurred())
            goto done;
        if (op < 0 || op > 255 || status < INT16_MIN || status > INT16_MAX) {
            PyErr_SetString(PyExc_ValueError, "respond: operation or status out of range");
            goto done;
        }
        pack_response(rsp[k], (uint64_t)id, (uint8_t)op, (int16_t)status);
    }
    {
        unsigned char *hdr = ring.buf;
        uint32_t pvt = (uint32_t)pvt_in, mask = (uint32_t)ring_size - 1;
        for (Py_ssize_t k = 0; k < n; k++)
            pvt = answer_into_ring(hdr, pvt, mask, (size_t)esize, rsp[k], rsize);
        out = PyLong_FromUnsignedLong(pvt);
    }
done:
    PyMem_Free(rsp);
    PyBuffer_Release(&ring);
    return out;
}

/* dirty_permille() -> the host's dirty + writeback pages in per-mille of the dirty throttle's
 * freerun ceiling, read now as the write gate reads it (-1: /proc/vmstat unreadable); for tests. */
static PyObject *fp_dirty_permille(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromLong(dirty_permille_now());
}

static PyMethodDef methods[] = {
    {"dirty_permille", fp_dirty_permille, METH_NOARGS, "The dirty level as the write gate reads it."},
    {"check", fp_check, METH_VARARGS, "Decode and validate one READ/WRITE slot as serve() would."},
    {"serve", fp_serve, METH_VARARGS, "Serve the longest simple prefix of a copied ring batch."},
    {"respond", fp_respond, METH_VARARGS, "Write answers that are next in ring order into their slots."},
    {"loop", fp_loop, METH_VARARGS, "Wait for, serve, answer and notify a ring's simple requests."},
    {"group_loop", fp_group_loop, METH_VARARGS, "The loop of loop() over a group of rings, in rounds."},
    {"short_slice", fp_short_slice, METH_VARARGS, "Ask for a short EEVDF slice for this thread."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpass", "The engine's optional native ring pass (issue 20).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpass(void)
{
    PagesType.tp_base = &PyDict_Type;
    if (PyType_Ready(&PagesType) < 0)
        return NULL;
    for (int i = 0; i < DM_COUNT; i++) {
        if (dict_methods[i] == NULL) {
            dict_methods[i] = PyObject_GetAttrString((PyObject *)&PyDict_Type, dict_method_names[i]);
            if (dict_methods[i] == NULL)
                return NULL;
        }
    }
    if (loop_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Pages", (PyObject *)&PagesType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MODE_STOP", MODE_STOP) < 0 ||
        PyModule_AddIntConstant(m, "MODE_NOWAIT", MODE_NOWAIT) < 0 ||
        PyModule_AddIntConstant(m, "MODE_BLOCK", MODE_BLOCK) < 0 ||
        PyModule_AddIntConstant(m, "MODE_BLOCK_ALIGNED", MODE_BLOCK_ALIGNED) < 0 ||
        PyModule_AddIntConstant(m, "MODE_GATED", MODE_GATED) < 0 ||
        PyModule_AddIntConstant(m, "WG_HOLD_UNTIL", WG_HOLD_UNTIL) < 0 ||
        PyModule_AddIntConstant(m, "WG_HOLD_NS", WG_HOLD_NS) < 0 || PyModule_AddIntConstant(m, "WG_SLEPT", WG_SLEPT) < 0 ||
        PyModule_AddIntConstant(m, "WG_CLOSED", WG_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "WG_LEFT_DIRTY", WG_LEFT_DIRTY) < 0 ||
        PyModule_AddIntConstant(m, "WG_LEFT_HELD", WG_LEFT_HELD) < 0 ||
        PyModule_AddIntConstant(m, "WG_DIRTY_PERMILLE", WG_DIRTY_PERMILLE) < 0 ||
        PyModule_AddIntConstant(m, "WG_LAST", WG_LAST) < 0 || PyModule_AddIntConstant(m, "WG_SIZE", WG_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "DIRTY_GATE_PERMILLE", DIRTY_GATE_PERMILLE) < 0 ||
        PyModule_AddIntConstant(m, "IDLE_WINDOW_NS", IDLE_WINDOW_NS) < 0 || loop_add_constants(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
