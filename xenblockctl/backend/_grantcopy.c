/*
 * The native pass for frontends WITHOUT persistent grants (issue 20): grant copy, end to end.
 *
 * GRUB's blkfront (pvgrub) sends 2,480 single-page READs one at a time, with no persistent grants;
 * the pure-Python copy path (dataplane.DataPlane._serve_copied, backend/grantcopy.py) spent most of
 * the ring thread's ~1.1 ms a request (in dom0 under TCG) in Python. `serve` does the same work for
 * the longest prefix of *simple* slots of a pass — READ or WRITE with direct segments (1..11), every
 * rule of requests.validate_slot satisfied — from the private copy Python took (ring.take_slots):
 *
 *   1. decode each slot once (the rules of requests._check_segments/_plan; tests/unit/
 *      test_grantcopy_native.py checks they agree with validate_slot on arbitrary bytes) and give
 *      it a range of our bounce buffer (segments back to back, as grantcopy.Staged lays them out);
 *   2. one GNTDEV_IOCTL_GRANT_COPY out of the guest's pages for every WRITE of the chunk;
 *   3. the I/O in ring order (preadv2/pwritev2 on one iovec, the GIL released), each where
 *      io.Executor.placement says it runs now (RWF_NOWAIT or inline), exactly as _fastpass.serve;
 *   4. one GNTDEV_IOCTL_GRANT_COPY into the guest's pages for every READ the chunk finished.
 *
 * It answers nothing itself and logs nothing: it returns (id, op, RSP_OKAY) for each request that
 * got through all four steps, and the index of the first slot it did not finish. The data plane
 * serves that slot through the pure-Python path — which validates, copies, logs and answers every
 * error its own way — and calls here again for the rest. A request whose copy failed (a ref not
 * granted, a read-only grant for a READ), whose I/O would block or moved fewer bytes, any other
 * operation, indirect segments, anything invalid: each ends the run there and is the Python path's.
 * Requests of the chunk after that slot may have had their I/O done already; they are not answered
 * and Python runs them again (a READ is copied into unanswered pages twice; a WRITE writes the same
 * bytes twice, taken again from pages the frontend must not touch before the answer: a frontend
 * that does only hurts its own disk).
 *
 * The copy goes to gntdev (`copy_fd`) when there is one; otherwise (the local transport, which
 * simulates grant copy on the host) `copier(segments)` is called with the same 24-byte
 * struct gntdev_grant_copy_segment array and writes each segment's status into it, as the ioctl does.
 *
 * Hostile input: every byte decoded comes from the private copy, every guest number is range-checked
 * before use, and our side of each segment lies inside our bounce buffer by construction (a chunk
 * never holds more bytes than the buffer).
 */
#include "blkif_slot.h"
#include "ring_answer.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

/* struct gntdev_grant_copy_segment (linux/include/uapi/xen/gntdev.h), as three little-endian u64
 * words: our address; ref | offset << 32 | domid << 48; len | flags << 16 | status << 32 */
struct copyseg {
    uint64_t words[3];
};
_Static_assert(sizeof(struct copyseg) == 24, "gntdev_grant_copy_segment is 24 bytes");
#define GNTCOPY_SOURCE_GREF 0x1
#define GNTCOPY_DEST_GREF 0x2
/* struct ioctl_gntdev_grant_copy { unsigned int count; struct gntdev_grant_copy_segment *segments; } */
struct gntcopy {
    uint32_t count;
    uint32_t pad;
    uint64_t segments;
};
/* _IOC(_IOC_NONE, 'G', 8, sizeof(struct ioctl_gntdev_grant_copy)) */
#define IOCTL_GNTDEV_GRANT_COPY ((unsigned long)(('G' << 8) | 8 | (sizeof(struct gntcopy) << 16)))

struct creq {
    uint64_t id;
    uint64_t offset; /* bytes on the device */
    uint64_t length;
    size_t at;       /* where its bytes start in the bounce buffer */
    uint8_t op;
    int mode;
    unsigned nseg;
    uint32_t gref[SEGS_MAX];
    uint16_t pofs[SEGS_MAX];
    uint16_t plen[SEGS_MAX];
};

/* blkif_slot.h's rules for a direct READ/WRITE, into r. 1: valid; 0: not ours or refused. */
static int decode(const unsigned char *slot, const struct limits *lim, struct creq *r)
{
    unsigned nseg = direct_nseg(slot, lim);
    if (nseg == 0)
        return 0;
    const struct segments seg = {r->gref, r->pofs, r->plen};
    if (!plan_segments(slot + lim->id_offset + 16, nseg, get_u64(slot + lim->id_offset + 8), lim, &seg,
                       &r->offset, &r->length))
        return 0;
    r->op = slot[0];
    r->nseg = nseg;
    r->id = get_u64(slot + lim->id_offset);
    return 1;
}

