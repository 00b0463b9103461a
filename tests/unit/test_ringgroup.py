"""Rings served by one native loop (backend/ringgroup.py, _fastpass.c's group_loop): guests are
hostile and each other's strangers, so what the group shares must not let one ring hurt another —
a flooding guest does not starve a trickling one, a ring that breaks or stops leaves alone while
the others keep being served, and a ring that leaves the group for a Python turn comes back.

Every data-plane suite also runs with its rings in a group (tests/fixtures/backend.py's
engine_path "native-group": the fuzz, the drain, the stop); this file checks what is the group's
own, with two or three rings in it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.backend import Pair, PairFactory, ring_params_from
from tests.fixtures.ring_thread import assert_hostile_req_prod_is_judged, sleeping_in
from xenblockctl.backend import blkif, fastpath, ringgroup
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.ringgroup import RingGroup, RingGroups
from xenblockctl.backend.transport.local import LocalTransport

if not fastpath.available():
    pytest.skip("the native fast path (_fastpass.c) is not built here", allow_module_level=True)


@pytest.fixture
def group() -> Iterator[RingGroup]:
    """A ring group; closed after the pairs' data planes stopped (requested before make_pair)."""
    g = RingGroup("test-group")
    yield g
    g.close()


@pytest.fixture
def groups() -> Iterator[list[RingGroup]]:
    """Groups a test makes (each closed after the pairs' data planes stopped)."""
    made: list[RingGroup] = []
    yield made
    for g in made:
        g.close()


def _pair(make_pair: PairFactory, group: RingGroup, **kw: Any) -> Pair:
    """A pair whose data plane is in `group` (or as `groups=` places it); every pair of a test
    shares the one disk file, which the first one fills with random bytes (1 MiB)."""
    # I/O threads, as the engine has: without them every request runs inline whatever it waits
    # for, which a group leaves to the ring's own thread (fastpath._GROUP_MODES)
    placed = {"groups": kw.pop("groups")} if "groups" in kw else {"group": group}
    pair = make_pair(persistent=True, data_pages=32, workers=4, **placed, **kw)
    if pair.path.stat().st_size == 0 or pair.path.read_bytes()[: 1 << 20] == bytes(1 << 20):
        with open(pair.path, "r+b") as f:
            f.write(os.urandom(1 << 20))
    return pair


def _rings(group: RingGroup, n: int) -> int:
    """group.rings once it is `n` (a ring may be out for a moment: a page's first use is mapped by
    its own thread), or what it is after 5 s."""
    deadline = time.monotonic() + 5
    while group.rings != n and time.monotonic() < deadline:
        time.sleep(0.001)
    return group.rings


def _block(expected: bytes, i: int) -> bytes:
    """The 4 KiB read at sector 8 * i."""
    return expected[8 * i * 512 : (8 * i + 8) * 512]


def _flood(pair: Pair, stop: threading.Event, served: list[int], errors: list[BaseException]) -> None:
    """Keep the ring as full as the frontend can: 32 reads of 4 KiB outstanding, refilled as they
    are answered."""
    fe = pair.frontend
    try:
        for i in range(32):
            fe.submit_read(8 * i, 4096)
        fe.kick()
        while not stop.is_set():
            done = fe.collect(1, timeout=10, gather=False)
            served[0] += len(done)
            for k in range(len(done)):
                fe.submit_read(8 * (k % 32), 4096)
            fe.kick()
        while fe.outstanding:
            fe.collect(1, timeout=10, gather=False)
    except BaseException as exc:  # the assertion is the main thread's
        errors.append(exc)


def test_a_flooding_ring_does_not_starve_a_trickling_one(group: RingGroup, make_pair: PairFactory) -> None:
    """One guest keeps its ring full; another sends one request at a time. The group takes one
    batch of each ring with work a round, so the trickler's every request is answered within a
    round, and the flooder goes on being served all the while (both rings in the one loop)."""
    flooder, trickler = _pair(make_pair, group), _pair(make_pair, group)
    expected = trickler.path.read_bytes()
    stop = threading.Event()
    served, errors = [0], list[BaseException]()
    thread = threading.Thread(target=_flood, args=(flooder, stop, served, errors))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while served[0] < 256 and time.monotonic() < deadline:
            time.sleep(0.001)
        before = served[0]
        worst = 0.0
        for i in range(100):
            t0 = time.monotonic()
            assert trickler.frontend.read(8 * i, 4096, timeout=10) == _block(expected, i)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.002)  # a trickle (and the flooding thread's turn at the interpreter)
        during = served[0] - before
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert during > 100, "the flooder was not served while the trickler was"
    assert worst < 1.0, f"a trickled request waited {worst:.3f} s"
    assert _rings(group, 2) == 2  # both back in the group
    assert flooder.dataplane.broken is None
    assert trickler.dataplane.broken is None


