/* A native blkfront hot loop for bench/many_disks.py (--frontend native, issue 20).
 *
 * Why: the bench's Python frontends cost 4.8-6.1 us a request on the engine's own CPUs while the
 * engine costs ~1.1 us (bench/README.md, the many_disks sections), so the many-disk rows measured
 * the harness. A guest's blkfront is kernel C on CPUs of its own; this loop is the closest the local
 * transport allows.
 *
 * The Python frontend process does the handshake exactly as before (LocalFrontend: memfd of grant
 * pages, registration with the engine's LocalTransport, event channel) and then starts this
 * program with, per ring, the memfd and the eventfd pair inherited. Grant ref gref_base + N is page
 * N of the memfd: the ring is page 0, request slot i reads into page first_data + i.
 *
 * Protocol: argv = SECONDS WARM_SECONDS SEED BLOCKS SHUFFLE RING...; RING =
 * "disk,memfd,recv_fd,send_fd,gref_base,ring_size,first_data,depth[,pages]". It maps every ring, submits
 * nothing until a line arrives on stdin ("go"), runs WARM_SECONDS + SECONDS keeping `depth` reads
 * of 4 KiB at random blocks outstanding per ring, counts and times only the completions of the
 * last SECONDS, then stops resubmitting, drains every ring, prints one line per disk
 * ("disk D COMPLETED P50_NS P99_NS") and "failures N", and waits for stdin to close before it exits
 * (its parent reads its CPU time while it is still alive). Stdin closing earlier (its Python process
 * killed by a failed row) stops it at once, without the drain. x86_64 ring layout, one-page rings.
 *
 * Every response is checked: its id names a request in flight on that ring, op READ, status OK;
 * and the data: the image's block B starts with B (u64 LE) and ends with ~B, and each data page
 * is poisoned before its read is submitted, so a read of the wrong block, a short read or no
 * write at all are all caught. A failure is reported on stderr and makes the run fail.
 *
 * A ring with `pages` > 0 writes instead (issue 20, wiso20: many_disks --writers): `pages` whole
 * pages a request (direct segments, at most 11) at a random block aligned to `pages`, each page
 * stamped as the image is (block number first, its complement last), so the image stays valid for
 * the readers; slot i uses pages first_data + i * pages on. Its answers are checked for id, WRITE
 * and OK.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define SECTORS_PER_PAGE 8u
#define HEADER 64u /* struct blkif_sring: four indices and padding */
#define ENTRY 112u /* x86_64 blkif_request (the largest member of the ring's union) */
#define OP_READ 0u
#define OP_WRITE 1u
#define SEGS_MAX 11u
#define MAX_DEPTH 32u
#define POISON UINT64_MAX /* no block number: a page still holding it was never written */
#define MAX_REPORTS 10
#define STDIN_MARK UINT32_MAX /* epoll data of stdin, beside the rings' indices */

struct sring {
    volatile uint32_t req_prod, req_event, rsp_prod, rsp_event;
};

struct ring {
    int disk, recv_fd, send_fd;
    uint32_t gref_base, size, first_data, depth;
    uint32_t pages; /* > 0: a writer of this many pages a request */
    uint8_t *mem;
    size_t mem_len;
    struct sring *s;
    uint32_t req_prod_pvt, rsp_cons;
    uint32_t in_flight;
    uint64_t seq;
    uint64_t expect_id[MAX_DEPTH];
    uint64_t block[MAX_DEPTH];
    uint64_t submitted_ns[MAX_DEPTH];
    uint8_t busy[MAX_DEPTH];
};

/* latency histogram: exact below 64 ns, then 64 buckets per power of two (< 1.6 % error) */
#define SUB 64
#define BUCKETS (SUB + 58 * SUB)
struct disk {
    uint64_t completed;
    uint32_t *hist;
    int driven; /* one of this process's rings is this disk's */
};