/* What a pass needs besides its slots: the device, the copy, our bounce buffer and scratch sized for
 * a whole batch. `ts`: the caller's thread state while the GIL is released (the pass runs without
 * it; the local transport's copier takes it back for its call). */
struct pass {
    struct limits lim;
    Py_ssize_t esize;
    int fd, wfd, modes[2], copy_fd;
    Py_ssize_t host_page;
    char *bounce;
    size_t bounce_len;
    uint16_t domid;
    PyObject *copier;
    PyThreadState **ts;
    struct creq *reqs;
    struct copyseg *segs;
    Py_ssize_t *which;
};

/* The copy: gntdev's ioctl, or the transport's copier. Every segment's status is set either way;
 * a call that failed as a whole marks them all failed (Python's path then finds out why). Runs
 * without the GIL; the copier's call takes it for its duration. */
static void copy_segments(const struct pass *p, struct copyseg *segs, size_t n)
{
    if (n == 0)
        return;
    int ok;
    if (p->copy_fd >= 0) {
        struct gntcopy arg = {(uint32_t)n, 0, (uint64_t)(uintptr_t)segs};
        ok = ioctl(p->copy_fd, IOCTL_GNTDEV_GRANT_COPY, &arg) == 0;
    } else {
        PyEval_RestoreThread(*p->ts);
        PyObject *view = PyMemoryView_FromMemory((char *)segs, (Py_ssize_t)(n * sizeof *segs), PyBUF_WRITE);
        PyObject *got = view == NULL ? NULL : PyObject_CallOneArg(p->copier, view);
        ok = got != NULL;
        Py_XDECREF(got);
        if (view != NULL) {
            /* the copier must not keep it: the memory is ours and freed after this call */
            PyObject *r = PyObject_CallMethod(view, "release", NULL);
            ok = ok && r != NULL;
            Py_XDECREF(r);
            Py_DECREF(view);
        }
        if (!ok)
            PyErr_Clear(); /* Python's path copies again through the transport and reports it */
        *p->ts = PyEval_SaveThread();
    }
    if (!ok)
        for (size_t i = 0; i < n; i++)
            segs[i].words[2] |= (uint64_t)0xFFFFu << 32; /* status -1: GNTST_general_error */
}

static inline int seg_failed(const struct copyseg *s)
{
    return (int16_t)(uint16_t)(s->words[2] >> 32) != 0;
}

/* Append r's segments to segs (our side at bounce + r->at, back to back). */
static size_t add_segments(struct copyseg *segs, size_t n, const struct creq *r, char *bounce,
                           uint16_t domid, int to_guest)
{
    uint64_t ours = (uint64_t)(uintptr_t)(bounce + r->at);
    uint64_t flags = to_guest ? GNTCOPY_DEST_GREF : GNTCOPY_SOURCE_GREF;
    for (unsigned i = 0; i < r->nseg; i++) {
        uint64_t foreign = (uint64_t)r->gref[i] | (uint64_t)r->pofs[i] << 32 | (uint64_t)domid << 48;
        struct copyseg *s = &segs[n++];
        s->words[0] = to_guest ? ours : foreign; /* source */
        s->words[1] = to_guest ? foreign : ours; /* dest */
        s->words[2] = (uint64_t)r->plen[i] | flags << 16;
        ours += r->plen[i];
    }
    return n;
}

/* After a copy of the requests in `which` (their segments in that order): how many of the chunk's
 * requests stay before the first one whose copy failed (`limit` if none did). */
static Py_ssize_t first_failed(const struct copyseg *segs, const struct creq *reqs, const Py_ssize_t *which,
                               Py_ssize_t nwhich, Py_ssize_t limit)
{
    size_t at = 0;
    for (Py_ssize_t k = 0; k < nwhich; k++) {
        const struct creq *r = &reqs[which[k]];
        for (unsigned i = 0; i < r->nseg; i++)
            if (seg_failed(&segs[at + i]))
                return which[k] < limit ? which[k] : limit;
        at += r->nseg;
    }
    return limit;
}

/* One copy for the `op` requests among the first `limit` (a WRITE's data out of the guest's pages
 * before its I/O, a READ's into them after it): how many of the first `limit` stay before the first
 * one whose copy failed. */