def test_a_broken_ring_leaves_alone(group: RingGroup, make_pair: PairFactory) -> None:
    """A guest that puts req_prod more than a ring ahead: its ring leaves the group to its own
    data plane, which breaks it with BackRing's reason; the other ring in the group is served on,
    before and after."""
    bad, good = _pair(make_pair, group), _pair(make_pair, group)
    expected = good.path.read_bytes()
    assert good.frontend.read(0, 4096) == expected[:4096]
    assert bad.frontend.read(0, 4096) == expected[:4096]
    assert_hostile_req_prod_is_judged(bad)
    for i in range(50):
        assert good.frontend.read(8 * i, 4096) == _block(expected, i)
    assert good.dataplane.broken is None
    assert _rings(group, 1) == 1


def test_stopping_one_ring_while_the_group_serves_another(group: RingGroup, make_pair: PairFactory) -> None:
    """A ring stopped (drained, released) while another ring of its group is flooded: the stop is
    prompt and clean, the other ring never notices, and the group holds it alone afterwards."""
    busy, leaving = _pair(make_pair, group), _pair(make_pair, group)
    expected = leaving.path.read_bytes()
    for i in range(8):
        assert leaving.frontend.read(8 * i, 4096) == _block(expected, i)
    stop = threading.Event()
    served, errors = [0], list[BaseException]()
    thread = threading.Thread(target=_flood, args=(busy, stop, served, errors))
    thread.start()
    try:
        while served[0] < 128 and not errors:
            time.sleep(0.001)
        t0 = time.monotonic()
        assert leaving.dataplane.stop(timeout=30)
        assert time.monotonic() - t0 < 5
        assert leaving.dataplane.broken is None
        assert leaving.dataplane._thread is not None
        assert not leaving.dataplane._thread.is_alive()
        after = served[0]
        deadline = time.monotonic() + 10
        while served[0] < after + 256 and time.monotonic() < deadline and not errors:
            time.sleep(0.001)
        assert served[0] >= after + 256, "the other ring stopped being served"
        assert _rings(group, 1) == 1
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert busy.dataplane.broken is None


def test_a_ring_leaves_for_python_and_comes_back(group: RingGroup, make_pair: PairFactory) -> None:
    """A FLUSH is not the native pass's (Python's path serves it), so its ring leaves the group for
    its own thread, which serves it, and lends the ring again; a third data plane made while the
    group runs joins it. Reads, writes and flushes are right throughout."""
    calls: list[int] = []
    take = group._take

    def counting() -> list[tuple[int, tuple[object, ...]]] | None:
        got = take()
        if got:
            calls.append(len(got))
        return got

    group._take = counting  # type: ignore[method-assign]
    a, b = _pair(make_pair, group), _pair(make_pair, group)
    expected = b.path.read_bytes()
    for i in range(20):
        data = bytes([i + 1]) * 4096
        assert a.frontend.write(8 * (1024 + i), data) == blkif.RSP_OKAY  # past b's 1 MiB
        assert a.frontend.flush() == blkif.RSP_OKAY
        assert a.frontend.read(8 * (1024 + i), 4096) == data
        assert b.frontend.read(8 * i, 4096) == _block(expected, i)
    assert sum(calls) > 20  # a's ring came back after each flush's Python turn
    c = _pair(make_pair, group)
    expected_c = c.path.read_bytes()
    for i in range(20):
        assert c.frontend.read(8 * i, 4096) == _block(expected_c, i)
    sleeping_in(c.dataplane)  # the group asleep: every ring idle, its counts in
    assert _rings(group, 3) == 3
    assert c.dataplane._fast is not None
    assert c.dataplane._fast.served > 0
    for pair in (a, b, c):
        assert pair.dataplane.broken is None


