/*
 * A ring group's write gate (issue 20, wiso20): whether a buffered WRITE of a device whose kernel
 * path has no RWF_NOWAIT (ext4, a block device's page cache, overlayfs: backend/writegate.py's
 * WriteClass.GATED) may be written inline in the group's loop, or must leave for its ring's own
 * thread (MODE_STOP), where the kernel's dirty throttle then sleeps that ring alone.
 *
 * Such a write cannot be asked "would you block?": the kernel answers EOPNOTSUPP. What makes it
 * block is the dirty throttle (balance_dirty_pages), and that only ever slept a writer with the
 * host's dirty + writeback pages at or above the freerun ceiling, (threshold + background) / 2
 * (bench/README.md, issue 20 write isolation: 367 stalls measured, none below 0.995 of it). So
 * the gate is closed while
 *   - dirty + writeback >= DIRTY_GATE_PERMILLE of that ceiling (/proc/vmstat, where the kernel
 *     computes both thresholds at read time: read at most once per DIRTY_READ_NS, and only when a
 *     gated write is to be decided: a group that writes nothing never reads it), or
 *   - the device is held: a write of it slept in a group (its thread's voluntary context switches,
 *     getrusage RUSAGE_THREAD ru_nvcsw, moved across a pwritev2 that took SLEPT_CHECK_NS or more). That catches what the global
 *     numbers miss: a memcg's dirty limit, a strictlimit bdi, reclaim, a journal wait, the inode
 *     lock held by the device's own throttled ring thread. The hold starts at HOLD_FIRST_NS and
 *     doubles (up to HOLD_MAX_NS) when a sleep comes within one hold's length of the last hold's end.
 *
 * The device's state is a buffer of WG_SIZE int64 (writegate.DeviceWrites.state: one per device,
 * shared by its queues, which may be in different groups: every access is atomic). The counts in
 * it are what Python logs (rate-limited) when a ring comes back from the group; nothing here logs.
 */
#ifndef XBC_WRITE_GATE_H
#define XBC_WRITE_GATE_H

#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

/* the device state's int64 slots (writegate.py names the same; a test holds them equal) */
enum {
    WG_HOLD_UNTIL = 0,     /* CLOCK_MONOTONIC ns until which its writes leave the group */
    WG_HOLD_NS = 1,        /* the last hold's length */
    WG_SLEPT = 2,          /* writes that slept in a group (each started or extended a hold) */
    WG_CLOSED = 3,         /* times the dirty level closed the gate (open -> closed, as this device saw it) */
    WG_LEFT_DIRTY = 4,     /* writes handed to the ring's thread: dirty level near the throttle */
    WG_LEFT_HELD = 5,      /* ... held after a sleep */
    WG_DIRTY_PERMILLE = 6, /* dirty + writeback in per-mille of the freerun ceiling, at the last closure */
    WG_LAST = 7,           /* the last decision (GATE_*) */
    WG_SIZE = 8,
};
enum { GATE_OPEN = 0, GATE_DIRTY = 1, GATE_HELD = 2 };

/* 0.75 of the freerun ceiling: many writes above the background threshold did not sleep, every
 * stall was at the ceiling or above; a quarter of margin for a burst between two reads */
#define DIRTY_GATE_PERMILLE 750
#define DIRTY_READ_NS 1000000LL /* a read + parse costs ~10 us: at most 1 % of a busy group's CPU */
/* a write that took less was not held up long enough to matter to the group's other rings (a
 * throttle pause is a jiffy or more); one that took longer is checked for a sleep: getrusage costs
 * ~124 ns, twice a write was a tenth of a cached 4 KiB write's CPU */
#define SLEPT_CHECK_NS 200000LL
#define HOLD_FIRST_NS 1000000000LL
#define HOLD_MAX_NS 64000000000LL

static inline int64_t wg_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t wg_get(const int64_t *wg, int i) { return __atomic_load_n(&wg[i], __ATOMIC_RELAXED); }
static inline void wg_set(int64_t *wg, int i, int64_t v) { __atomic_store_n(&wg[i], v, __ATOMIC_RELAXED); }
static inline void wg_add(int64_t *wg, int i) { __atomic_fetch_add(&wg[i], 1, __ATOMIC_RELAXED); }

