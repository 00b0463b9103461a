/*
 * One answer written into the shared ring by ring.py's journal protocol (issue 21), for both native
 * passes: _fastpass.c's respond() and _grantcopy.c's wait-and-serve loop. Written once here, as
 * blkif_slot.h holds the slot's rules: two copies of the order below would drift, and a drift
 * breaks what a successor engine recovers from the journal (ring.py's module docstring, handover.py).
 *
 * Per answer, in ring.py's order (BackRing.respond_all): the response into the journal (header
 * offset 44), TAG = its ring index, the response into its slot, COMMITTED = index + 1. Stores to
 * shared memory are plain stores kept in program order by the compiler (x86 TSO orders them for
 * the other side, as ring.py relies on): release stores for the two index words, a compiler
 * barrier after each and after the slot's bytes.
 */
#ifndef XENBLOCKCTL_RING_ANSWER_H
#define XENBLOCKCTL_RING_ANSWER_H

#include <stdint.h>
#include <string.h>

#define SRING_HEADER 64
#define JOURNAL_COMMITTED 36 /* byte offsets of ring.py's journal words and response copy */
#define JOURNAL_TAG 40
#define JOURNAL_RESPONSE 44

static inline void store_index(unsigned char *at, uint32_t value)
{
    __atomic_store_n((uint32_t *)(void *)at, value, __ATOMIC_RELEASE);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* sizeof(struct blkif_response): x86_64 pads it to 16, x86_32 packs it in 12 */
static inline size_t response_size(int x86_64)
{
    return x86_64 ? 16 : 12;
}

/* struct blkif_response's bytes for (id, op, status): response_size() of them; `out` holds 16,
 * zeroed here so padding goes out as zeros (XSA-216). */
static inline void pack_response(unsigned char out[16], uint64_t id, uint8_t op, int16_t status)
{
    memset(out, 0, 16);
    memcpy(out, &id, 8);
    out[8] = op;
    memcpy(out + 10, &status, 2);
}

/* Answer the request at ring index `pvt` (the oldest unanswered, nothing held: the caller knows)
 * with the packed response `rsp` of `rsize` bytes; returns the new rsp_prod_pvt. `ring` is the
 * shared ring's first byte (the header), `mask` the ring size - 1, `esize` the entry size. */
static inline uint32_t answer_into_ring(unsigned char *ring, uint32_t pvt, uint32_t mask, size_t esize,
                                        const unsigned char *rsp, size_t rsize)
{
    memcpy(ring + JOURNAL_RESPONSE, rsp, rsize);
    store_index(ring + JOURNAL_TAG, pvt);
    memcpy(ring + SRING_HEADER + (size_t)(pvt & mask) * esize, rsp, rsize);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    pvt++;
    store_index(ring + JOURNAL_COMMITTED, pvt);
    return pvt;
}

#endif
