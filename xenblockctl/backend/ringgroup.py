"""One native loop serving the rings of several data planes (issue 20: many busy disks).

With a ring thread per ring, every ring's native loop (fastpath.FastPass.loop) sleeps in a read of
its own event channel whenever its ring is empty. A guest at QD 4 among many keeps its ring
short, so each pass is a few requests and most passes end in a sleep and a wake-up: with 8-100
busy disks on the 2-CPU test VM, 0.25 wake-ups and ~0.3 context switches a request, the engine's
CPU a request 8 -> 10-13 us (bench/README.md, many_disks, group20). A RingGroup runs one loop
(_fastpass.group_loop, on one thread) over the rings lent to it: round-robin, one take of at most a
batch per ring per round, and a sleep only when every ring is idle, in one epoll_wait over all
their channels. Whether a ring is served in a group at all is RingGroups' rule (below): by
default only while the engine's rings outnumber its CPUs.

A data plane lends its ring as before (DataPlane._loop_natively) and its ring thread waits in
RingGroup.loop() for what its own loop() would have returned: every exit of that ring (a slot for
Python, the overflow check, a stop, a failed read, unmask or notify) is its alone, delivered to
its thread, and the ring leaves the group; the others go on. So drain, stop and teardown stay the
data plane's, unchanged. A member's I/O that waits for its device (direct I/O) stops its pass
instead of running in the group's thread (FastPass.loop): a hung device holds its own ring alone.
Buffered writes, into the page cache, run in the group only while the kernel will not make them
wait (backend/writegate.py): on xfs/btrfs with RWF_NOWAIT, a refusal leaving for the ring's thread;
on ext4 and block devices while the device's write gate is open (the host's dirty pages well below
the throttle, no write of the device slept in a group lately: write_gate.h); on tmpfs always.

A group's loop runs on one CPU (`cpu`: the engine makes one group on each CPU it may run on,
cpus.engine_cpus()), and while it polls for a refill it yields that CPU to any task runnable there
(YIELD): a group whose rings are always busy never sleeps, so on CPUs shared with frontends or
other dom0 work it held half of each while they waited for it, spinning for requests they had yet
to send (bench/README.md, many_disks, many20: its CPU a request 4.6 -> 1.1 us). Two groups on one
CPU would yield to each other, hence one CPU each.

A yield is right beside a frontend, which runs a burst and sleeps, and wrong beside a task that
never sleeps: an EEVDF yield forfeits the rest of the group's request, and the group's rings then
waited for the neighbour's slice, up to the next tick (1.5-5.5 ms, each idle round). The group's
thread asks for a short EEVDF request (SLICE_NS, Linux 6.12+): a woken task with a shorter request
preempts a running one even at zero lag, and a frontend woken on the group's CPU gets it once the
group's request is used up. The poll also watches its own clock (SHARED_NS): once another
task held the CPU longer than a frontend's burst (ring_loop.h's SHARED_GAP_NS) the group stops
polling for SHARED_NS and sleeps, req_event armed, after every idle round, and a ring's notify wakes
it ahead of the neighbour. A busy frontend on the group's CPU looks the same to the clock (and
the rings are refilled in such gaps beside a hog too: frontends elsewhere refill them), and sleeping
beside it cost the many-disks bench a third to a half of its IOPS (bench/README.md, many_disks,
slice20); what tells them apart is the CPU going idle, which a CPU-bound task never lets it do:
the group stops sleeping once its CPU idled, and a CPU that idled in the last seconds takes no gap
for a CPU-bound neighbour's sign (ring_loop.h; hog20). On by default since groups serve by default
past a ring per CPU (RingGroups): without it 2 busy disks on an engine CPU that a CPU-bound task
shared got 11.5 k IOPS in groups against 127 k on ring threads, with it 100 k (bench/README.md,
many_disks, auto25). A host without cpuidle (a Xen PV dom0) cannot see its CPU idle and falls back
to the clock alone; there a frontend never shares dom0's CPUs, so the busy frontend the idle tells
apart is not there to be mistaken.

A bug of ours in the group (a Python error in the loop's bookkeeping) fails every ring the group
held, each on its own thread, as an error of its own loop() would (the data plane marks it
broken, logged); rings joining later get a fresh loop.
"""

