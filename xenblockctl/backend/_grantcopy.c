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
#include "ring_loop.h"

#include <sys/uio.h>

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
 * third of it the gap to kernel blkback). loop() runs ring_loop.h's cycle with serve_slots() as
 * its serve step (the copier of the local transport takes the GIL for its call).
 */
static Py_ssize_t gc_loop_serve(void *ctx, const unsigned char *copy, Py_ssize_t start, Py_ssize_t count,
                                int after_sleep, uint64_t *ids, uint8_t *ops, PyThreadState **ts, int *more)
{
    (void)after_sleep;
    (void)more;
    struct pass *p = ctx;
    p->ts = ts;
    return serve_slots(p, copy, start, count, ids, ops);
}

/* loop(<ring_loop.h's LOOP_ARGS>, id_offset, sectors, size_bytes, logical_block_size, read_only, fd,
 *      write_fd, read_mode, write_mode, host_page, bounce, domid, copy_fd, copier)
 *   -> ring_loop()'s tuple; `owner` is the NativeCopy whose `served` it counts. */
static PyObject *gc_loop(PyObject *self, PyObject *args)
{
    (void)self;
    struct loop_args a;
    PyObject *rest = NULL, *out = NULL;
    if (loop_parse(args, &a, &rest) < 0)
        return NULL;
    Py_buffer bounce;
    Py_ssize_t id_offset, lbs, host_page;
    PyObject *sectors_o, *size_o, *copier;
    int read_only, fd, wfd, modes[2], copy_fd;
    unsigned int domid;
    if (!PyArg_ParseTuple(rest, "nOOnpiiiinw*IiO", &id_offset, &sectors_o, &size_o, &lbs, &read_only, &fd, &wfd,
                          &modes[OP_READ], &modes[OP_WRITE], &host_page, &bounce, &domid, &copy_fd, &copier)) {
        Py_DECREF(rest);
        loop_release(&a);
        return NULL;
    }
    struct pass p;
    if (pass_setup(&p, id_offset, sectors_o, size_o, lbs, read_only, fd, wfd, modes[OP_READ], modes[OP_WRITE],
                   host_page, &bounce, domid, copy_fd, copier, a.room) == 0) {
        const struct loop_pass lp = {&p, gc_loop_serve, NULL, p.esize, id_offset == 8, NULL, 0};
        out = ring_loop(&a, &lp);
    }
    pass_free(&p);
    PyBuffer_Release(&bounce);
    Py_DECREF(rest);
    loop_release(&a);
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
    if (loop_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "SEGMENT_SIZE", (long)sizeof(struct copyseg)) < 0 ||
        PyModule_AddIntConstant(m, "MODE_STOP", MODE_STOP) < 0 ||
        PyModule_AddIntConstant(m, "MODE_NOWAIT", MODE_NOWAIT) < 0 ||
        PyModule_AddIntConstant(m, "MODE_BLOCK", MODE_BLOCK) < 0 ||
        PyModule_AddIntConstant(m, "MODE_BLOCK_ALIGNED", MODE_BLOCK_ALIGNED) < 0 ||
        loop_add_constants(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