def test_rings_are_served_in_groups_only_past_a_ring_per_cpu() -> None:
    """The engine's default (RingGroups.per_cpu, solo_up_to = its CPUs): while it serves at most
    that many rings each loops on its own thread; one more and every ring's next loop is in its
    group (spread over the groups, the least loaded first); back to that many and the rings still
    in groups are asked out (kicked) once. `solo_up_to` 0 (`--ring-groups`): always in groups."""
    made = [RingGroup(f"test-policy{i}") for i in range(3)]  # no ring joins: no thread starts
    try:
        groups = RingGroups(made[:2], solo_up_to=2)
        kicked: list[int] = []
        seats = [groups.seat(lambda i=i: kicked.append(i)) for i in range(3)]  # type: ignore[misc]
        assert {seats[0].group, seats[1].group} == set(made[:2])
        # the first two alone, until the third came: now all three are served in their groups
        assert [s.now() for s in seats] == [s.group for s in seats]
        assert groups.assigned(made[0]) + groups.assigned(made[1]) == 3
        assert kicked == []  # into groups: each ring moves at its loop's next exit, no kick
        seats[1].leave()
        assert kicked == [0, 2]  # out of groups: the group keeps a ring until it is asked
        assert [seats[0].now(), seats[2].now()] == [None, None]
        seats[1].leave()  # idempotent: counted once
        assert groups.rings == 2
        assert groups.assigned(made[0]) + groups.assigned(made[1]) == 2
        seats[0].leave()
        assert kicked == [0, 2]  # already alone: nothing to ask
        always = RingGroups(made[2:], solo_up_to=0)
        alone = always.seat(lambda: kicked.append(9))
        assert alone.now() is made[2]
        alone.leave()
        assert kicked == [0, 2]
        seats[2].leave()
    finally:
        for g in made:
            g.close()


def test_a_ring_moves_into_its_group_when_rings_come_and_out_when_they_go(
    group: RingGroup, make_pair: PairFactory
) -> None:
    """With room for one ring alone (solo_up_to 1): the first ring is served on its own thread
    and the group never starts; a second ring makes both the group's, the first at its loop's
    next budget exit (256 requests); once the second stops, the first is asked out and served on
    its own thread again. Every read is checked, all the way."""
    groups = RingGroups([group], solo_up_to=1)
    a = _pair(make_pair, group, groups=groups)
    expected = a.path.read_bytes()
    for i in range(20):
        assert a.frontend.read(8 * i, 4096) == _block(expected, i)
    assert a.dataplane.group is None
    assert sleeping_in(a.dataplane)[1] == a.dataplane.evtchn.fileno()  # its own read
    assert group.native_id is None  # no ring ever joined
    b = _pair(make_pair, group, groups=groups)
    assert a.dataplane.group is group
    assert b.dataplane.group is group
    for i in range(300):
        assert a.frontend.read(8 * (i % 256), 4096) == _block(expected, i % 256)
    for i in range(20):
        assert b.frontend.read(8 * i, 4096) == _block(expected, i)
    assert _rings(group, 2) == 2
    assert b.dataplane.stop(timeout=30)
    assert a.dataplane.group is None
    for i in range(20):
        assert a.frontend.read(8 * i, 4096) == _block(expected, i)
    assert _rings(group, 0) == 0, "the ring stayed in its group"
    assert sleeping_in(a.dataplane)[1] == a.dataplane.evtchn.fileno()
    assert a.dataplane.broken is None
    assert b.dataplane.broken is None


#: How long the QD-1 guest may wait for its own CPU over its 0.5 s before the host counts as busy
#: (4 % of the run; alone it waited 0-6 ms here, beside other work 50-290 ms)
GUEST_WAIT_MAX_NS = 20_000_000


def _waited_ns(tid: int) -> int:
    """ns the thread was runnable but waited for a CPU (its schedstat's second field)."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[1])


def _waited_beside_the_poll(pair: Pair, cpu: int, expected: bytes) -> float:
    """ms this thread waited for a CPU while it computed for 200 ms on `cpu` only (the group's
    CPU), right after a read: the group's poll for the refill (1 s) holds that CPU meanwhile."""
    me = threading.get_native_id()
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        assert pair.frontend.read(0, 4096, timeout=10) == _block(expected, 0)
        before = _waited_ns(me)
        end = time.monotonic() + 0.2
        while time.monotonic() < end:  # a task that wants the CPU: a busy frontend, a guest's work
            pass
        return (_waited_ns(me) - before) / 1e6
    finally:
        os.sched_setaffinity(0, mask)