from __future__ import annotations

import array
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from types import ModuleType

from xenblockctl.backend.cpus import engine_cpus
from xenblockctl.backend.fastpath import LoopExit

log = logging.getLogger(__name__)

_native: ModuleType | None
try:
    from xenblockctl.backend import _fastpass as _native
except ImportError:  # not built: fastpath.FastPass does not exist either, nothing joins a group
    _native = None

#: requests a busy group serves, per ring it holds, between two reports of its rings' counts into
#: their stats (a group that never sleeps reports nowhere else); the GIL once for all rings. Per
#: ring: counted over the whole group, 100 rings reported every ~10 requests of each, and the
#: reports' after steps fed Python's collector (bench/README.md, many_disks, report24)
REPORT_EVERY = 1024
#: the group's refill poll yields its CPU to any task runnable on it (sched_yield, every 32 looks)
YIELD = True
#: ns a group does not poll for once a poll found its CPU taken by a CPU-bound task (0: it polls
#: on), unless the CPU idles first (ring_loop.h). On, a group beside a CPU-bound task in its
#: session serves a QD-1 ring at p99 0.09 ms instead of 4-5 ms (quiet host, slice20), and 2 busy
#: disks at 100 k IOPS instead of 11.5 k (auto25); slice20's rule took a busy frontend on the
#: group's CPU for such a task and cost many_disks 35-50 % of its IOPS, the CPU's idle now tells
#: them apart (bench/README.md, many_disks, hog20). A probe beside the neighbour costs the rings
#: one stall of up to a tick, hence 1 s.
SHARED_NS = 1_000_000_000
#: the EEVDF slice the group's thread asks for (sched_runtime; 0: the kernel's base slice, ~1.4 ms on
#: 2 CPUs): short enough that its wake-up preempts a CPU-bound neighbour, long enough (the kernel's
#: floor is 0.1 ms) for a round over many rings
SLICE_NS = 150_000

_slice_refused = threading.Event()  # logged once per process: every group's thread would say the same


class _Member:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: tuple[object, ...] | None = None
        self.error: BaseException | None = None


