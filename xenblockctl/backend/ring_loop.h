/*
 * The native wait-and-serve loop, for both native passes: _grantcopy.c (frontends without
 * persistent grants: GRUB's one page at a time) and _fastpass.c (persistent grants: Linux blkfront,
 * a pass of 32 small requests after every wake-up). Written once here because it is the ring
 * protocol's side of the engine — the take, the overflow rule, the push and notify test, the final
 * check, the order of the late unmask — and two copies of it would drift; each pass supplies only
 * its serve step (struct loop_pass).
 *
 * Per wake-up the ring thread crossed from C to Python and back at every step of DataPlane._run's
 * cycle (issue 20: for GRUB ~1.1 ms of CPU a request in dom0 under TCG; for a 4 KiB pass of 32 on
 * the host 30-34 % of the ring thread was the interpreter). ring_loop() runs that cycle without
 * the GIL, for as long as it needs nothing of Python's:
 *
 *   take (ring.py's take_slots: req_prod read once, the same overflow rule, up to `batch` slots
 *   copied out of shared memory with one or two memcpy into a private copy, which alone is
 *   decoded) -> the pass's serve step -> each answer written by ring_answer.h's journal protocol ->
 *   push (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY) -> notify if the frontend's rsp_event asks -> the
 *   pass's after step, with the GIL, if it has one -> unmask the port if a wake-up is owed its late
 *   EOI -> poll req_prod for the frontend's refill, if the pass asks for it (below) -> final check
 *   (RING_FINAL_CHECK_FOR_REQUESTS: req_event, a full fence, req_prod again) -> block in read() of
 *   the event channel.
 *
 * The poll (struct poller): at QD 32 a frontend refills its ring only once it has taken a pass's
 * answers, so engine and frontend take turns, and each turn that ends in a sleep costs the sleeper's
 * CPU a wake-up (on the 2-vCPU test VM an idle vCPU takes ~25 us to run the woken thread, against
 * ~15 us for the whole 32-request pass: bench/README.md, issue 20, "a poll for the refill"). After
 * a pass that answered requests, the loop watches req_prod for up to `poll_ns` before it arms
 * req_event and sleeps: while req_event is unarmed the frontend's push does not notify either
 * (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY), so a refill caught costs neither side a syscall or a
 * wake-up. A poll that sees nothing is CPU burnt for no request, so after POLL_MISSES misses in a
 * row the loop stops polling for `backoff` passes (doubling up to POLL_BACKOFF_MAX) and one catch
 * resets it: an idle ring, or a frontend slower than the poll (a QD-1 guest under TCG), pays a
 * handful of polls, then one in ~1000 passes. A group's loop (_fastpass.c) also yields the CPU at
 * each look at the clock (`yield`): there the poll rarely misses while any ring is busy, so without
 * it the group kept its CPU from tasks runnable there; the one-ring loop does not (a yield there
 * handed whole slices to a busy neighbour: fourk20, session 14). Only the persistent-grant pass
 * polls (_fastpass.c); the grant-copy pass passes 0. QEMU's iothreads poll their virtqueues the
 * same way (32 us by default, grown and shrunk by whether polls succeed).
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
 * sleep and at each exit, and after each run where the pass has an after step due (report()).
 *
 * It runs only while no request of the ring is outstanding anywhere else (DataPlane checks: none
 * in flight, none held), so it owns the response side alone: no worker answers concurrently, and
 * every answer it writes is next in ring order. Guest numbers: req_prod is range-checked against
 * the ring's size before any slot is touched; rsp_event only decides whether to notify; every
 * slot goes through the pass's decoder (blkif_slot.h's rules). Memory ordering is ring.h's with
 * real fences: acquire on req_prod before the slots are copied, release on rsp_prod after the
 * answers, a full fence between req_event's store and req_prod's reload and between rsp_prod's
 * store and rsp_event's load.
 *
 * Everything is static: each extension compiles its own copy of the same source.
 */
#ifndef XENBLOCKCTL_RING_LOOP_H
#define XENBLOCKCTL_RING_LOOP_H

#include "blkif_slot.h"
#include "ring_answer.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