def test_a_polling_group_gives_its_cpu_to_a_task_that_wants_it(
    groups: list[RingGroup], make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a group polls for a refill (POLL_NS, here 1 s: its longest) it yields its CPU to any
    task runnable there (ringgroup.YIELD): a frontend busy on the group's CPU computes on instead
    of getting half the CPU while the group spins for a request that frontend has yet to send.
    The busy task's wait for the CPU is compared with a group that does not yield (main's loop),
    in the same test: under a quarter of it. A frontend kept waiting so is what held many busy
    disks' IOPS down (bench/README.md, many_disks, many20). The group's sleep beside a CPU-bound
    task (SHARED_NS, on by default) is off here: the busy task is one, and where its CPU had not
    idled lately both groups slept beside it instead of polling (ci41), so neither would show
    what the yield does."""
    monkeypatch.setattr(fastpath, "POLL_NS", 1_000_000_000)
    monkeypatch.setattr(ringgroup, "SHARED_NS", 0)
    cpu = min(os.sched_getaffinity(0))
    waited = {}
    for yields in (False, True):
        monkeypatch.setattr(ringgroup, "YIELD", yields)
        groups.append(RingGroup(f"test-group-{yields}", cpu=cpu))
        pair = _pair(make_pair, groups[-1])
        expected = pair.path.read_bytes()
        for _ in range(4):  # its page mapped (a first use is the ring thread's), the loop's own now
            assert pair.frontend.read(0, 4096) == _block(expected, 0)
        waited[yields] = _waited_beside_the_poll(pair, cpu, expected)
        assert pair.dataplane.stop(timeout=30)
        assert pair.dataplane.broken is None
    assert waited[True] * 4 < waited[False], f"ms waited for the CPU, without and with the yield: {waited}"


def test_the_poll_is_its_members_longest_not_the_longest_ever(
    group: RingGroup, make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group polls as long as the longest poll of the rings in it now: once the ring that
    asked for a 1 s poll left, the other ring (no poll: POLL_NS 0 when it joined) is armed and
    asleep right after each pass, so its frontend's next push asks for a notify. Before, the
    group kept the longest poll it had ever seen and watched the ring for 1 s."""
    monkeypatch.setattr(fastpath, "POLL_NS", 1_000_000_000)
    long_poll = _pair(make_pair, group)
    expected = long_poll.path.read_bytes()
    for i in range(4):
        assert long_poll.frontend.read(8 * i, 4096) == _block(expected, i)
    monkeypatch.setattr(fastpath, "POLL_NS", 0)
    no_poll = _pair(make_pair, group)
    for i in range(4):
        assert no_poll.frontend.read(8 * i, 4096) == _block(expected, i)
    assert long_poll.dataplane.stop(timeout=30)
    assert _rings(group, 1) == 1
    fe = no_poll.frontend
    for k in range(3):
        assert fe.read(8 * k, 4096) == _block(expected, k)
        time.sleep(0.05)  # within the 1 s the group would still be watching
        fe.submit_read(8 * (k + 1), 4096)
        assert fe.ring.push_requests() is True  # armed and asleep: the push asks for a notify
        fe.evtchn.notify()
        done = fe.collect(1, timeout=5)
        assert [c.data for c in done.values()] == [_block(expected, k + 1)]
    assert no_poll.dataplane.broken is None


@contextlib.contextmanager
def _guest(
    sock: str, domid: int, path: str, cpu: int, conn: multiprocessing.connection.Connection
) -> Iterator[tuple[LocalFrontend, bytes, float]]:
    """A guest's side in a process of its own (its own interpreter: no GIL shared with the
    engine's loop, as a guest's vCPU shares nothing with dom0's), on `cpu`: it publishes its ring,
    makes 8 warm-up reads once the data plane runs, and yields its frontend, the disk's first
    MiB and the seconds it is told to read for; it sends what the body sends, then waits for the
    data plane to stop (_guest_process's protocol)."""
    os.sched_setaffinity(0, {cpu})
    fe = LocalFrontend(sock, domid, data_pages=32, persistent=True)
    try:
        with open(path, "rb") as f:
            expected = f.read(256 * 4096)
        conn.send(fe.xenstore_nodes())
        conn.recv()  # the data plane is running
        for i in range(8):
            assert fe.read(8 * i, 4096) == _block(expected, i)
        conn.send("warm")
        yield fe, expected, conn.recv()
        conn.recv()  # the data plane stopped
    finally:
        fe.close()