class RingGroup:
    """A group of rings served by one native loop on one thread, started when the first ring
    joins; asleep on its bell while no ring is lent to it (a ring that leaves for a Python turn
    comes back at once: no thread is made per return). `close()` once no ring can join any more."""

    def __init__(self, name: str = "xbc-rings", cpu: int | None = None) -> None:
        if _native is None:
            raise RuntimeError("ring groups need the native fast path (_fastpass)")
        self.name = name
        self.cpu = cpu
        self._lock = threading.Lock()
        self._joining: list[tuple[int, tuple[object, ...]]] = []
        self._members: dict[int, _Member] = {}  # joining or joined, not delivered yet
        self._next = 0
        self._thread: threading.Thread | None = None
        self._closing = False
        self._epoll = select.epoll()
        self._bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._bell_word = bytearray(1)  # set before the eventfd is written: the loop looks every round
        self._epoll.register(self._bell, select.EPOLLIN)
        # how often the group's poll found its CPU taken by another task, and how often its sleeps
        # beside that task ended because the CPU idled (written by its loop)
        self._counters = array.array("q", [0, 0])

    @property
    def native_id(self) -> int | None:
        """The group's thread's id in the kernel (its /proc/<pid>/task entry), None before a ring
        joined: for measuring what the group's loop takes of a CPU."""
        thread = self._thread
        return None if thread is None else thread.native_id

    @property
    def found_shared(self) -> int:
        """How often the group's poll found another task on its CPU (and stopped polling for
        SHARED_NS): as of its last sleep or report."""
        return self._counters[0]

    @property
    def found_idle(self) -> int:
        """How often the group's sleeps beside another task ended because its CPU idled (the task
        was not CPU-bound: the group polls again): as of its last sleep or report."""
        return self._counters[1]

    @property
    def rings(self) -> int:
        """Rings lent to the group now (joining or served)."""
        with self._lock:
            return len(self._members)

    def loop(self, args: tuple[object, ...]) -> LoopExit:
        """Serve one ring in the group (`args`: fastpath.run_loop's, from FastPass.loop) until it
        exits; on the calling ring thread, which waits. Raises what the group's loop raised if it
        failed while it held the ring."""
        member = _Member()
        with self._lock:
            if self._closing:
                raise RuntimeError(f"{self.name}: the group is closed")
            token = self._next
            self._next += 1
            self._members[token] = member
            self._joining.append((token, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            else:
                self._ring()
        member.done.wait()
        if member.error is not None:
            raise member.error
        assert member.result is not None
        return LoopExit._make(member.result)

    def close(self) -> None:
        """End the group's thread; release the epoll set and the bell (no ring may be in the
        group: its data planes are stopped first)."""
        with self._lock:
            if self._members:
                raise RuntimeError(f"{self.name}: {len(self._members)} rings still in the group")
            if self._closing:
                return
            self._closing = True
            thread = self._thread
            self._ring()
        if thread is not None:
            thread.join()
        self._epoll.close()
        os.close(self._bell)

    def _ring(self) -> None:
        """Wake the group's loop to take what joins (under the lock)."""
        self._bell_word[0] = 1
        os.eventfd_write(self._bell, 1)

    # -- the group's thread ----------------------------------------------------------------------
    def _take(self) -> list[tuple[int, tuple[object, ...]]] | None:
        """The rings joining; None once the group closes (its loop then ends)."""
        with self._lock:
            if self._closing and not self._joining:
                return None
            got, self._joining = self._joining, []
        return got

    def _deliver(self, token: int, result: tuple[object, ...]) -> None:
        with self._lock:
            member = self._members.pop(token)
        member.result = result
        member.done.set()

    def _run(self) -> None:
        assert _native is not None
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})  # 0: this thread (Linux: affinity is per task)
            except OSError as exc:  # an offline CPU: the loop still serves, wherever it runs
                log.warning(
                    "%s: cannot run on CPU %d only (%s): the group runs on any", self.name, self.cpu, exc
                )
        if SLICE_NS:
            _ask_short_slice(self.name)
        while True:
            try:
                _native.group_loop(
                    self._take,
                    self._deliver,
                    self._epoll.fileno(),
                    (self._bell_word, self._bell),
                    REPORT_EVERY,
                    YIELD,
                    SHARED_NS,
                    self._counters,
                )
                return  # closed
            except Exception as exc:  # a bug of ours: fail the rings it held, each on its own thread
                log.exception("%s: the group's loop failed", self.name)
                with self._lock:
                    joining = {token for token, _ in self._joining}
                    lost = [(t, m) for t, m in self._members.items() if t not in joining]
                    for token, _member in lost:
                        del self._members[token]
                for _token, member in lost:
                    member.error = exc
                    member.done.set()
            with self._lock:
                if self._closing and not self._joining:
                    return


class Seat:
    """A data plane's place among the engine's ring groups (RingGroups.seat): the group it was given
    (the least loaded when it was made) and, at each entry of its native loop, whether it serves
    there or alone on its own thread (now())."""

    __slots__ = ("_groups", "group", "kick")

    def __init__(self, groups: RingGroups, group: RingGroup, kick: Callable[[], None]) -> None:
        self._groups = groups
        self.group = group
        #: asks the ring's loop to leave its group (RingGroups.leave)
        self.kick = kick

    def now(self) -> RingGroup | None:
        """Where the ring's loop runs next: its group, or None (alone on its thread)."""
        return self.group if self._groups.grouped else None

    def leave(self) -> None:
        """The data plane stopped: it no longer counts (idempotent)."""
        self._groups.leave(self)