enum { EXIT_SLOT = 0, EXIT_CHECK = 1, EXIT_WOKEN = 2, EXIT_BUDGET = 3, EXIT_OSERROR = 4 };
enum { WAIT_EVTCHN = 1, WAIT_EVENTFD = 2 };
/* What a pass owes Python (struct loop_pass's `owed`): nothing; something its after step may do at
 * the next report (before a sleep, at an exit), when the loop takes the GIL anyway; or something
 * it must do after this run. */
enum { OWED_NONE = 0, OWED_LATER = 1, OWED_NOW = 2 };
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

/* The interned attribute names report() adds to (loop_init, from the module's init). */
static PyObject *attr_requests, *attr_ok, *attr_wakeups, *attr_notifies, *attr_served, *attr_polls, *attr_caught;

static int loop_init(void)
{
    attr_requests = PyUnicode_InternFromString("requests");
    attr_ok = PyUnicode_InternFromString("ok");
    attr_wakeups = PyUnicode_InternFromString("wakeups");
    attr_notifies = PyUnicode_InternFromString("notifies");
    attr_served = PyUnicode_InternFromString("served");
    attr_polls = PyUnicode_InternFromString("polls");
    attr_caught = PyUnicode_InternFromString("polls_caught");
    return attr_requests == NULL || attr_ok == NULL || attr_wakeups == NULL || attr_notifies == NULL ||
                   attr_served == NULL || attr_polls == NULL || attr_caught == NULL
               ? -1
               : 0;
}

/* The loop's constants into the module, for fastpath.py's check that both extensions agree. */
static int loop_add_constants(PyObject *m)
{
    return PyModule_AddIntConstant(m, "EXIT_SLOT", EXIT_SLOT) < 0 ||
                   PyModule_AddIntConstant(m, "EXIT_CHECK", EXIT_CHECK) < 0 ||
                   PyModule_AddIntConstant(m, "EXIT_WOKEN", EXIT_WOKEN) < 0 ||
                   PyModule_AddIntConstant(m, "EXIT_BUDGET", EXIT_BUDGET) < 0 ||
                   PyModule_AddIntConstant(m, "EXIT_OSERROR", EXIT_OSERROR) < 0 ||
                   PyModule_AddIntConstant(m, "WAIT_EVTCHN", WAIT_EVTCHN) < 0 ||
                   PyModule_AddIntConstant(m, "WAIT_EVENTFD", WAIT_EVENTFD) < 0
               ? -1
               : 0;
}

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

struct loop_pass;
static int pass_owes(const struct loop_pass *lp, int when);
static int pass_after(const struct loop_pass *lp);

/* What report() adds to the stats: requests, wake-ups, notifies, polls begun, polls that caught
 * a refill. */
enum { COUNT_REQUESTS, COUNT_WAKEUPS, COUNT_NOTIFIES, COUNT_POLLS, COUNT_CAUGHT, NCOUNTS };

/* The counts since the last report into the data plane's QueueStats and the pass's `served`, with
 * the GIL (taken here if `ts`), and what the pass deferred to a report (its after step, if it owes
 * anything). Safe without DataPlane's lock: while the ring is lent no request is outstanding
 * elsewhere, so no worker writes these stats, and the ring thread is the one running this. -1 with
 * a Python error (the GIL held then). */
static int report(PyThreadState **ts, PyObject *stats, PyObject *owner, const struct loop_pass *lp,
                  Py_ssize_t counts[NCOUNTS])
{
    int owes = pass_owes(lp, OWED_LATER), any = owes;
    for (int i = 0; i < NCOUNTS; i++)
        any |= counts[i] != 0;
    if (!any)
        return 0;
    if (ts != NULL)
        PyEval_RestoreThread(*ts);
    const Py_ssize_t done = counts[COUNT_REQUESTS];
    int rc = (owes && pass_after(lp) < 0) || add_attr(stats, attr_requests, done) < 0 ||
                     add_attr(stats, attr_ok, done) < 0 || add_attr(owner, attr_served, done) < 0 ||
                     add_attr(stats, attr_wakeups, counts[COUNT_WAKEUPS]) < 0 ||
                     add_attr(stats, attr_notifies, counts[COUNT_NOTIFIES]) < 0 ||
                     add_attr(stats, attr_polls, counts[COUNT_POLLS]) < 0 ||
                     add_attr(stats, attr_caught, counts[COUNT_CAUGHT]) < 0
                 ? -1
                 : 0;
    if (rc == 0 && ts != NULL)
        *ts = PyEval_SaveThread();
    for (int i = 0; i < NCOUNTS; i++)
        counts[i] = 0;
    return rc;
}