static Py_ssize_t copy_op(const struct pass *p, uint8_t op, Py_ssize_t limit)
{
    size_t nsegs = 0;
    Py_ssize_t nwhich = 0;
    for (Py_ssize_t k = 0; k < limit; k++)
        if (p->reqs[k].op == op) {
            nsegs = add_segments(p->segs, nsegs, &p->reqs[k], p->bounce, p->domid, op == OP_READ);
            p->which[nwhich++] = k;
        }
    copy_segments(p, p->segs, nsegs);
    return first_failed(p->segs, p->reqs, p->which, nwhich, limit);
}

/* The pass over slots [start, count) of a private copy, without the GIL: the index of the first
 * slot it did not finish (count when it did them all); ids[k] and ops[k] for each request
 * start + k it finished (all RSP_OKAY). */
static Py_ssize_t serve_slots(struct pass *p, const unsigned char *data, Py_ssize_t start, Py_ssize_t count,
                              uint64_t *ids, uint8_t *ops)
{
    Py_ssize_t pos = start;
    while (pos < count) {
        /* 1. decode a chunk: as many simple requests as the bounce buffer holds */
        Py_ssize_t n = 0;
        size_t used = 0;
        for (Py_ssize_t i = pos; i < count; i++) {
            struct creq *r = &p->reqs[n];
            if (!decode(data + i * p->esize, &p->lim, r))
                break;
            r->mode = resolve_mode(p->modes[r->op], r->offset, r->length, p->host_page);
            if (r->mode != MODE_NOWAIT && r->mode != MODE_BLOCK)
                break;
            if (r->length > p->bounce_len - used)
                break; /* full: this chunk ends here, the next one starts with it */
            r->at = used;
            used += r->length;
            n++;
        }
        if (n == 0)
            break; /* the slot at pos is Python's */
        /* 2. every WRITE's data out of the guest's pages, one copy */
        Py_ssize_t limit = copy_op(p, OP_WRITE, n);
        /* 3. the I/O in ring order; the first one not done in full ends the run */
        Py_ssize_t k = 0;
        for (; k < limit; k++) {
            struct creq *r = &p->reqs[k];
            struct iovec iov = {p->bounce + r->at, r->length};
            int flags = r->mode == MODE_NOWAIT ? RWF_NOWAIT : 0;
            ssize_t got = r->op == OP_READ ? preadv2(p->fd, &iov, 1, (off_t)r->offset, flags)
                                           : pwritev2(p->wfd, &iov, 1, (off_t)r->offset, flags);
            if (got < 0 || (uint64_t)got != r->length)
                break; /* Python runs it again its own way, and reports what it finds */
        }
        /* 4. every READ finished into the guest's pages, one copy */
        limit = copy_op(p, OP_READ, k);
        for (k = 0; k < limit; k++) {
            ids[pos - start + k] = p->reqs[k].id;
            ops[pos - start + k] = p->reqs[k].op;
        }
        pos += limit;
        if (limit < n)
            break;
    }
    return pos;
}

/* The pass's arguments after the slots, shared by serve() and loop(): "nnOOnpiiiinw*IiO" from
 * id_offset on. Fills p (its scratch for `slots` requests); -1 with a Python error. The bounce
 * buffer's view is the caller's to release. */