def _qd1_frontend(
    sock: str, domid: int, path: str, cpu: int, conn: multiprocessing.connection.Connection
) -> None:
    """A guest (_guest) that reads 4 KiB at QD 1 and sends each read's time from submit to
    answer, in ns, sorted, and how long it waited meanwhile for its own CPU (ns)."""
    with _guest(sock, domid, path, cpu, conn) as (fe, expected, seconds):
        waits: list[int] = []
        me = threading.get_native_id()
        waited = _waited_ns(me)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t = time.monotonic_ns()
            assert fe.read(8 * (i % 256), 4096) == _block(expected, i % 256)
            waits.append(time.monotonic_ns() - t)
            i += 1
        conn.send((sorted(waits), _waited_ns(me) - waited))


@contextlib.contextmanager
def _hog(cpu: int) -> Iterator[int]:
    """A CPU-bound process pinned to `cpu`, in this session (a busy dom0 neighbour: a device
    model, a backup, started by the same service); killed on the way out."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while _cpu_ns(proc.pid) < 50_000_000 and time.monotonic() < deadline:  # computing, pinned
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _cpu_ns(pid: int) -> int:
    """ns of CPU the process's (one) thread has run."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


@contextlib.contextmanager
def _guest_process(
    target: Any, local_transport: LocalTransport, disk_file: tuple[Path, int], group: RingGroup, cpu: int
) -> Iterator[tuple[multiprocessing.connection.Connection, DataPlane]]:
    """A guest in a process of its own (`target`: a body of _guest) on `cpu`, its ring in
    a data plane of `group`, warmed up; the pipe to it and the data plane. Stopped, checked and
    reaped on the way out (the guest told the data plane stopped)."""
    path, fd = disk_file
    with open(path, "r+b") as f:
        f.write(os.urandom(1 << 20))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    guest = ctx.Process(target=target, args=(local_transport.socket_path, 7, str(path), cpu, child))
    guest.start()
    child.close()
    dp: DataPlane | None = None
    try:
        assert parent.poll(60), "the guest did not publish its ring"
        target_dev = DeviceTarget.from_fd(fd)
        dp = DataPlane(
            local_transport,
            7,
            ring_params_from(parent.recv()),
            target_dev,
            target_dev.limits(),
            workers=4,
            groups=RingGroups([group]),
        )
        dp.start()
        parent.send(None)
        assert parent.poll(60)
        assert parent.recv() == "warm"
        yield parent, dp
        assert dp.stop(timeout=30)
        assert dp.broken is None
        parent.send(None)
    finally:
        if dp is not None:
            dp.stop(timeout=30)
        guest.join(30)
        if guest.is_alive():
            guest.kill()
            guest.join()
    assert guest.exitcode == 0