/* The arguments every loop() takes first:
 *   ring, ring_size, req_cons, rsp_prod_pvt, rsp_pushed, pending, batch, budget, stop, stats, owner,
 *   (kind, fd, port, notify_fd, notify_request)
 * `pending`: a wake-up's late unmask is owed; `stop`: a writable byte, nonzero when the ring stops;
 * `stats`: the QueueStats and `owner` the pass object whose counts it keeps (report()). The pass's
 * own arguments follow (loop_parse leaves them in *rest). */
#define LOOP_ARGS 12
struct loop_args {
    Py_buffer ring, stop;
    Py_ssize_t ring_size, batch, budget;
    unsigned long long req_cons, pvt, pushed;
    int pending;
    PyObject *stats, *owner;
    struct waiter w;
    Py_ssize_t room; /* slots a take holds at most: take_slots(batch) on a ring of ring_size */
};

/* 0: *a filled (loop_release() it) and *rest a new reference to the pass's arguments; -1: a Python
 * error, nothing held. */
static int loop_parse(PyObject *args, struct loop_args *a, PyObject **rest)
{
    memset(a, 0, sizeof *a);
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) < LOOP_ARGS) {
        PyErr_SetString(PyExc_TypeError, "loop: too few arguments");
        return -1;
    }
    PyObject *head = PyTuple_GetSlice(args, 0, LOOP_ARGS);
    if (head == NULL)
        return -1;
    unsigned int wport;
    int ok = PyArg_ParseTuple(head, "w*nKKKpnnw*OO(iiIik)", &a->ring, &a->ring_size, &a->req_cons, &a->pvt,
                              &a->pushed, &a->pending, &a->batch, &a->budget, &a->stop, &a->stats, &a->owner,
                              &a->w.kind, &a->w.fd, &wport, &a->w.notify_fd, &a->w.notify_request);
    Py_DECREF(head);
    if (!ok)
        return -1;
    a->w.port = wport;
    if (a->batch <= 0 || a->batch > MAX_SLOTS || a->ring_size <= 0 || a->ring_size > MAX_SLOTS ||
        (a->ring_size & (a->ring_size - 1)) || ((uintptr_t)a->ring.buf & 3) || a->req_cons > 0xFFFFFFFFull ||
        a->pvt > 0xFFFFFFFFull || a->pushed > 0xFFFFFFFFull || a->budget <= 0 || a->stop.len < 1 ||
        (a->w.kind != WAIT_EVTCHN && a->w.kind != WAIT_EVENTFD) || a->w.fd < 0 || a->w.notify_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "loop: bad ring geometry, indices, batch, budget, stop word or channel");
        goto fail;
    }
    if ((uint32_t)a->req_cons != (uint32_t)a->pvt) {
        PyErr_SetString(PyExc_ValueError, "loop: requests outstanding (it must own the response side)");
        goto fail;
    }
    a->room = a->batch < a->ring_size ? a->batch : a->ring_size;
    *rest = PyTuple_GetSlice(args, LOOP_ARGS, PyTuple_GET_SIZE(args));
    if (*rest == NULL)
        goto fail;
    return 0;
fail:
    PyBuffer_Release(&a->stop);
    PyBuffer_Release(&a->ring);
    return -1;
}

static void loop_release(struct loop_args *a)
{
    PyBuffer_Release(&a->stop);
    PyBuffer_Release(&a->ring);
}

/* A pass's part in the loop. serve() runs without the GIL (*ts: the thread's state, for a pass that
 * must take the GIL for a step: it gives it back before returning). It serves slots [start, count)
 * of the private copy, each decoded from the copy alone, and returns the first slot it did not
 * finish (count when it did them all), with ids[k - start] and ops[k - start] of each request
 * start + k it finished (all RSP_OKAY). `after_sleep`: this is the first pass after a wake-up.
 * *more = 1: it only cut the run there (the slot it returns is the next call's, not Python's): the
 * loop publishes the run and calls it again. after(), if not NULL, runs with the GIL (what the pass
 * owes Python: its bookkeeping, its resources; -1 with a Python error): once each run's answers
 * are out if `owed` is NULL; else after a run that leaves *owed at OWED_NOW, and at the next report
 * (before a sleep, at an exit) while *owed is OWED_LATER — so a pass whose bookkeeping can wait
 * takes the GIL once a sleep, not once a run. */