/* The value of `name` (with its trailing space) in /proc/vmstat's text, or -1. */
static int64_t vmstat_field(const char *text, const char *name)
{
    size_t len = strlen(name);
    for (const char *p = text; p != NULL && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (strncmp(p, name, len) == 0)
            return strtoll(p + len, NULL, 10);
    return -1;
}

/* The host's dirty + writeback pages in per-mille of the dirty throttle's freerun ceiling, from
 * /proc/vmstat now; -1 if it cannot be read (the gate then relies on the sleep check alone). */
static int dirty_permille_now(void)
{
    static int vmstat = -1; /* one fd for the process: pread needs no lock */
    int fd = __atomic_load_n(&vmstat, __ATOMIC_ACQUIRE);
    if (fd < 0) {
        int opened = open("/proc/vmstat", O_RDONLY | O_CLOEXEC);
        if (opened < 0)
            return -1;
        int expected = -1;
        if (__atomic_compare_exchange_n(&vmstat, &expected, opened, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            fd = opened;
        } else {
            close(opened); /* another group's thread installed one first */
            fd = expected;
        }
    }
    char text[16384];
    ssize_t n = pread(fd, text, sizeof text - 1, 0);
    if (n <= 0)
        return -1;
    text[n] = 0;
    int64_t dirty = vmstat_field(text, "nr_dirty "), wb = vmstat_field(text, "nr_writeback ");
    int64_t thresh = vmstat_field(text, "nr_dirty_threshold ");
    int64_t bg = vmstat_field(text, "nr_dirty_background_threshold ");
    if (dirty < 0 || wb < 0 || thresh <= 0 || bg < 0)
        return -1;
    int64_t ceiling = (thresh + bg) / 2;
    int64_t permille = (dirty + wb) * 1000 / (ceiling > 0 ? ceiling : 1);
    return permille > 1000000 ? 1000000 : (int)permille;
}

/* dirty_permille_now(), read at most once per DIRTY_READ_NS by the whole process (groups on other
 * CPUs share the reading). */
static int dirty_permille(int64_t now)
{
    static int64_t read_at = INT64_MIN / 2;
    static int cached = -1;
    if (now - __atomic_load_n(&read_at, __ATOMIC_RELAXED) < DIRTY_READ_NS)
        return __atomic_load_n(&cached, __ATOMIC_RELAXED);
    int got = dirty_permille_now();
    __atomic_store_n(&cached, got, __ATOMIC_RELAXED);
    __atomic_store_n(&read_at, now, __ATOMIC_RELAXED);
    return got;
}

/* May a gated WRITE of the device with state `wg` run in the group now? 1: yes; 0: it leaves for
 * its ring's thread (counted, with why). */
static int gate_open(int64_t *wg)
{
    int64_t now = wg_now();
    int why = GATE_OPEN;
    if (now < wg_get(wg, WG_HOLD_UNTIL)) {
        why = GATE_HELD;
    } else {
        int permille = dirty_permille(now);
        if (permille >= DIRTY_GATE_PERMILLE) {
            why = GATE_DIRTY;
            if (wg_get(wg, WG_LAST) != GATE_DIRTY) {
                wg_add(wg, WG_CLOSED);
                wg_set(wg, WG_DIRTY_PERMILLE, permille);
            }
        }
    }
    wg_set(wg, WG_LAST, why);
    if (why == GATE_DIRTY)
        wg_add(wg, WG_LEFT_DIRTY);
    else if (why == GATE_HELD)
        wg_add(wg, WG_LEFT_HELD);
    return why == GATE_OPEN;
}

/* The thread's voluntary context switches so far (a sleep in a syscall is one). */
static inline long gate_switches(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_THREAD, &ru) == 0 ? ru.ru_nvcsw : 0;
}

/* A gated write slept in the group: the device's writes leave it for a hold, doubled if the last
 * hold ended less than its own length ago. */
static void gate_slept(int64_t *wg)
{
    int64_t now = wg_now();
    int64_t until = wg_get(wg, WG_HOLD_UNTIL), last = wg_get(wg, WG_HOLD_NS);
    int64_t hold = last > 0 && now < until + last ? last * 2 : HOLD_FIRST_NS;
    if (hold > HOLD_MAX_NS)
        hold = HOLD_MAX_NS;
    wg_set(wg, WG_HOLD_NS, hold);
    wg_set(wg, WG_HOLD_UNTIL, now + hold);
    wg_add(wg, WG_SLEPT);
}

#endif