static int pass_setup(struct pass *p, Py_ssize_t id_offset, PyObject *sectors_o, PyObject *size_o, Py_ssize_t lbs,
                      int read_only, int fd, int wfd, int read_mode, int write_mode, Py_ssize_t host_page,
                      Py_buffer *bounce, unsigned int domid, int copy_fd, PyObject *copier, Py_ssize_t slots)
{
    memset(p, 0, sizeof *p);
    if (parse_limits(sectors_o, size_o, lbs, read_only, id_offset, 0, &p->lim) < 0)
        return -1;
    if (host_page <= 0 || (host_page & (host_page - 1)) || fd < 0 || wfd < 0 || domid > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "bad host page size, fd or domid");
        return -1;
    }
    if (bounce->len < SEGS_MAX * PAGE || ((uintptr_t)bounce->buf & (PAGE - 1))) {
        PyErr_SetString(PyExc_ValueError, "the bounce buffer must be page-aligned and hold 11 pages");
        return -1;
    }
    if (copy_fd < 0 && !PyCallable_Check(copier)) {
        PyErr_SetString(PyExc_TypeError, "no gntdev fd and no copier");
        return -1;
    }
    p->esize = entry_size(id_offset);
    p->fd = fd;
    p->wfd = wfd;
    p->modes[OP_READ] = read_mode;
    p->modes[OP_WRITE] = write_mode;
    p->copy_fd = copy_fd;
    p->host_page = host_page;
    p->bounce = bounce->buf;
    p->bounce_len = (size_t)bounce->len;
    p->domid = (uint16_t)domid;
    p->copier = copier;
    if (slots > 0) {
        p->reqs = PyMem_Malloc((size_t)slots * sizeof *p->reqs);
        p->segs = PyMem_Malloc((size_t)slots * SEGS_MAX * sizeof *p->segs);
        p->which = PyMem_Malloc((size_t)slots * sizeof *p->which);
        if (p->reqs == NULL || p->segs == NULL || p->which == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void pass_free(struct pass *p)
{
    PyMem_Free(p->reqs);
    PyMem_Free(p->segs);
    PyMem_Free(p->which);
}

/* serve(data, start, count, id_offset, sectors, size_bytes, logical_block_size, read_only,
 *       fd, write_fd, read_mode, write_mode, host_page, bounce, domid, copy_fd, copier)
 *   -> (answers: list[(id, op, 0)], next_index)
 * bounce: our writable buffer (at least 11 pages); copy_fd: gntdev, or -1 to call copier(segments). */
static PyObject *gc_serve(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, bounce;
    Py_ssize_t start, count, id_offset, lbs, host_page;
    PyObject *sectors_o, *size_o, *copier;
    int read_only, fd, wfd, modes[2], copy_fd;
    unsigned int domid;
    if (!PyArg_ParseTuple(args, "y*nnnOOnpiiiinw*IiO", &data, &start, &count, &id_offset, &sectors_o,
                          &size_o, &lbs, &read_only, &fd, &wfd, &modes[OP_READ], &modes[OP_WRITE],
                          &host_page, &bounce, &domid, &copy_fd, &copier))
        return NULL;
    struct pass p;
    uint64_t *ids = NULL;
    uint8_t *ops = NULL;
    PyObject *out = NULL, *answers = NULL;
    Py_ssize_t todo = count - start;
    if (pass_setup(&p, id_offset, sectors_o, size_o, lbs, read_only, fd, wfd, modes[OP_READ], modes[OP_WRITE],
                   host_page, &bounce, domid, copy_fd, copier, todo) < 0)
        goto done;
    if (start < 0 || count < start || count > MAX_SLOTS || data.len / p.esize < count) {
        PyErr_SetString(PyExc_ValueError, "slot range outside the copied batch");
        goto done;
    }
    if (todo > 0) {
        ids = PyMem_Malloc((size_t)todo * sizeof *ids);
        ops = PyMem_Malloc((size_t)todo);
        if (ids == NULL || ops == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    PyThreadState *ts = PyEval_SaveThread();
    p.ts = &ts;
    Py_ssize_t pos = serve_slots(&p, data.buf, start, count, ids, ops);
    PyEval_RestoreThread(ts);
    answers = PyList_New(pos - start);
    if (answers == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < pos - start; k++) {
        /* only allocation fails here, after I/O ran: raise, the data plane treats it as a bug of
         * ours (logged, ring broken) rather than guess which answers are owed */
        PyObject *t = okay_answer(ids[k], ops[k]);
        if (t == NULL)
            goto done;
        PyList_SET_ITEM(answers, k, t);
    }
    out = Py_BuildValue("(On)", answers, pos);
done:
    Py_XDECREF(answers);
    PyMem_Free(ids);
    PyMem_Free(ops);
    pass_free(&p);
    PyBuffer_Release(&bounce);
    PyBuffer_Release(&data);
    return out;
}

/* --- loop: wait, take, serve, answer, push, notify, unmask, final check, in one call --------------
 *
 * GRUB sends one page at a time and waits for each answer: per request the ring thread woke,
 * took the slot, served it, answered, pushed, notified, unmasked and looked again, crossing from
 * C to Python and back for each step (issue 20, ~1.1 ms of CPU a request in dom0 under TCG, a
 * third of it the gap to kernel blkback). loop() runs DataPlane._run's cycle for the grant-copy
 * path here, without the GIL, for as long as it needs nothing of Python's:
 *
 *   take (ring.py's take_slots: req_prod read once, the same overflow rule, up to `batch` slots
 *   copied out of shared memory with one or two memcpy into a private copy, which alone is
 *   decoded) -> serve_slots() -> each answer written by ring_answer.h's journal protocol -> push
 *   (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY) -> notify if the frontend's rsp_event asks -> unmask
 *   the port if a wake-up is owed its late EOI -> final check (RING_FINAL_CHECK_FOR_REQUESTS:
 *   req_event, a full fence, req_prod again) -> block in read() of the event channel.
 *
 * It returns to Python, with the ring's indices as they now are, for:
 *   EXIT_SLOT    a slot the pass stopped at: (copy, index, count) of the batch, [0, index) answered
 *                and pushed, [index, count) taken but not answered (Python serves them as before);
 *   EXIT_CHECK   req_prod would put more than the ring's size outstanding: nothing is taken and
 *                Python's BackRing decides (it marks the ring broken, with its reason);
 *   EXIT_WOKEN   the stop word is set, or a port other than the frontend's was read (the stop's
 *                loopback channel): Python looks at its stop flag;
 *   EXIT_BUDGET  `budget` requests were answered (so the stats and the stop flag are seen);
 *   EXIT_OSERROR the read or the unmask failed: errno, for Python to raise as take()/unmask() would.
 * A failed notify is counted and its errno returned with the next exit (at the latest after this
 * batch), for Python to log as DataPlane._notify does; the loop goes on, as Python's path does.
 * Its counts (requests answered, wake-ups, notifies) go into the data plane's stats before each
 * sleep and at each exit (report()).
 *
 * It runs only while no request of the ring is outstanding anywhere else (DataPlane checks: none
 * in flight, none held), so it owns the response side alone: no worker answers concurrently, and
 * every answer it writes is next in ring order. Guest numbers: req_prod is range-checked against
 * the ring's size before any slot is touched; rsp_event only decides whether to notify; every
 * slot goes through decode()'s rules (blkif_slot.h). Memory ordering is ring.h's with real fences:
 * acquire on req_prod before the slots are copied, release on rsp_prod after the answers, a full
 * fence between req_event's store and req_prod's reload and between rsp_prod's store and
 * rsp_event's load.
 */
enum { EXIT_SLOT = 0, EXIT_CHECK = 1, EXIT_WOKEN = 2, EXIT_BUDGET = 3, EXIT_OSERROR = 4 };
enum { WAIT_EVTCHN = 1, WAIT_EVENTFD = 2 };
#define IDX_REQ_PROD 0
#define IDX_REQ_EVENT 1
#define IDX_RSP_PROD 2
#define IDX_RSP_EVENT 3

struct ring_state {
    uint32_t *idx; /* the shared header's four indices */
    unsigned char *ring;
    uint32_t size, req_cons, pvt, pushed;
};

/* The channel: an evtchn fd (read() gives ports, write() of our port unmasks it, NOTIFY is an
 * ioctl on it) or the local transport's eventfd pair (read() gives a counter, a write to the peer's
 * eventfd notifies, nothing to unmask). */
struct waiter {
    int kind, fd, notify_fd;
    uint32_t port;
    unsigned long notify_request;
};

static inline uint32_t load_index(const struct ring_state *r, int which)
{
    return __atomic_load_n(&r->idx[which], __ATOMIC_ACQUIRE);
}

/* 0 if the frontend woke us (or the counter moved), 1 if only another port came (the loopback
 * stop), -1 with errno on failure. */
static int wait_event(const struct waiter *w, int *theirs)
{
    uint32_t ports[3]; /* each port of the fd queued at most once until unmasked (ring.py's take) */
    ssize_t got;
    do
        got = read(w->fd, ports, w->kind == WAIT_EVTCHN ? sizeof ports : sizeof(uint64_t));
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return -1;
    if (w->kind == WAIT_EVENTFD) {
        *theirs = 1;
        return 0;
    }
    *theirs = 0;
    int other = 0;
    for (ssize_t i = 0; i < got / (ssize_t)sizeof(uint32_t); i++) {
        if (ports[i] == w->port)
            *theirs = 1;
        else
            other = 1;
    }
    return other;
}

static int unmask_event(const struct waiter *w)
{
    if (w->kind != WAIT_EVTCHN)
        return 0;
    ssize_t put;
    do
        put = write(w->fd, &w->port, sizeof w->port);
    while (put < 0 && errno == EINTR);
    return put == (ssize_t)sizeof w->port ? 0 : -1;
}

static int notify_event(const struct waiter *w)
{
    if (w->kind == WAIT_EVTCHN) {
        uint32_t arg = w->port;
        return ioctl(w->notify_fd, w->notify_request, &arg) < 0 ? -1 : 0;
    }
    uint64_t one = 1;
    ssize_t put = write(w->notify_fd, &one, sizeof one);
    /* a full counter means an event is pending already: coalesced, as LocalEventChannel.notify */
    return put == (ssize_t)sizeof one || (put < 0 && errno == EAGAIN) ? 0 : -1;
}

/* The interned attribute names report() adds to (module init). */
static PyObject *attr_requests, *attr_ok, *attr_wakeups, *attr_notifies, *attr_served;

static int add_attr(PyObject *obj, PyObject *name, Py_ssize_t delta)
{
    if (delta == 0)
        return 0;
    PyObject *old = PyObject_GetAttr(obj, name);
    if (old == NULL)
        return -1;
    PyObject *d = PyLong_FromSsize_t(delta);
    PyObject *sum = d == NULL ? NULL : PyNumber_Add(old, d);
    Py_DECREF(old);
    Py_XDECREF(d);
    int rc = sum == NULL ? -1 : PyObject_SetAttr(obj, name, sum);
    Py_XDECREF(sum);
    return rc;
}

/* The counts since the last report into the data plane's QueueStats and NativeCopy.served, with
 * the GIL (taken here if `ts`): before each sleep and at the exit, so the stats are as live as
 * Python's path keeps them. Safe without DataPlane's lock: while the ring is lent no request is
 * outstanding elsewhere, so no worker writes these stats, and the ring thread is the one running
 * this. -1 with a Python error (the GIL held then). */
static int report(PyThreadState **ts, PyObject *stats, PyObject *owner, Py_ssize_t counts[3])
{
    if (counts[0] == 0 && counts[1] == 0 && counts[2] == 0)
        return 0;
    if (ts != NULL)
        PyEval_RestoreThread(*ts);
    int rc = add_attr(stats, attr_requests, counts[0]) < 0 || add_attr(stats, attr_ok, counts[0]) < 0 ||
                     add_attr(owner, attr_served, counts[0]) < 0 || add_attr(stats, attr_wakeups, counts[1]) < 0 ||
                     add_attr(stats, attr_notifies, counts[2]) < 0
                 ? -1
                 : 0;
    if (rc == 0 && ts != NULL)
        *ts = PyEval_SaveThread();
    counts[0] = counts[1] = counts[2] = 0;
    return rc;
}

/* loop(ring, ring_size, req_cons, rsp_prod_pvt, rsp_pushed, pending, batch, budget, stop, stats, owner,
 *      (kind, fd, port, notify_fd, notify_request),
 *      id_offset, sectors, size_bytes, logical_block_size, read_only, fd, write_fd, read_mode,
 *      write_mode, host_page, bounce, domid, copy_fd, copier)
 *   -> (exit, req_cons, rsp_prod_pvt, rsp_pushed, pending, copy | None, index, count,
 *       requests, errno, notify_errno)
 * `pending`: a wake-up's late unmask is owed; `stop`: a writable byte, nonzero when the ring stops;
 * `stats`: the QueueStats and `owner` the NativeCopy whose counts it keeps (report()). */
static PyObject *gc_loop(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer ringb, stopb, bounce;
    Py_ssize_t ring_size, batch, budget, id_offset, lbs, host_page;
    unsigned long long req_cons, pvt, pushed;
    PyObject *sectors_o, *size_o, *copier, *stats, *owner;
    int pending, read_only, fd, wfd, modes[2], copy_fd;
    unsigned int domid;
    struct waiter w;
    unsigned int wport;
    if (!PyArg_ParseTuple(args, "w*nKKKpnnw*OO(iiIik)nOOnpiiiinw*IiO", &ringb, &ring_size, &req_cons, &pvt,
                          &pushed, &pending, &batch, &budget, &stopb, &stats, &owner, &w.kind, &w.fd, &wport, &w.notify_fd,
                          &w.notify_request, &id_offset, &sectors_o, &size_o, &lbs, &read_only, &fd, &wfd,
                          &modes[OP_READ], &modes[OP_WRITE], &host_page, &bounce, &domid, &copy_fd, &copier))
        return NULL;
    w.port = wport;
    struct pass p;
    memset(&p, 0, sizeof p);
    unsigned char *copy = NULL;
    uint64_t *ids = NULL;
    uint8_t *ops = NULL;
    PyObject *out = NULL;
    if (batch <= 0 || batch > MAX_SLOTS || ring_size <= 0 || ring_size > MAX_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "loop: batch or ring size outside 1..1024");
        goto done;
    }
    /* a take holds at most the ring's size (take_slots(batch) on a smaller ring) */
    Py_ssize_t room = batch < ring_size ? batch : ring_size;
    if (pass_setup(&p, id_offset, sectors_o, size_o, lbs, read_only, fd, wfd, modes[OP_READ], modes[OP_WRITE],
                   host_page, &bounce, domid, copy_fd, copier, room) < 0)
        goto done;
    if ((ring_size & (ring_size - 1)) ||
        ringb.len < SRING_HEADER + ring_size * p.esize || ((uintptr_t)ringb.buf & 3) || req_cons > 0xFFFFFFFFull ||
        pvt > 0xFFFFFFFFull || pushed > 0xFFFFFFFFull || budget <= 0 ||
        stopb.len < 1 || (w.kind != WAIT_EVTCHN && w.kind != WAIT_EVENTFD) || w.fd < 0 || w.notify_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "loop: bad ring geometry, indices, batch, budget, stop word or channel");
        goto done;
    }
    if ((uint32_t)req_cons != (uint32_t)pvt) {
        PyErr_SetString(PyExc_ValueError, "loop: requests outstanding (it must own the response side)");
        goto done;
    }
    copy = PyMem_Malloc((size_t)room * (size_t)p.esize);
    ids = PyMem_Malloc((size_t)room * sizeof *ids);
    ops = PyMem_Malloc((size_t)room);
    if (copy == NULL || ids == NULL || ops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    struct ring_state r = {(uint32_t *)ringb.buf, ringb.buf, (uint32_t)ring_size, (uint32_t)req_cons,
                           (uint32_t)pvt, (uint32_t)pushed};
    const volatile unsigned char *stop = stopb.buf;
    const uint32_t mask = r.size - 1;
    const size_t esize = (size_t)p.esize, rsize = response_size(id_offset == 8);
    Py_ssize_t requests = 0, index = 0, count = 0;
    Py_ssize_t counts[3] = {0, 0, 0}; /* requests, wake-ups, notifies not yet in the stats */
    int why = EXIT_WOKEN, err = 0, notify_err = 0;
    PyThreadState *ts = PyEval_SaveThread();
    p.ts = &ts;
    for (;;) {
        if (*stop) {
            why = EXIT_WOKEN;
            break;
        }
        /* take: req_prod once; more outstanding than the ring holds is Python's to judge */
        uint32_t ahead = load_index(&r, IDX_REQ_PROD) - r.req_cons;
        if (ahead > r.size) {
            why = EXIT_CHECK;
            break;
        }
        if (ahead > 0) {
            uint32_t n = ahead < (uint32_t)room ? ahead : (uint32_t)room;
            uint32_t first = r.req_cons & mask, head = r.size - first < n ? r.size - first : n;
            const unsigned char *entries = r.ring + SRING_HEADER;
            memcpy(copy, entries + first * esize, head * esize);
            if (head < n)
                memcpy(copy + head * esize, entries, (n - head) * esize);
            r.req_cons += n;
            count = n;
            index = serve_slots(&p, copy, 0, count, ids, ops);
            unsigned char rsp[16];
            for (Py_ssize_t k = 0; k < index; k++) {
                pack_response(rsp, ids[k], ops[k], 0);
                r.pvt = answer_into_ring(r.ring, r.pvt, mask, esize, rsp, rsize);
            }
            requests += index;
            counts[0] += index;
            /* push: RING_PUSH_RESPONSES_AND_CHECK_NOTIFY */
            if (r.pvt != r.pushed) {
                uint32_t old = r.pushed;
                __atomic_store_n(&r.idx[IDX_RSP_PROD], r.pvt, __ATOMIC_RELEASE);
                r.pushed = r.pvt;
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                uint32_t rsp_event = load_index(&r, IDX_RSP_EVENT);
                if ((uint32_t)(r.pvt - rsp_event) < (uint32_t)(r.pvt - old)) {
                    counts[2]++;
                    if (notify_event(&w) < 0)
                        notify_err = errno; /* Python logs it as _notify does, and goes on */
                }
            }
            if (index < count) {
                why = EXIT_SLOT;
                break;
            }
            count = index = 0;
            if (requests >= budget || notify_err) {
                why = EXIT_BUDGET;
                break;
            }
            if (n >= (uint32_t)batch)
                continue;
        }
        if (pending) { /* the late EOI, after the answers are out (DataPlane._run's order) */
            if (unmask_event(&w) < 0) {
                err = errno;
                why = EXIT_OSERROR;
                break;
            }
            pending = 0;
        }
        /* the final check: req_event, a full fence, req_prod again */
        if (load_index(&r, IDX_REQ_PROD) != r.req_cons)
            continue;
        __atomic_store_n(&r.idx[IDX_REQ_EVENT], r.req_cons + 1, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (load_index(&r, IDX_REQ_PROD) != r.req_cons)
            continue;
        if (report(&ts, stats, owner, counts) < 0) {
            why = -1; /* a Python error: the GIL is held */
            break;
        }
        int theirs = 0;
        int got = wait_event(&w, &theirs);
        if (got < 0) {
            err = errno;
            why = EXIT_OSERROR;
            break;
        }
        if (*stop) { /* as DataPlane._run: a wake-up that comes with the stop is not counted */
            why = EXIT_WOKEN;
            break;
        }
        if (theirs) {
            pending = 1;
            counts[1]++;
        }
        if (got > 0) {
            why = EXIT_WOKEN;
            break;
        }
    }
    if (why < 0)
        goto done;
    PyEval_RestoreThread(ts);
    if (report(NULL, stats, owner, counts) < 0)
        goto done;
    PyObject *batch_copy = Py_None;
    if (why == EXIT_SLOT) {
        batch_copy = PyBytes_FromStringAndSize((const char *)copy, count * p.esize);
        if (batch_copy == NULL)
            goto done; /* the ring's state is lost with it: the data plane treats it as a bug of ours */
    } else {
        Py_INCREF(batch_copy);
    }
    out = Py_BuildValue("(ikkkiNnnnii)", why, (unsigned long)r.req_cons, (unsigned long)r.pvt,
                        (unsigned long)r.pushed, pending, batch_copy, index, count, requests, err, notify_err);
done:
    PyMem_Free(copy);
    PyMem_Free(ids);
    PyMem_Free(ops);
    pass_free(&p);
    PyBuffer_Release(&bounce);
    PyBuffer_Release(&stopb);
    PyBuffer_Release(&ringb);
    return out;
}

/* check(slot, offset, id_offset, sectors, size_bytes, logical_block_size, read_only)
 *   -> None | (id, op, byte_offset, length, ((gref, page_offset, page_length), ...)): the decoder
 * alone, for the agreement tests */
static PyObject *gc_check(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer slot;
    Py_ssize_t offset, id_offset, lbs;
    PyObject *sectors_o, *size_o, *out = NULL;
    int read_only;
    if (!PyArg_ParseTuple(args, "y*nnOOnp", &slot, &offset, &id_offset, &sectors_o, &size_o, &lbs, &read_only))
        return NULL;
    struct limits lim;
    struct creq r;
    if (parse_limits(sectors_o, size_o, lbs, read_only, id_offset, 0, &lim) < 0)
        goto done;
    if (entry_fits(&slot, offset, id_offset) < 0)
        goto done;
    if (!decode((const unsigned char *)slot.buf + offset, &lim, &r)) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    const struct segments seg = {r.gref, r.pofs, r.plen};
    out = decoded_value(r.id, r.op, r.offset, r.length, r.nseg, &seg);
done:
    PyBuffer_Release(&slot);
    return out;
}

static PyMethodDef methods[] = {
    {"serve", gc_serve, METH_VARARGS, "Serve a prefix of a pass's simple requests by grant copy."},
    {"loop", gc_loop, METH_VARARGS, "Wait for, serve, answer and notify a ring's simple requests."},
    {"check", gc_check, METH_VARARGS, "Decode one slot as serve() does (for the agreement tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_grantcopy", "The native grant-copy pass (see backend/grantcopy.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__grantcopy(void)
{
    attr_requests = PyUnicode_InternFromString("requests");
    attr_ok = PyUnicode_InternFromString("ok");
    attr_wakeups = PyUnicode_InternFromString("wakeups");
    attr_notifies = PyUnicode_InternFromString("notifies");
    attr_served = PyUnicode_InternFromString("served");
    if (attr_requests == NULL || attr_ok == NULL || attr_wakeups == NULL || attr_notifies == NULL ||
        attr_served == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "SEGMENT_SIZE", (long)sizeof(struct copyseg)) < 0 ||
        PyModule_AddIntConstant(m, "MODE_STOP", MODE_STOP) < 0 ||
        PyModule_AddIntConstant(m, "MODE_NOWAIT", MODE_NOWAIT) < 0 ||
        PyModule_AddIntConstant(m, "MODE_BLOCK", MODE_BLOCK) < 0 ||
        PyModule_AddIntConstant(m, "MODE_BLOCK_ALIGNED", MODE_BLOCK_ALIGNED) < 0 ||
        PyModule_AddIntConstant(m, "EXIT_SLOT", EXIT_SLOT) < 0 || PyModule_AddIntConstant(m, "EXIT_CHECK", EXIT_CHECK) < 0 ||
        PyModule_AddIntConstant(m, "EXIT_WOKEN", EXIT_WOKEN) < 0 ||
        PyModule_AddIntConstant(m, "EXIT_BUDGET", EXIT_BUDGET) < 0 ||
        PyModule_AddIntConstant(m, "EXIT_OSERROR", EXIT_OSERROR) < 0 ||
        PyModule_AddIntConstant(m, "WAIT_EVTCHN", WAIT_EVTCHN) < 0 ||
        PyModule_AddIntConstant(m, "WAIT_EVENTFD", WAIT_EVENTFD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