static uint64_t failures;
static uint64_t rng_state;
static uint64_t blocks;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t next_random(void) { /* xorshift64*: cheap, and the same sequence every run */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static void fail(const struct ring *r, const char *what, uint64_t a, uint64_t b) {
    if (failures++ < MAX_REPORTS)
        fprintf(stderr, "native frontend: disk %d: %s (%" PRIu64 ", %" PRIu64 ")\n", r->disk, what, a, b);
}

static unsigned bucket(uint64_t v) {
    if (v < SUB)
        return (unsigned)v;
    unsigned m = 63u - (unsigned)__builtin_clzll(v); /* >= 6 */
    unsigned shift = m - 6u;
    unsigned idx = SUB + shift * SUB + (unsigned)((v >> shift) - SUB);
    return idx < BUCKETS ? idx : BUCKETS - 1;
}

static double bucket_mid(unsigned idx) {
    if (idx < SUB)
        return idx;
    unsigned shift = (idx - SUB) / SUB;
    double low = (double)(((idx - SUB) % SUB + SUB) * (1ull << shift));
    return low + (double)(1ull << shift) / 2.0;
}

/* bench/common.percentile's rank: the round(pct/100 * (n - 1))-th smallest */
static double hist_percentile(const struct disk *d, double pct) {
    if (!d->completed)
        return 0.0;
    uint64_t k = (uint64_t)(pct / 100.0 * (double)(d->completed - 1) + 0.5), seen = 0;
    for (unsigned i = 0; i < BUCKETS; i++) {
        seen += d->hist[i];
        if (seen > k)
            return bucket_mid(i);
    }
    return bucket_mid(BUCKETS - 1);
}

/* Request `slot` into the ring: `op` of `npages` whole pages from page first_data + first on, at
 * `block`. */
static void put_request(struct ring *r, uint32_t slot, uint64_t t, uint8_t op, uint64_t block, uint32_t first,
                        uint32_t npages) {
    uint64_t id = (++r->seq << 8) | slot;
    uint8_t *req = r->mem + HEADER + (size_t)(r->req_prod_pvt & (r->size - 1)) * ENTRY;
    uint64_t sector = block * SECTORS_PER_PAGE;
    memset(req, 0, 24 + 8 * npages);
    req[0] = op;
    req[1] = (uint8_t)npages; /* nr_segments */
    memcpy(req + 8, &id, 8);
    memcpy(req + 16, &sector, 8);
    for (uint32_t k = 0; k < npages; k++) { /* segment k: the whole page, sectors 0..7 */
        uint32_t gref = r->gref_base + r->first_data + first + k;
        memcpy(req + 24 + 8 * k, &gref, 4);
        req[24 + 8 * k + 4] = 0;
        req[24 + 8 * k + 5] = SECTORS_PER_PAGE - 1;
    }
    r->req_prod_pvt++;
    r->expect_id[slot] = id;
    r->block[slot] = block;
    r->submitted_ns[slot] = t;
    r->busy[slot] = 1;
    r->in_flight++;
}

static void submit(struct ring *r, uint32_t slot, uint64_t t) {
    if (r->pages) { /* a writer: its pages stamped as the image's blocks are */
        uint64_t block = next_random() % (blocks / r->pages) * r->pages;
        for (uint32_t k = 0; k < r->pages; k++) {
            uint8_t *page = r->mem + (size_t)(r->first_data + slot * r->pages + k) * PAGE;
            uint64_t head = block + k, tail = ~(block + k);
            memcpy(page, &head, 8);
            memcpy(page + PAGE - 8, &tail, 8);
        }
        put_request(r, slot, t, OP_WRITE, block, slot * r->pages, r->pages);
        return;
    }
    uint8_t *page = r->mem + (size_t)(r->first_data + slot) * PAGE;
    uint64_t block = next_random() % blocks, poison = POISON;
    memcpy(page, &poison, 8);
    memcpy(page + PAGE - 8, &poison, 8);
    put_request(r, slot, t, OP_READ, block, slot, 1);
}

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY */
static void push(struct ring *r) {
    uint32_t old = r->s->req_prod, new = r->req_prod_pvt;
    if (old == new)
        return;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* wmb: the slots before the index */
    r->s->req_prod = new;
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* mb: the req_event load after the store */
    if ((uint32_t)(new - r->s->req_event) < (uint32_t)(new - old)) {
        uint64_t one = 1;
        if (write(r->send_fd, &one, 8) != 8 && errno != EAGAIN)
            fail(r, "notify failed", (uint64_t)errno, 0);
    }
}

/* One response: checked, timed, and (while `resubmit`) its slot reused at once. */
static void complete(struct ring *r, const uint8_t *rsp, struct disk *d, uint64_t t, int measuring,
                     int resubmit) {
    uint64_t id;
    int16_t status;
    memcpy(&id, rsp, 8);
    memcpy(&status, rsp + 10, 2);
    uint32_t slot = (uint32_t)(id & 0xff);
    if (slot >= r->depth || !r->busy[slot] || r->expect_id[slot] != id) {
        fail(r, "response for an id not in flight", id, slot);
        return;
    }
    r->busy[slot] = 0;
    r->in_flight--;
    const uint8_t *page = r->mem + (size_t)(r->first_data + slot) * PAGE;
    uint64_t head, tail;
    memcpy(&head, page, 8);
    memcpy(&tail, page + PAGE - 8, 8);
    if (r->pages) {
        if (rsp[8] != OP_WRITE || status != 0)
            fail(r, "response op/status not WRITE/OK", rsp[8], (uint64_t)(int64_t)status);
    } else if (rsp[8] != OP_READ || status != 0)
        fail(r, "response op/status not READ/OK", rsp[8], (uint64_t)(int64_t)status);
    else if (head != r->block[slot] || tail != ~r->block[slot])
        fail(r, "data mismatch: block read, block asked", head, r->block[slot]);
    if (measuring) {
        d->completed++;
        d->hist[bucket(t - r->submitted_ns[slot])]++;
    }
    if (resubmit)
        submit(r, slot, t);
}

/* Every response published now, rsp_event re-armed (RING_FINAL_CHECK_FOR_RESPONSES). */
static void harvest(struct ring *r, struct disk *d, int measuring, int resubmit) {
    uint64_t t = now_ns();
    unsigned taken = 0;
    for (;;) {
        uint32_t rp = r->s->rsp_prod;
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* rmb: the slots after the index */
        if ((uint32_t)(rp - r->rsp_cons) > r->size) {
            fail(r, "rsp_prod ran past the ring", rp, r->rsp_cons);
            return;
        }
        while (r->rsp_cons != rp) {
            complete(r, r->mem + HEADER + (size_t)(r->rsp_cons & (r->size - 1)) * ENTRY, d, t, measuring,
                     resubmit);
            r->rsp_cons++;
            taken++;
        }
        r->s->rsp_event = r->rsp_cons + 1;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (r->s->rsp_prod == r->rsp_cons)
            break;
    }
    if (taken && resubmit)
        push(r);
}

/* stdin readable while running: its writer (the Python frontend process) is gone, killed by a
 * run that failed elsewhere. Its engine may be stopped already: no drain (it would wait 30 s). */
static void parent_gone(void) {
    char c;
    if (read(0, &c, 1) == 0) {
        fprintf(stderr, "native frontend: the Python frontend process went away; stopping\n");
        exit(3);
    }
}

static void ack(struct ring *r) {
    uint64_t v;
    if (read(r->recv_fd, &v, 8) < 0 && errno != EAGAIN)
        fail(r, "event channel read failed", (uint64_t)errno, 0);
}

static int parse_ring(const char *arg, struct ring *r) {
    unsigned long long v[9] = {0};
    if (sscanf(arg, "%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
               &v[7], &v[8]) < 8)
        return -1;
    r->disk = (int)v[0];
    r->recv_fd = (int)v[2];
    r->send_fd = (int)v[3];
    r->gref_base = (uint32_t)v[4];
    r->size = (uint32_t)v[5];
    r->first_data = (uint32_t)v[6];
    r->depth = (uint32_t)v[7];
    r->pages = (uint32_t)v[8];
    if (r->pages > SEGS_MAX || (r->pages && blocks < r->pages))
        return -1;
    if (!r->size || (r->size & (r->size - 1)) || r->size * ENTRY + HEADER > PAGE || !r->depth ||
        r->depth > MAX_DEPTH || r->depth > r->size)
        return -1;
    struct stat st;
    int memfd = (int)v[1];
    if (fstat(memfd, &st) || (size_t)st.st_size < (size_t)(r->first_data + r->depth * (r->pages ? r->pages : 1)) * PAGE)
        return -1;
    r->mem_len = (size_t)st.st_size;
    r->mem = mmap(NULL, r->mem_len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (r->mem == MAP_FAILED)
        return -1;
    close(memfd);
    r->s = (struct sring *)r->mem;
    r->req_prod_pvt = r->s->req_prod; /* as FrontRing: nothing outstanding when we take over */
    r->rsp_cons = r->s->rsp_prod;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s SECONDS WARM SEED BLOCKS SHUFFLE RING...\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[1]), warm = atof(argv[2]);
    rng_state = strtoull(argv[3], NULL, 10) | 1;
    blocks = strtoull(argv[4], NULL, 10);
    int shuffle = atoi(argv[5]);
    int n = argc - 6, n_disks = 0;
    struct ring *rings = calloc((size_t)n, sizeof *rings);
    if (!rings || !blocks)
        return 2;
    for (int i = 0; i < n; i++) {
        if (parse_ring(argv[6 + i], &rings[i])) {
            fprintf(stderr, "native frontend: bad ring %s: %s\n", argv[6 + i], strerror(errno));
            return 2;
        }
        if (rings[i].disk + 1 > n_disks)
            n_disks = rings[i].disk + 1;
    }
    struct disk *disks = calloc((size_t)n_disks, sizeof *disks);
    if (!disks)
        return 2;
    for (int i = 0; i < n_disks; i++)
        if (!(disks[i].hist = calloc(BUCKETS, sizeof(uint32_t))))
            return 2;
    for (int i = 0; i < n; i++)
        disks[rings[i].disk].driven = 1;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, rings[i].recv_fd, &ev)) {
            perror("native frontend: epoll");
            return 2;
        }
    }
    struct epoll_event in = {.events = EPOLLIN, .data.u32 = STDIN_MARK};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &in)) {
        perror("native frontend: epoll stdin");
        return 2;
    }
    char line[16];
    if (read(0, line, sizeof line) <= 0)
        return 2; /* the Python side went away before "go" */

    uint64_t t = now_ns();
    for (int i = 0; i < n; i++) {
        for (uint32_t slot = 0; slot < rings[i].depth; slot++)
            submit(&rings[i], slot, t);
        push(&rings[i]);
    }
    uint64_t warm_end = t + (uint64_t)(warm * 1e9), end = warm_end + (uint64_t)(seconds * 1e9);
    struct epoll_event *ready = calloc((size_t)n + 1, sizeof *ready);
    if (!ready)
        return 2;
    int measuring = 0;
    for (;;) {
        t = now_ns();
        if (!measuring && t >= warm_end) {
            measuring = 1; /* completions from here on are the row's */
            for (int i = 0; i < n_disks; i++) {
                disks[i].completed = 0;
                memset(disks[i].hist, 0, BUCKETS * sizeof(uint32_t));
            }
        }
        if (t >= end || failures)
            break;
        int got = epoll_wait(ep, ready, n + 1, 100);
        if (got < 0 && errno != EINTR) {
            perror("native frontend: epoll_wait");
            return 2;
        }
        /* each disk is its own guest: no ring first every time (bench/many_disks.py, many20) */
        for (int i = got - 1; shuffle && i > 0; i--) {
            int j = (int)(next_random() % (uint64_t)(i + 1));
            struct epoll_event tmp = ready[i];
            ready[i] = ready[j];
            ready[j] = tmp;
        }
        for (int i = 0; i < got; i++) {
            if (ready[i].data.u32 == STDIN_MARK) {
                parent_gone();
                continue;
            }
            struct ring *r = &rings[ready[i].data.u32];
            ack(r);
            harvest(r, &disks[r->disk], measuring, 1);
        }
    }
    /* drain: every request answered (and checked) before the engine's data planes stop */
    uint64_t give_up = now_ns() + 30000000000ull;
    for (;;) {
        uint32_t left = 0;
        for (int i = 0; i < n; i++) {
            harvest(&rings[i], &disks[rings[i].disk], 0, 0);
            left += rings[i].in_flight;
        }
        if (!left)
            break;
        if (now_ns() > give_up) {
            fprintf(stderr, "native frontend: %u requests unanswered after 30 s\n", left);
            failures++;
            break;
        }
        int got = epoll_wait(ep, ready, n + 1, 100);
        for (int i = 0; i < got; i++) {
            if (ready[i].data.u32 == STDIN_MARK)
                parent_gone();
            else
                ack(&rings[ready[i].data.u32]);
        }
    }
    for (int i = 0; i < n_disks; i++) /* the disks this process drives, even one that completed nothing */
        if (disks[i].driven)
            printf("disk %d %" PRIu64 " %.0f %.0f\n", i, disks[i].completed, hist_percentile(&disks[i], 50),
                   hist_percentile(&disks[i], 99));
    printf("failures %" PRIu64 "\n", failures);
    fflush(stdout);
    while (read(0, line, sizeof line) > 0) /* alive until the parent has read our CPU time */
        ;
    for (int i = 0; i < n_disks; i++)
        free(disks[i].hist);
    free(disks);
    free(ready);
    free(rings);
    return failures ? 1 : 0;
}