struct loop_pass {
    void *ctx;
    Py_ssize_t (*serve)(void *ctx, const unsigned char *copy, Py_ssize_t start, Py_ssize_t count, int after_sleep,
                        uint64_t *ids, uint8_t *ops, PyThreadState **ts, int *more);
    int (*after)(void *ctx);
    Py_ssize_t esize; /* the ring's entry size (blkif_slot.h's entry_size) */
    int x86_64;       /* the response layout (ring_answer.h's response_size) */
    const int *owed;  /* the pass's OWED_* (NULL: after() after every run) */
    int64_t poll_ns;  /* the longest poll for the frontend's refill after a pass (0: never poll) */
};

/* Whether the pass's after step is due: `when` OWED_NOW after a run, OWED_LATER at a report. */
static int pass_owes(const struct loop_pass *lp, int when)
{
    if (lp->after == NULL)
        return 0;
    if (lp->owed == NULL)
        return when == OWED_NOW;
    return *lp->owed >= when;
}

static int pass_after(const struct loop_pass *lp)
{
    return lp->after(lp->ctx);
}

/* The poll for the frontend's refill (see the top of this file). */
enum { POLL_MISSES = 4, POLL_BACKOFF_MAX = 1024 };
/* A yielding poll (a group's) that finds its CPU taken: two looks at the clock further apart than
 * SHARED_GAP_NS mean another task ran here in between — the yield handed it the CPU for longer than
 * a frontend's burst, or a tick preempted the poll for a task in another session, whom the yield
 * never reaches. An EEVDF yield forfeits the rest of the yielder's request, and nothing makes the
 * scheduler look again before the next tick, so beside a CPU-bound task each yield cost the rings
 * 1.5-5.5 ms (bench/README.md, many_disks, many20 and slice20). The poller then stops polling: after
 * each idle round the group arms req_event and sleeps, a sleeper keeps its scheduler lag, and a
 * ring's notify wakes it in front of the neighbour.
 *
 * A busy frontend on the group's CPU takes it as long (the bench's Python frontends run turns of
 * 0.2-4 ms), and sleeping beside it costs a wake-up per refill instead of none (many_disks lost
 * 35-50 % of its IOPS). Neither the gap nor the rings tell the two apart: at the gap's end our rings
 * were refilled in >99 % of the gaps beside a hog too (frontends on the other CPU refill what the
 * group answered before it), and gap lengths, tick phases and runs of gapped polls overlap
 * (bench/README.md, many_disks, hog20). What does tell them apart is the CPU going idle: a task
 * that never sleeps leaves its CPU no idle moment, a frontend that waits for its answers does,
 * once the group sleeps too. So while the group sleeps beside its neighbour it looks, at most once
 * an IDLE_CHECK_NS, at how often its CPU entered an idle state (cpuidle's usage counts in sysfs,
 * fds kept open): once the count moved, the neighbour is not CPU-bound and the group polls again;
 * and a gap on a CPU that idled within IDLE_WINDOW_NS (looked at once a gap, as often at most) is
 * not a CPU-bound neighbour's sign at all. Without cpuidle (no driver: a Xen PV dom0) the group
 * sleeps for `shared_ns` after each gap, as slice20's did. One poll a `shared_ns` probes whether
 * the CPU is its own again; a probe beside the neighbour stalls the rings once (a slice, a tick
 * at most), hence a time, not a count of rounds. */
#define SHARED_GAP_NS 200000 /* above a frontend's burst after a yield, below a slice (1.4 ms here) */
#define IDLE_CHECK_NS 1000000 /* a look at the CPU's idle count (a pread a cpuidle state) at most this often */
#define IDLE_STATES 8          /* cpuidle states looked at (a driver has 2-10; the first 8 do) */
#define IDLE_WINDOW_NS 4000000000 /* a CPU that idled this lately has no CPU-bound neighbour */
struct poller {
    int64_t ns;              /* the longest poll (0: never) */
    int misses;              /* polls in a row that saw nothing */
    uint32_t skip, backoff;  /* passes left without a poll; the next pause's length */
    int yield;               /* sched_yield() at each look at the clock: a task runnable here runs */
    int64_t shared_ns;       /* after a yielding poll found its CPU taken, no poll for this long (0: poll on) */
    int64_t shared_until;    /* ... until this time */
    int64_t found_shared;    /* how often (the group's counters) */
    int64_t found_idle;      /* how often a sleep beside the neighbour ended because the CPU idled */
    int64_t idle_seen;       /* when its idle count last moved (0: never seen) */
    int64_t idle_check;      /* the next look at the CPU's idle count */
    int64_t idle_base;       /* the count at the last look (-1: unknown) */
    int idle_cpu;            /* the CPU whose cpuidle counts idle_fds read (-1: none open) */
    int idle_fds[IDLE_STATES];
};