def test_a_group_beside_a_busy_task_serves_its_rings_promptly(
    groups: list[RingGroup],
    local_transport: LocalTransport,
    disk_file: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU-bound task on the group's CPU, in the engine's session, and a guest on the other CPU
    reading 4 KiB at QD 1 for 0.5 s: the ring serves at least 2000 reads and its p99 stays under
    2.5 ms, below a tick (4 ms at HZ=250), where a wake-up of the sleeping group costs tens of us.
    (The bound was 1 ms, the scheduler's base slice: a full suite's run on a quiet host once read
    1.45 ms over 6299 reads, a slice lost to some other task, not the group's way of serving; the
    read count and the tick bound still tell the group from main's loop by 15x.) Main's loop
    failed it (p99 4.1-4.8 ms, median 4 ms: ~130 reads in 0.5 s): its poll's yield forfeited the
    rest of the group's request each idle round, and the ring waited for the next tick; the group
    here stops polling once it sees the task,
    sleeps armed and is woken ahead of it (p99 0.08-0.09 ms, ~8000 reads). The task never lets
    the CPU idle, so the group goes on sleeping beside it (ring_loop.h: a neighbour that lets the
    CPU idle is not CPU-bound): it is the sign the sleep keeps to, asserted too.

    The same task in a session of its own (another autogroup, which a yield does not reach) is
    not asserted: there main's spinning poll has the better p99 (0.013 ms, 4 ms stalls on 0.2 % of
    the reads) and the sleeping group 0.4-1.5 ms (bench/README.md, many_disks, slice20)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs: the group and the busy task on one, the guest on another")
    cpu, other = cpus[0], cpus[1]
    # the group's sleep beside a busy task (ringgroup.SHARED_NS, the default's value, set here so
    # the test holds whatever the default becomes)
    monkeypatch.setattr(ringgroup, "SHARED_NS", 1_000_000_000)
    # A CPU some group of this process saw idle lately has no CPU-bound neighbour to any group on
    # it (ring_loop.h's cpu_idle_seen, per CPU): the earlier tests' groups, with the sleep on by
    # default, saw this one idle, and the group here then rightly took the task for no such
    # neighbour for its whole 0.5 s (4 of 8 runs beside test_writegate.py). Wait that out first.
    from xenblockctl.backend import _fastpass  # built: the module skips otherwise

    time.sleep(_fastpass.IDLE_WINDOW_NS / 1e9 + 0.2)
    groups.append(RingGroup("test-group-hog", cpu=cpu))
    guest = _guest_process(_qd1_frontend, local_transport, disk_file, groups[-1], other)
    with guest as (parent, dp), _hog(cpu) as pid:
        hog0, t0 = _cpu_ns(pid), time.monotonic_ns()
        parent.send(0.5)
        assert parent.poll(60), "the guest did not finish its reads"
        waits, guest_waited = parent.recv()
        hog_share = (_cpu_ns(pid) - hog0) / (time.monotonic_ns() - t0)
    p99 = waits[len(waits) * 99 // 100] / 1e6
    # how the group served: a sleeper woken per read, or a poll that caught the refill
    found = getattr(groups[-1], "found_shared", "-")  # "-": main's group, run for the comparison
    idled = getattr(groups[-1], "found_idle", "-")
    seen = f"busy task {hog_share:.0%} of its CPU, {dp.stats}, found shared {found}, idle {idled}"
    stalled = sum(w for w in waits if w > 1_000_000) / 1e6  # ms the guest spent in reads over 1 ms
    p999, median = waits[len(waits) * 999 // 1000] / 1e6, waits[len(waits) // 2] / 1e3
    print(f"p99 {p99:.3f} ms, p99.9 {p999:.3f} ms, median {median:.0f} us, {len(waits)} reads,", end=" ")
    print(f"{stalled:.0f} ms in reads over 1 ms; {seen}")
    if guest_waited > GUEST_WAIT_MAX_NS:
        # The guest's CPU is its own here: waiting for it means other work on this host (another
        # test run, a build) took both CPUs, and the group's CPU then has more neighbours than the
        # one task this test places; the p99 measures that load, not the group (hog20: main's and
        # the branch's loops both failed it at load 4). Said, not silently passed.
        pytest.skip(f"host busy: the guest waited {guest_waited / 1e6:.1f} ms for its own CPU; {seen}")
    assert len(waits) >= 2000, f"{len(waits)} reads in 0.5 s; {seen}"
    assert p99 < 2.5, f"p99 {p99:.2f} ms over {len(waits)} reads; {seen}"
    assert idled == 0, f"the group stopped sleeping beside a task that never lets its CPU idle; {seen}"


def _bursty_frontend(
    sock: str, domid: int, path: str, cpu: int, conn: multiprocessing.connection.Connection
) -> None:
    """A guest like the bench's frontends, on `cpu` (the group's): turns of 16 reads kept in
    flight, each answer worked on for ~50 us (a turn holds the CPU for ~1 ms: longer than
    SHARED_GAP_NS), then a 2 ms wait in which the CPU idles. For as long as it is told; it sends
    the reads it made (a guest: _guest)."""
    with _guest(sock, domid, path, cpu, conn) as (fe, _expected, seconds):
        reads = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for i in range(16):
                fe.submit_read(8 * i, 4096)
            fe.kick()
            for _ in range(16):
                done = fe.collect(1, timeout=10, gather=False)
                for _c in done:
                    busy = time.perf_counter() + 50e-6  # the guest's own work on the answer
                    while time.perf_counter() < busy:
                        pass
                    fe.submit_read(8 * (reads % 256), 4096)
                    reads += 1
                fe.kick()
            while fe.outstanding:
                fe.collect(1, timeout=10, gather=False)
            time.sleep(0.002)
        conn.send(reads)


def _idle_entries(cpu: int) -> int | None:
    """How often `cpu` entered an idle state (its cpuidle states' usage; None without cpuidle)."""
    states = sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}/cpuidle").glob("state*"))
    return sum(int((s / "usage").read_text()) for s in states) if states else None


def test_a_group_polls_on_beside_a_frontend_that_feeds_it(
    groups: list[RingGroup],
    local_transport: LocalTransport,
    disk_file: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guest's frontend on the group's CPU (as the many-disks bench's are) that holds the CPU for
    ~1 ms turns, refilling its ring, and waits between turns: the group yields to it while it
    polls and catches its refills without a wake-up. Its turns are gaps as long as a CPU-bound
    task's slices (ring_loop.h's SHARED_GAP_NS), and slice20's rule took them for one: the group
    slept armed for SHARED_NS after every idle round and never polled again (many_disks lost 35-50 %
    of its IOPS so): main's group began 1-5 polls in the second, caught 0-4 refills (17 k reads).
    Here the group sees its CPU idle between the turns, so after the first gap it polls on and its
    polls catch the frontend's refills (~1050 polls, ~800 caught): at least 1 % of the requests.
    Skipped when the CPU did not idle (other tests' work on it: to the group, rightly, a neighbour
    that never lets the CPU idle) or has no cpuidle."""
    cpu = min(os.sched_getaffinity(0))
    if _idle_entries(cpu) is None:
        pytest.skip("no cpuidle here: the group cannot see its CPU idle, and sleeps as slice20's did")
    monkeypatch.setattr(ringgroup, "SHARED_NS", 1_000_000_000, raising=False)
    groups.append(RingGroup("test-group-fed", cpu=cpu))
    with _guest_process(_bursty_frontend, local_transport, disk_file, groups[-1], cpu) as (parent, dp):
        idle0 = _idle_entries(cpu)
        parent.send(1.0)
        assert parent.poll(60), "the guest did not finish its reads"
        reads = parent.recv()
        stats = dp.stats
        idle = (_idle_entries(cpu) or 0) - (idle0 or 0)
    found = getattr(groups[-1], "found_shared", "-")
    idled = getattr(groups[-1], "found_idle", "-")
    seen = f"{reads} reads, {stats}, found shared {found}, idle {idled}, the CPU idled {idle} times"
    print(seen)
    if idle < 20:  # other tests kept the CPU busy through the guest's waits
        pytest.skip(f"the CPU was kept busy by other tasks: a neighbour that never lets it idle; {seen}")
    assert reads >= 1000, seen
    assert stats.polls_caught >= stats.requests // 100, (
        f"the group slept beside the frontend that fed it; {seen}"
    )


def _slice_ns(tid: int) -> int:
    """The thread's EEVDF slice, from its /proc sched file (se.slice)."""
    with open(f"/proc/self/task/{tid}/sched") as f:
        for line in f:
            if line.startswith("se.slice"):
                return int(line.split(":")[1])
    pytest.skip("this kernel's sched file has no se.slice (before EEVDF)")


def test_a_groups_thread_runs_with_a_short_slice(group: RingGroup, make_pair: PairFactory) -> None:
    """The group's thread asks for SLICE_NS (150 us) instead of the base slice (1.4 ms on 2 CPUs):
    a frontend woken on its CPU gets the CPU once that short request is used up, and a woken group
    preempts a busy neighbour even at zero lag (bench/README.md, many_disks, slice20). A kernel
    that ignores the request (before 6.12) reports the base slice: then this is skipped, not
    failed — what the engine does there is log it once."""
    pair = _pair(make_pair, group)
    expected = pair.path.read_bytes()
    assert pair.frontend.read(0, 4096) == _block(expected, 0)
    tid = group.native_id
    assert tid is not None
    got = _slice_ns(tid)
    if got != ringgroup.SLICE_NS and not ringgroup._slice_refused.is_set():
        pytest.fail(f"the group's slice is {got} ns, and no refusal was logged")
    if ringgroup._slice_refused.is_set():
        pytest.skip(f"the kernel keeps its base slice for SCHED_OTHER ({got} ns)")
    assert got == ringgroup.SLICE_NS == 150_000
