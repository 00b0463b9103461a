/*
 * The blkif request slot as both native passes decode it (_fastpass.c for persistent grants,
 * _grantcopy.c for grant copy): the layout constants, the device limits a request is checked
 * against, and the rules of requests.validate_slot for a READ/WRITE's segments and range.
 *
 * Written once here because these are the guest-facing validation rules: two copies would drift,
 * and a drift is a hostile frontend's way past one of them. requests.py stays the reference; each
 * pass's tests (tests/unit/test_fastpass.py, test_grantcopy_native.py) compare its decoder with
 * validate_slot on arbitrary bytes. Everything is static inline: each extension compiles its own
 * copy of the same source.
 */
#ifndef XENBLOCKCTL_BLKIF_SLOT_H
#define XENBLOCKCTL_BLKIF_SLOT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define SEGS_MAX 11 /* BLKIF_MAX_SEGMENTS_PER_REQUEST */
#define PAGE 4096
#define SECTOR 512
#define LAST_SECT 7 /* PAGE / SECTOR - 1 */
#define SEG_SIZE 8  /* struct blkif_request_segment: gref u32, first u8, last u8, pad u16 */
#define IND_SEGS_MAX 4096 /* 8 pages of 512 descriptors */
#define OP_READ 0
#define OP_WRITE 1
#define MAX_SLOTS 1024 /* more than any ring holds (BLKIF ring of 16 pages: 512 slots) */

/* what to do with a READ or WRITE once it is valid (fastpath.py works it out from io.Executor) */
enum mode {
    MODE_STOP = 0,          /* not here: Python hands it to the worker pool */
    MODE_NOWAIT = 1,        /* RWF_NOWAIT: anything short of done in full goes back to Python */
    MODE_BLOCK = 2,         /* inline, may block (workers=0) */
    MODE_BLOCK_ALIGNED = 3, /* inline if the range covers whole host pages, else MODE_STOP */
    MODE_GATED = 4,         /* a group's buffered write: MODE_BLOCK_ALIGNED while its device's write
                             * gate is open (write_gate.h), else MODE_STOP; MODE_STOP without a gate */
};

struct limits {
    uint64_t sectors;        /* the device's 512-byte units */
    uint64_t size_bytes;     /* io._out_of_bounds' second guard */
    uint64_t lbs_mask;       /* logical_block_size / 512 - 1 */
    int read_only;
    Py_ssize_t id_offset;    /* 8: x86_64 layout, 4: x86_32 */
    Py_ssize_t max_indirect; /* feature-max-indirect-segments advertised (0: none) */
};

/* A READ/WRITE's segments as decoded: the caller's arrays, at least nseg long. */
struct segments {
    uint32_t *gref;
    uint16_t *pofs; /* byte offset in the page */
    uint16_t *plen; /* bytes in the page */
};

static inline uint64_t get_u64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v); /* native order, as struct's "=" on the little-endian dom0 */
    return v;
}

static inline uint32_t get_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint16_t get_u16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline Py_ssize_t entry_size(Py_ssize_t id_offset)
{
    return id_offset + 16 + SEGS_MAX * SEG_SIZE; /* header + 11 descriptors: 112 or 108 */
}

/* requests._plan on copied descriptors: each first_sect <= last_sect <= 7, the range inside the
 * device and aligned to the logical block size. 1: valid (seg filled, *offset and *length set). */
static inline int plan_segments(const unsigned char *desc, unsigned nseg, uint64_t sector,
                                const struct limits *lim, const struct segments *seg,
                                uint64_t *offset, uint64_t *length)
{
    uint64_t total = 0; /* <= 4096 * 8 */
    for (unsigned i = 0; i < nseg; i++, desc += SEG_SIZE) {
        uint8_t first = desc[4], last = desc[5];
        if (last > LAST_SECT || first > last)
            return 0;
        unsigned n = (unsigned)last - first + 1;
        seg->gref[i] = get_u32(desc);
        seg->pofs[i] = (uint16_t)(first * SECTOR);
        seg->plen[i] = (uint16_t)(n * SECTOR);
        total += n;
    }
    /* sector + total > sectors, without overflowing for a hostile sector near 2**64 */
    if (sector > lim->sectors || total > lim->sectors - sector)
        return 0;
    if ((sector | total) & lim->lbs_mask)
        return 0;
    *offset = sector * SECTOR; /* sector <= sectors < 2**55: no overflow */
    *length = total * SECTOR;
    if (*offset > lim->size_bytes || *length > lim->size_bytes - *offset)
        return 0;
    return 1;
}

/* requests._check_segments' header rules for a READ/WRITE with direct segments (slot: entry_size
 * bytes of the private copy): its segment count (1..11) if it may be served, 0 if it is another
 * operation or refused (Python's path refuses it again, with its reason). */