/* A poller that never yields (the one-ring loop) or sleeps beside a neighbour when shared_ns > 0. */
static void poller_init(struct poller *p, int64_t ns, int yield, int64_t shared_ns)
{
    memset(p, 0, sizeof *p);
    p->ns = ns;
    p->backoff = 1;
    p->yield = yield;
    p->shared_ns = shared_ns;
    p->idle_base = -1;
    p->idle_cpu = -1;
    for (int i = 0; i < IDLE_STATES; i++)
        p->idle_fds[i] = -1;
}

static void poller_close_idle(struct poller *p)
{
    for (int i = 0; i < IDLE_STATES; i++) {
        if (p->idle_fds[i] >= 0)
            close(p->idle_fds[i]);
        p->idle_fds[i] = -1;
    }
    p->idle_cpu = -1;
}

/* How often the CPU this thread runs on entered an idle state (the sum of its cpuidle states'
 * usage counts), -1 if unknown: no cpuidle, or the thread moved to another CPU since the last look
 * (the count is then that CPU's next time). */
static int64_t cpu_idle_entries(struct poller *p)
{
    int cpu = sched_getcpu();
    if (cpu < 0)
        return -1;
    if (cpu != p->idle_cpu) {
        poller_close_idle(p);
        p->idle_cpu = cpu;
        for (int i = 0; i < IDLE_STATES; i++) {
            char path[80];
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/cpuidle/state%d/usage", cpu, i);
            p->idle_fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        }
        return -1;
    }
    int64_t sum = 0;
    int any = 0;
    for (int i = 0; i < IDLE_STATES; i++) {
        char buf[32];
        ssize_t got = p->idle_fds[i] < 0 ? -1 : pread(p->idle_fds[i], buf, sizeof buf - 1, 0);
        if (got <= 0)
            continue;
        buf[got] = 0;
        sum += strtoll(buf, NULL, 10);
        any = 1;
    }
    return any ? sum : -1;
}

static inline int64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause(); /* the spin-wait hint: yields the core's resources to its sibling */
#endif
}

/* One ring as a loop serves it: the single loop's ring, or one member of _fastpass.c's group (a
 * loop over several rings: group_loop there). Its counts are not yet in its stats (report()). */
struct ring_run {
    struct ring_state r;
    const struct waiter *w;
    const volatile unsigned char *stop;
    const struct loop_pass *lp;
    PyObject *stats, *owner;
    unsigned char *copy; /* the private copy of a take: `room` slots */
    uint64_t *ids;
    uint8_t *ops;
    Py_ssize_t room, batch, index, count, requests;
    Py_ssize_t counts[NCOUNTS];
    int pending, woke, served, err, notify_err;
};

/* The buffers of a ring_run for the ring loop_parse() checked; -1 with a Python error (buffers
 * freed by run_free() either way). */