class RingGroups:
    """The engine's ring groups (one per CPU it may run on) and when a ring is served in one.

    Below a point a ring thread each is the better shape: each ring has a CPU, sleeps in its own
    read and is woken by its guest alone, and nothing polls beside the frontends; past it, the
    rings share the CPUs and their sleeps and wake-ups are what the engine spends its time on
    (bench/README.md, many_disks: 2 busy disks on 2 CPUs, ring threads 652-777 k IOPS, one group
    per CPU 263-781 k; 8-100 disks, ring threads 181-208 k, groups 541-760 k). So with `solo_up_to`
    N (the default: the engine's CPU count), while it serves at most N rings each runs alone on its
    own thread, and with more every one is served in its group; 0 (`backend --ring-groups`): always
    in groups. A ring decides at each entry of its native loop, which a busy ring leaves every
    fastpath budget (256 requests) and an idle one when it next has a request: so rings that come
    move the others into groups within a few hundred of their requests. A group does not let its
    rings go on a budget, so when the count falls back to N the rings are asked to leave their
    group (their `kick`: DataPlane's, which the group sees in the ring's stop word).

    Only rings with the persistent-grant native pass count: the others (grant copy, pure Python)
    never join a group and keep their own threads whatever the count."""

    def __init__(self, groups: Sequence[RingGroup], *, solo_up_to: int = 0) -> None:
        if not groups:
            raise ValueError("RingGroups needs at least one group")
        self.groups = tuple(groups)
        self.solo_up_to = solo_up_to
        self._lock = threading.Lock()
        self._seats: list[Seat] = []
        #: rings now served in their groups (more than solo_up_to seats); read without the lock by
        #: Seat.now(): a stale read costs one loop in the old place
        self.grouped = solo_up_to == 0

    @classmethod
    def per_cpu(cls, *, always: bool, name: str = "xbc-rings") -> RingGroups:
        """The engine's groups (`backend`, without workers): one on each CPU it may run on
        (cpus.engine_cpus()), each pinned there: two groups on one CPU would spin and yield to each
        other. `always` (--ring-groups): every ring in them; else only past a ring per CPU."""
        cpus = engine_cpus()
        groups = [RingGroup(f"{name}{i}", cpu=cpu) for i, cpu in enumerate(cpus)]
        return cls(groups, solo_up_to=0 if always else len(cpus))

    def assigned(self, group: RingGroup) -> int:
        """Seated data planes given `group`: how loaded it is for a new ring (a ring is lent only
        once its data plane starts, so group.rings undercounts a device whose queues are set up
        together)."""
        with self._lock:
            return self._given(group)

    def _given(self, group: RingGroup) -> int:
        return sum(s.group is group for s in self._seats)  # under the lock

    def seat(self, kick: Callable[[], None]) -> Seat:
        """A place for a new data plane's ring, in the group given the fewest (its `kick` asks its
        loop to leave its group: called when the rings go back to their own threads)."""
        with self._lock:
            seat = Seat(self, min(self.groups, key=self._given), kick)
            self._seats.append(seat)
            count = len(self._seats)
            was, grouped = self.grouped, count > self.solo_up_to
            self.grouped = grouped
        if grouped and not was:
            log.info("%d rings, more than %d: served in ring groups", count, self.solo_up_to)
        return seat

    def leave(self, seat: Seat) -> None:
        with self._lock:
            if seat not in self._seats:
                return
            self._seats.remove(seat)
            was, self.grouped = self.grouped, len(self._seats) > self.solo_up_to
            kicks = [s.kick for s in self._seats] if was and not self.grouped else []
        if kicks:
            log.info("%d rings, at most %d: each on its own thread again", len(kicks), self.solo_up_to)
        for kick in kicks:
            kick()

    @property
    def rings(self) -> int:
        """Data planes seated and not stopped."""
        with self._lock:
            return len(self._seats)


def _ask_short_slice(name: str) -> None:
    """The calling thread (a group's) asks for a SLICE_NS request; a kernel that refuses or ignores
    it (before 6.12, or a policy other than SCHED_OTHER) leaves the base slice: logged once."""
    assert _native is not None
    try:
        got = _native.short_slice(SLICE_NS)
        why = None if got == SLICE_NS else f"the kernel reports a slice of {got} ns (before Linux 6.12?)"
    except OSError as exc:
        why = str(exc)
    if why is not None and not _slice_refused.is_set():
        _slice_refused.set()
        log.warning(
            "%s: no short scheduler slice for ring groups (%s): beside a busy task their rings wait longer",
            name,
            why,
        )


def available() -> bool:
    """Ring groups can be made (the native fast path is built)."""
    return _native is not None


__all__ = ["REPORT_EVERY", "RingGroup", "RingGroups", "Seat", "available"]