static inline unsigned direct_nseg(const unsigned char *slot, const struct limits *lim)
{
    uint8_t op = slot[0], nseg = slot[1];
    if (op != OP_READ && op != OP_WRITE)
        return 0;
    if (nseg == 0 || nseg > SEGS_MAX)
        return 0;
    if (lim->read_only && op != OP_READ)
        return 0;
    return nseg;
}

/* A valid request's mode: MODE_BLOCK_ALIGNED and MODE_GATED resolved against the host page size
 * (a gated write that covers whole pages stays MODE_GATED, for its pass to ask the gate). */
static inline int resolve_mode(int mode, uint64_t offset, uint64_t length, Py_ssize_t host_page)
{
    if (mode == MODE_BLOCK_ALIGNED || mode == MODE_GATED)
        return ((offset | length) & (uint64_t)(host_page - 1)) ? MODE_STOP : mode == MODE_GATED ? mode : MODE_BLOCK;
    return mode;
}

/* The device limits from serve's/check's arguments; -1 with a Python error if they make no sense. */
static inline int parse_limits(PyObject *sectors_o, PyObject *size_o, Py_ssize_t lbs, int read_only,
                               Py_ssize_t id_offset, Py_ssize_t max_indirect, struct limits *lim)
{
    unsigned long long sectors = PyLong_AsUnsignedLongLong(sectors_o);
    if (sectors == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    unsigned long long size = PyLong_AsUnsignedLongLong(size_o);
    if (size == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (sectors > (UINT64_MAX / SECTOR) / 2 || size > UINT64_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "device too large");
        return -1;
    }
    if (lbs < SECTOR || lbs > PAGE || (lbs & (lbs - 1))) {
        PyErr_SetString(PyExc_ValueError, "logical block size must be a power of two in 512..4096");
        return -1;
    }
    if (id_offset != 4 && id_offset != 8) {
        PyErr_SetString(PyExc_ValueError, "id_offset must be 4 (x86_32) or 8 (x86_64)");
        return -1;
    }
    if (max_indirect < 0 || max_indirect > IND_SEGS_MAX) {
        PyErr_SetString(PyExc_ValueError, "max_indirect_segments outside 0..4096");
        return -1;
    }
    lim->sectors = sectors;
    lim->size_bytes = size;
    lim->lbs_mask = (uint64_t)(lbs / SECTOR) - 1;
    lim->read_only = read_only;
    lim->id_offset = id_offset;
    lim->max_indirect = max_indirect;
    return 0;
}

/* check()'s slot argument: -1 with a Python error unless `offset` leaves one whole ring entry. */
static inline int entry_fits(const Py_buffer *slot, Py_ssize_t offset, Py_ssize_t id_offset)
{
    if (offset < 0 || offset > slot->len || slot->len - offset < entry_size(id_offset)) {
        PyErr_SetString(PyExc_ValueError, "slot shorter than one ring entry");
        return -1;
    }
    return 0;
}

/* check()'s verdict for a valid request, the shape the agreement tests compare with
 * validate_slot's IoPlan: (id, op, byte_offset, length, ((gref, page_offset, page_length), ...)). */
static inline PyObject *decoded_value(uint64_t id, uint8_t op, uint64_t offset, uint64_t length,
                                      unsigned nseg, const struct segments *seg)
{
    PyObject *segs = PyTuple_New(nseg);
    if (segs == NULL)
        return NULL;
    for (unsigned i = 0; i < nseg; i++) {
        PyObject *t = Py_BuildValue("(kHH)", (unsigned long)seg->gref[i], seg->pofs[i], seg->plen[i]);
        if (t == NULL) {
            Py_DECREF(segs);
            return NULL;
        }
        PyTuple_SET_ITEM(segs, i, t);
    }
    return Py_BuildValue("(KBKKN)", (unsigned long long)id, op, (unsigned long long)offset,
                         (unsigned long long)length, segs);
}

/* A served request's answer as serve() returns it: (id, op, RSP_OKAY), the tuple respond() and
 * ring.py's respond_all take. Not Py_BuildValue: its format parsing cost more than the tuple
 * (perf, the 4 KiB rows). NULL with a Python error only if memory runs out. */
static inline PyObject *okay_answer(uint64_t id, uint8_t op)
{
    PyObject *t = PyTuple_New(3);
    if (t == NULL)
        return NULL;
    PyObject *rid = PyLong_FromUnsignedLongLong(id);
    if (rid == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, rid);
    PyTuple_SET_ITEM(t, 1, PyLong_FromLong(op)); /* small ints: cached, cannot fail */
    PyTuple_SET_ITEM(t, 2, PyLong_FromLong(0));
    return t;
}

#endif