static int run_open(struct ring_run *m, struct loop_args *a, const struct loop_pass *lp)
{
    memset(m, 0, sizeof *m);
    if (a->ring.len < SRING_HEADER + a->ring_size * lp->esize) {
        PyErr_SetString(PyExc_ValueError, "loop: the ring buffer is smaller than its slots");
        return -1;
    }
    m->r = (struct ring_state){(uint32_t *)a->ring.buf, a->ring.buf, (uint32_t)a->ring_size, (uint32_t)a->req_cons,
                               (uint32_t)a->pvt, (uint32_t)a->pushed};
    m->w = &a->w;
    m->stop = a->stop.buf;
    m->lp = lp;
    m->stats = a->stats;
    m->owner = a->owner;
    m->room = a->room;
    m->batch = a->batch;
    m->pending = m->woke = a->pending;
    m->copy = PyMem_Malloc((size_t)m->room * (size_t)lp->esize);
    m->ids = PyMem_Malloc((size_t)m->room * sizeof *m->ids);
    m->ops = PyMem_Malloc((size_t)m->room);
    if (m->copy == NULL || m->ids == NULL || m->ops == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void run_free(struct ring_run *m)
{
    PyMem_Free(m->copy);
    PyMem_Free(m->ids);
    PyMem_Free(m->ops);
    m->copy = NULL;
    m->ids = NULL;
    m->ops = NULL;
}

/* When a poller last saw each CPU's idle count move: a fact about the CPU, not the group, so a group
 * made later on it (one per CPU, remade by a bench's rows, a worker's) starts from it. CPUs past
 * IDLE_CPUS keep it per poller. */
#define IDLE_CPUS 256
static int64_t cpu_idle_seen[IDLE_CPUS];

/* Whether the poller's CPU idled within IDLE_WINDOW_NS, its idle count read at most once an
 * IDLE_CHECK_NS. */
static int idled_lately(struct poller *p, int64_t t)
{
    if (t >= p->idle_check) {
        p->idle_check = t + IDLE_CHECK_NS;
        int64_t c = cpu_idle_entries(p);
        if (c >= 0 && p->idle_base >= 0 && c != p->idle_base) {
            p->idle_seen = t;
            if (p->idle_cpu < IDLE_CPUS)
                __atomic_store_n(&cpu_idle_seen[p->idle_cpu], t, __ATOMIC_RELAXED);
        }
        p->idle_base = c;
    }
    int64_t seen = p->idle_seen;
    if (p->idle_cpu >= 0 && p->idle_cpu < IDLE_CPUS) {
        int64_t shared = __atomic_load_n(&cpu_idle_seen[p->idle_cpu], __ATOMIC_RELAXED);
        seen = shared > seen ? shared : seen;
    }
    return seen > 0 && t - seen < IDLE_WINDOW_NS;
}

/* Two looks at the clock `gap` apart within a poll: another task held the poller's CPU in between
 * (SHARED_GAP_NS), and it is CPU-bound unless the CPU idled lately. 1 if the poll should end and
 * the group sleep. */
static int poll_gap(struct poller *p, int64_t t, int64_t gap)
{
    if (p->shared_ns <= 0 || gap <= SHARED_GAP_NS || idled_lately(p, t))
        return 0;
    p->shared_until = t + p->shared_ns;
    p->found_shared++;
    return 1;
}

/* While the group sleeps beside its neighbour: 1 if it still should, 0 once the CPU idled (the
 * neighbour is not CPU-bound: poll again) or after shared_ns (a probe). */
static int poll_still_shared(struct poller *p, int64_t now)
{
    if (now >= p->shared_until)
        return 0;
    if (!idled_lately(p, now))
        return 1;
    p->shared_until = 0;
    p->found_idle++;
    return 0;
}

/* After a pass: the index + 1 of the first of `n` rings whose req_prod moved (or whose stop word
 * was set) within the poll, 0 if the loop should arm req_event and sleep. The poll's counts go to
 * the rings that served since the last poll (`served`), a catch to the ring it caught. */
static int poll_refill(struct poller *p, struct ring_run *const *rs, int n)
{
    if (p->ns <= 0)
        return 0;
    if (p->skip > 0) {
        p->skip--;
        return 0;
    }
    int64_t now = mono_ns();
    if (now < p->shared_until && poll_still_shared(p, now))
        return 0; /* the CPU is shared: sleep armed */
    for (int k = 0; k < n; k++)
        rs[k]->counts[COUNT_POLLS] += rs[k]->served;
    const int64_t end = now + p->ns;
    for (unsigned i = 1;; i++) {
        for (int k = 0; k < n; k++) {
            if (load_index(&rs[k]->r, IDX_REQ_PROD) != rs[k]->r.req_cons) {
                rs[k]->counts[COUNT_CAUGHT]++;
                p->misses = 0;
                p->backoff = 1;
                /* a refill found right after another task ran here is that task's sign too: a
                 * poll preempted by a tick comes back to a refill, and would never see it */
                if (p->shared_ns > 0) {
                    int64_t t = mono_ns();
                    poll_gap(p, t, t - now);
                }
                return k + 1;
            }
            if (*rs[k]->stop)
                return k + 1;
        }
        cpu_relax();
        if (i % 32 == 0) { /* the clock (vDSO, ~20 ns) every 32 looks */
            int64_t t = mono_ns();
            if (poll_gap(p, t, t - now))
                return 0;
            now = t;
            if (t >= end)
                break;
            if (p->yield)
                sched_yield();
        }
    }
    if (++p->misses >= POLL_MISSES) {
        p->skip = p->backoff;
        p->backoff = p->backoff < POLL_BACKOFF_MAX ? p->backoff * 2 : POLL_BACKOFF_MAX;
        p->misses = POLL_MISSES - 1; /* after a pause one more miss pauses again, twice as long */
    }
    return 0;
}

/* What ring_step() did: nothing to take; a take of fewer than `batch` slots served (or a full one:
 * more may wait); an exit of this ring (*why, EXIT_*); a Python error (the GIL held). */
enum { STEP_IDLE, STEP_SOME, STEP_FULL, STEP_EXIT, STEP_PYERR };

/* One take of at most `room` slots, served, answered, pushed and notified (see the top of this
 * file); the late unmask, the poll and the final check are the caller's. */
static int ring_step(struct ring_run *m, PyThreadState **ts, int *why)
{
    struct ring_state *r = &m->r;
    const struct loop_pass *lp = m->lp;
    /* take: req_prod once; more outstanding than the ring holds is Python's to judge */
    uint32_t ahead = load_index(r, IDX_REQ_PROD) - r->req_cons;
    if (ahead > r->size) {
        *why = EXIT_CHECK;
        return STEP_EXIT;
    }
    if (ahead == 0)
        return STEP_IDLE;
    const uint32_t mask = r->size - 1;
    const size_t esize = (size_t)lp->esize, rsize = response_size(lp->x86_64);
    uint32_t n = ahead < (uint32_t)m->room ? ahead : (uint32_t)m->room;
    uint32_t first = r->req_cons & mask, head = r->size - first < n ? r->size - first : n;
    const unsigned char *entries = r->ring + SRING_HEADER;
    memcpy(m->copy, entries + first * esize, head * esize);
    if (head < n)
        memcpy(m->copy + head * esize, entries, (n - head) * esize);
    r->req_cons += n;
    m->count = n;
    m->index = 0;
    int more;
    do { /* a run, or the runs a pass cuts its batch into, each published before the next */
        more = 0;
        Py_ssize_t next = lp->serve(lp->ctx, m->copy, m->index, m->count, m->woke, m->ids, m->ops, ts, &more);
        unsigned char rsp[16];
        for (Py_ssize_t k = 0; k < next - m->index; k++) {
            pack_response(rsp, m->ids[k], m->ops[k], 0);
            r->pvt = answer_into_ring(r->ring, r->pvt, mask, esize, rsp, rsize);
        }
        m->requests += next - m->index;
        m->counts[COUNT_REQUESTS] += next - m->index;
        m->served |= next > m->index;
        m->index = next;
        /* push: RING_PUSH_RESPONSES_AND_CHECK_NOTIFY */
        if (r->pvt != r->pushed) {
            uint32_t old = r->pushed;
            __atomic_store_n(&r->idx[IDX_RSP_PROD], r->pvt, __ATOMIC_RELEASE);
            r->pushed = r->pvt;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            uint32_t rsp_event = load_index(r, IDX_RSP_EVENT);
            if ((uint32_t)(r->pvt - rsp_event) < (uint32_t)(r->pvt - old)) {
                m->counts[COUNT_NOTIFIES]++;
                if (notify_event(m->w) < 0)
                    m->notify_err = errno; /* Python logs it as _notify does, and goes on */
            }
        }
        if (pass_owes(lp, OWED_NOW)) {
            PyEval_RestoreThread(*ts);
            if (lp->after(lp->ctx) < 0 || report(NULL, m->stats, m->owner, lp, m->counts) < 0)
                return STEP_PYERR; /* the GIL is held */
            *ts = PyEval_SaveThread();
        }
    } while (more && m->index < m->count);
    m->woke = 0;
    if (m->index < m->count) {
        *why = EXIT_SLOT;
        return STEP_EXIT;
    }
    m->count = m->index = 0;
    if (m->notify_err) {
        *why = EXIT_BUDGET;
        return STEP_EXIT;
    }
    return n >= (uint32_t)m->batch ? STEP_FULL : STEP_SOME;
}

/* The late EOI, after the answers are out (DataPlane._run's order): 0, or -1 with m->err set. */
static int ring_unmask(struct ring_run *m)
{
    if (!m->pending)
        return 0;
    if (unmask_event(m->w) < 0) {
        m->err = errno;
        return -1;
    }
    m->pending = 0;
    return 0;
}

/* The final check: req_event, a full fence, req_prod again. 1 if requests came (serve again), 0
 * if the ring may sleep. */
static int ring_arm(struct ring_run *m)
{
    struct ring_state *r = &m->r;
    if (load_index(r, IDX_REQ_PROD) != r->req_cons)
        return 1;
    __atomic_store_n(&r->idx[IDX_REQ_EVENT], r->req_cons + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load_index(r, IDX_REQ_PROD) != r->req_cons;
}

/* A wake-up read from the ring's channel: 0 (go on), or an exit (*why) of the ring. */
static int ring_woken(struct ring_run *m, int *why)
{
    int theirs = 0;
    int got = wait_event(m->w, &theirs);
    if (got < 0) {
        m->err = errno;
        *why = EXIT_OSERROR;
        return 1;
    }
    if (*m->stop) { /* as DataPlane._run: a wake-up that comes with the stop is not counted */
        *why = EXIT_WOKEN;
        return 1;
    }
    if (theirs) {
        m->pending = 1;
        m->woke = 1;
        m->counts[COUNT_WAKEUPS]++;
    }
    if (got > 0) {
        *why = EXIT_WOKEN;
        return 1;
    }
    return 0;
}

/* The exit's tuple, with the GIL, after the last report():
 *   (exit, req_cons, rsp_prod_pvt, rsp_pushed, pending, copy | None, index, count, requests,
 *    errno, notify_errno) */
static PyObject *run_result(const struct ring_run *m, int why)
{
    PyObject *batch_copy = Py_None;
    if (why == EXIT_SLOT) {
        batch_copy = PyBytes_FromStringAndSize((const char *)m->copy, m->count * m->lp->esize);
        if (batch_copy == NULL)
            return NULL; /* the ring's state is lost with it: the data plane treats it as a bug of ours */
    } else {
        Py_INCREF(batch_copy);
    }
    return Py_BuildValue("(ikkkiNnnnii)", why, (unsigned long)m->r.req_cons, (unsigned long)m->r.pvt,
                         (unsigned long)m->r.pushed, m->pending, batch_copy, m->index, m->count, m->requests,
                         m->err, m->notify_err);
}

/* The loop itself (see the top of this file), on a ring whose arguments loop_parse() checked.
 *   -> run_result()'s tuple; NULL with a Python error. */
static PyObject *ring_loop(struct loop_args *a, const struct loop_pass *lp)
{
    PyObject *out = NULL;
    struct ring_run m;
    if (run_open(&m, a, lp) < 0) {
        run_free(&m);
        return NULL;
    }
    struct ring_run *const one[1] = {&m};
    struct poller poller;
    poller_init(&poller, lp->poll_ns, 0, 0); /* no yield: never shared */
    int why = EXIT_WOKEN;
    PyThreadState *ts = PyEval_SaveThread();
    for (;;) {
        if (*m.stop) {
            why = EXIT_WOKEN;
            break;
        }
        int step = ring_step(&m, &ts, &why);
        if (step == STEP_PYERR)
            goto python_error; /* the GIL is held */
        if (step == STEP_EXIT)
            break;
        if (step != STEP_IDLE) {
            if (m.requests >= a->budget) {
                why = EXIT_BUDGET;
                break;
            }
            if (step == STEP_FULL)
                continue;
        }
        if (ring_unmask(&m) < 0) {
            why = EXIT_OSERROR;
            break;
        }
        /* the refill, watched for before req_event is armed (so the frontend does not notify) */
        if (m.served) {
            int caught = poll_refill(&poller, one, 1);
            m.served = 0;
            if (caught)
                continue;
        }
        if (ring_arm(&m))
            continue;
        if (report(&ts, m.stats, m.owner, lp, m.counts) < 0)
            goto python_error;
        if (ring_woken(&m, &why))
            break;
    }
    PyEval_RestoreThread(ts);
    if (report(NULL, m.stats, m.owner, lp, m.counts) < 0)
        goto done;
    out = run_result(&m, why);
    goto done;
python_error:
    out = NULL; /* raised with the GIL held: the data plane treats it as a bug of ours */
done:
    run_free(&m);
    return out;
}

#endif
