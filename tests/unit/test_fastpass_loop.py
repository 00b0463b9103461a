"""The native wait-and-serve loop of the persistent-grant path (ring_loop.h with _fastpass.c's pass:
_fastpass.loop(), fastpath.FastPass.loop, DataPlane._loop_natively): a frontend's passes of cached
READs/WRITEs served with the ring thread never leaving C between them — and everything around it
as Python's path does it: the answers and their journal byte for byte, a hostile slot mid-batch
refused and logged by Python, the counts, the stop, the cut of a large pass after a sleep.

The data-plane suites run on "native" (the loop) and "native-noloop" (tests/fixtures/backend.py's
engine_path, the hostile-frontend fuzz included); this file checks what is the loop's own.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.backend import Pair, PairFactory
from tests.fixtures.native import compile_sanitized, run_sanitized
from tests.fixtures.ring_thread import (
    assert_hostile_req_prod_is_judged,
    assert_journal_complete,
    assert_stop_ends_it_asleep,
    sleeping_in,
)
from xenblockctl.backend import blkif, fastpath
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import FrontendError
from xenblockctl.backend.ring import BackRing, FrontRing
from xenblockctl.backend.transport import base
from xenblockctl.backend.transport.local import LocalEventChannel

if not fastpath.available():
    pytest.skip("the native fast path (_fastpass.c) is not built here", allow_module_level=True)

from xenblockctl.backend import _fastpass, _grantcopy

SOURCE = Path(fastpath.__file__).with_name("_fastpass.c")


def test_both_extensions_spell_the_loop_as_python_does() -> None:
    """One skeleton (ring_loop.h) in both extensions: their exits and waiter kinds are the ones
    fastpath.py and transport/base.py name."""
    names = ("EXIT_SLOT", "EXIT_CHECK", "EXIT_WOKEN", "EXIT_BUDGET", "EXIT_OSERROR")
    for native in (_fastpass, _grantcopy):
        assert [getattr(native, n) for n in names] == [getattr(fastpath, n) for n in names]
        assert (native.WAIT_EVTCHN, native.WAIT_EVENTFD) == (base.WAIT_EVTCHN, base.WAIT_EVENTFD)


def _round(fe: Any, expected: bytes, n: int = 32) -> None:
    ids = {fe.submit_read(8 * i, 4096): i for i in range(n)}
    done = fe.collect(n)
    assert {rid: c.data for rid, c in done.items()} == {
        rid: expected[8 * i * 512 : (8 * i + 8) * 512] for rid, i in ids.items()
    }


def test_passes_of_cached_reads_never_come_back_to_python(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4 KiB QD-32 shape, its pages cached: every pass is served in the loop — Python's ring
    pass (take_slots, _serve_fast, _answer) never runs for it — and the counts are the requests'.
    On main each pass took a Python turn: take_slots ran once a pass at least."""
    pair = make_pair(persistent=True, data_pages=32, workers=0)
    fe, dp = pair.frontend, pair.dataplane
    pair.path.write_bytes(os.urandom(1 << 20))
    expected = pair.path.read_bytes()
    for _ in range(2):  # the first round maps the pages (Python's path)
        _round(fe, expected)
    sleeping_in(dp)
    calls: list[str] = []
    for cls, name in ((BackRing, "take_slots"), (DataPlane, "_serve_fast"), (DataPlane, "_answer")):
        original = getattr(cls, name)

        def counting(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(cls, name, counting)
    fast = dp._fast
    assert fast is not None
    served = fast.served
    for _ in range(10):
        _round(fe, expected)
    assert dp.stop()  # its last counts go in before it returns
    assert calls == []
    assert fast.served == served + 320
    assert dp.stats.requests == dp.stats.ok == 384
    assert dp.stats.errors == 0
    assert dp.stats.wakeups >= 1


def _ring_after(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch, abi: blkif.Abi, *, path: str
) -> bytes:
    """The shared ring's bytes after the same requests — cached 4 KiB reads and writes, 64 KiB
    indirect ones, a refused slot in the middle of a batch — on one ring pass: "loop" (the native
    loop), "noloop" (the native pass, a Python turn per wake-up) or "python" (no native pass)."""
    calls: list[int] = []
    original = fastpath.FastPass.loop
    loop = path == "loop"

    def counting(self: fastpath.FastPass, *args: Any, **kw: Any) -> fastpath.LoopExit:
        calls.append(1)
        return original(self, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(fastpath.FastPass, "loop", counting)
        if path == "python":
            patch.setattr(fastpath.FastPass, "create", classmethod(lambda cls, *args, **kw: None))
        elif not loop:
            patch.setattr(LocalEventChannel, "native_waiter", lambda self: None)
        pair = make_pair(abi=abi, persistent=True, workers=0, data_pages=64, domid=400 + loop)
        fe, dp = pair.frontend, pair.dataplane
        for r in range(6):  # 6 x 9 requests: more than the ring's 32 slots, the indices wrap
            for i in range(8):
                if (r + i) % 3 == 0:
                    fe.submit_write(8 * i, bytes([r * 8 + i]) * 4096)
                elif i == 5:
                    fe.submit_read(128 * i, 64 * 1024)  # indirect
                else:
                    fe.submit_read(8 * i, 4096)
                if i == 3 and r % 2:  # a bad sector in the middle of the batch: Python refuses it
                    fe.submit_raw(
                        blkif.SegmentRequest(blkif.OP_READ, 1, 0, 900 + r, 2**60, (blkif.Segment(0, 0, 7),))
                    )
            done = fe.collect(8 + r % 2)
            assert [c.response.status for c in done.values()].count(blkif.RSP_OKAY) == 8
        sleeping_in(dp)  # its final check made (req_event armed) before the stop, on either path
        assert dp.stop()
        assert dp.stats.errors == 3
        assert bool(calls) == loop
        return bytes(fe.ring._buf)


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=["x86_64", "x86_32"])
def test_answers_and_journal_are_python_paths_byte_for_byte(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch, abi: blkif.Abi
) -> None:
    """The loop writes every answer by ring.py's journal protocol (ring_answer.h): after the same
    requests the whole ring — our indices, req_event, the responses, the journal's words and its
    copy of the last response — is what the native pass with a Python turn per wake-up leaves, and
    what the pure-Python pass leaves (the loop decodes and finds its pages without the GIL: the
    same answers)."""
    with_loop = _ring_after(make_pair, monkeypatch, abi, path="loop")
    entries = [(64 + i * abi.entry_size, 64 + i * abi.entry_size + abi.response_size) for i in range(32)]
    for other in ("noloop", "python"):
        without = _ring_after(make_pair, monkeypatch, abi, path=other)
        # all but rsp_event (bytes 12-15): the frontend's, moved as its own waits happened to go
        assert with_loop[:12] == without[:12], other
        assert with_loop[16:64] == without[16:64], other
        # each slot's response; the rest of a slot is the frontend's request (its page refs depend
        # on the order its LIFO pool got pages back, which follows how the answers happened to
        # arrive)
        assert [with_loop[a:b] for a, b in entries] == [without[a:b] for a, b in entries], other
    assert_journal_complete(with_loop)


def test_a_cached_pass_is_answered_while_another_thread_holds_the_gil(make_pair: PairFactory) -> None:
    """A pass of cached READs is decoded, its pages found in the cache's C index, read, answered
    and pushed by the loop without the GIL: the answers arrive while this thread holds the GIL
    the whole time (a switch interval far longer than the wait, and no call that lets it go). On
    main the loop took the GIL to decode each pass, so nothing was answered until this thread let
    it go."""
    pair = make_pair(persistent=True, data_pages=32, workers=0)
    fe, dp = pair.frontend, pair.dataplane
    pair.path.write_bytes(os.urandom(1 << 20))
    expected = pair.path.read_bytes()
    for _ in range(2):  # the first round maps the pages, the second indexes them in C
        _round(fe, expected)
    sleeping_in(dp)
    hdr = memoryview(fe.ring._buf).cast("I")
    before = hdr[2]
    ids = {fe.submit_read(8 * i, 4096): i for i in range(32)}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        fe.kick()  # one notify (its write lets the GIL go for that call only)
        deadline = time.monotonic() + 5
        while (hdr[2] - before) & 0xFFFFFFFF != 32 and time.monotonic() < deadline:
            pass  # pure Python, no blocking call: the GIL stays here
        answered = (hdr[2] - before) & 0xFFFFFFFF
    finally:
        sys.setswitchinterval(interval)
        hdr.release()
    done = fe.collect(32)
    assert answered == 32
    assert {rid: c.data for rid, c in done.items()} == {
        rid: expected[8 * i * 512 : (8 * i + 8) * 512] for rid, i in ids.items()
    }


def test_a_hostile_slot_mid_batch_goes_to_python_and_the_loop_resumes(
    make_pair: PairFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused slot among cached READs of one pass: the loop answers the READs before it, hands
    the slot (and the rest of the batch) to Python, which refuses and logs it with its reason;
    the READs after it are answered right, and the next passes are the loop's again."""
    pair = make_pair(persistent=True, data_pages=32, workers=0)
    fe, dp = pair.frontend, pair.dataplane
    pair.path.write_bytes(os.urandom(1 << 20))
    expected = pair.path.read_bytes()
    _round(fe, expected, 16)  # maps the pages
    sleeping_in(dp)
    fast = dp._fast
    assert fast is not None
    ids = {fe.submit_read(8 * i, 4096): i for i in range(8)}
    fe.submit_raw(blkif.SegmentRequest(blkif.OP_READ, 1, 0, 777, 2**60, (blkif.Segment(0, 0, 7),)))
    ids |= {fe.submit_read(8 * i, 4096): i for i in range(8, 16)}
    done = fe.collect(17)
    assert done[777].response.status == blkif.RSP_ERROR
    assert {rid: done[rid].data for rid in ids} == {
        rid: expected[8 * i * 512 : (8 * i + 8) * 512] for rid, i in ids.items()
    }
    sleeping_in(dp)
    served = fast.served
    _round(fe, expected, 16)
    assert dp.stop()
    assert fast.served == served + 16  # back in the loop
    assert dp.stats.errors == 1
    assert any("777" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_stop_while_the_loop_serves_leaves_nothing_owed(make_pair: PairFactory) -> None:
    """A stop while a frontend keeps the ring full: stop() returns promptly and the ring is left
    with every taken request answered and published (a successor recovers nothing), whether the
    loop was asleep or serving when the stop came."""
    pair = make_pair(persistent=True, data_pages=64, workers=0)
    fe, dp = pair.frontend, pair.dataplane
    done = threading.Event()
    failures: list[BaseException] = []

    def hammer() -> None:
        try:
            while not done.is_set():
                for i in range(32):
                    fe.submit_read(8 * i, 4096)
                fe.collect(32, timeout=2)
        except FrontendError:  # stopped: what it had submitted is never answered
            return
        except BaseException as exc:  # anything else fails the test, below
            failures.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        assert dp.stop(timeout=30)
        assert time.monotonic() - t0 < 5
    finally:
        done.set()
        thread.join(30)
    assert not failures, failures
    assert dp.broken is None
    assert dp._fast is not None
    assert dp._fast.served > 0
    successor = BackRing(fe.ring._buf, blkif.X86_64, 1)
    try:
        assert successor.recovered == 0
    finally:
        successor.release()
    hdr = memoryview(bytes(fe.ring._buf[:64])).cast("I")
    assert hdr[9] == hdr[2]  # COMMITTED == rsp_prod


def test_stop_ends_the_loop_asleep(make_pair: PairFactory) -> None:
    pair = make_pair(persistent=True, workers=0, data_pages=16)
    fe = pair.frontend
    for _ in range(2):  # the second read is the loop's (the first maps its page)
        assert fe.read(0, 4096) == bytes(4096)
    assert_stop_ends_it_asleep(pair.dataplane)


def test_a_hostile_req_prod_is_judged_by_ring_py(make_pair: PairFactory) -> None:
    pair = make_pair(persistent=True, workers=0, data_pages=16)
    fe = pair.frontend
    for _ in range(2):  # the second read is the loop's (the first maps its page)
        assert fe.read(0, 4096) == bytes(4096)
    assert_hostile_req_prod_is_judged(pair)


def _polling_pair(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch, poll_ns: int
) -> tuple[Pair, bytes]:
    """A pair whose loop polls `poll_ns` for the refill, its first page mapped (Python's path) and
    the loop back and asleep; and the disk's bytes."""
    monkeypatch.setattr(fastpath, "POLL_NS", poll_ns)
    pair = make_pair(persistent=True, data_pages=16, workers=0)
    pair.path.write_bytes(os.urandom(1 << 16))
    expected = pair.path.read_bytes()
    assert pair.frontend.read(0, 4096) == expected[:4096]
    sleeping_in(pair.dataplane)
    return pair, expected


def test_a_refill_within_the_poll_is_served_with_no_event_and_no_wake_up(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a pass the loop watches req_prod (fastpath.POLL_NS, here 1 s) before it arms
    req_event: a frontend that refills 50 ms after its answer finds that it need not notify
    (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY says no) and its request is answered all the same, the ring
    thread never having slept. On main the ring thread arms req_event and sleeps right after the
    pass: the push asks for a notify."""
    pair, expected = _polling_pair(make_pair, monkeypatch, 1_000_000_000)
    fe, dp = pair.frontend, pair.dataplane
    wakeups, caught = dp.stats.wakeups, dp.stats.polls_caught
    for k in range(1, 4):
        time.sleep(0.05)  # well after the pass's answer; well within its poll
        fe.submit_read(8 * k, 4096)
        assert fe.ring.push_requests() is (k == 1)  # only the first comes to a sleeping loop
        if k == 1:
            fe.evtchn.notify()
        done = fe.collect(1, timeout=5)
        assert [c.data for c in done.values()] == [expected[4096 * k : 4096 * (k + 1)]]
    sleeping_in(dp)  # the last poll missed: asleep, its counts in
    assert dp.stats.wakeups == wakeups + 1
    assert dp.stats.polls_caught == caught + 2
    assert dp.stats.requests == dp.stats.ok == 4


def test_polls_that_catch_nothing_pause_and_pause_longer(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frontend slower than the poll (it sends the next request only once the ring thread is
    asleep, as GRUB under TCG does): after ring_loop.h's POLL_MISSES (4) misses in a row the loop
    skips the poll for 1 pass, then after each further miss for twice as many (2, 4, ...): 6 polls
    in 12 passes, none caught, each request answered after a wake-up as before."""
    pair, expected = _polling_pair(make_pair, monkeypatch, 20_000_000)
    fe, dp = pair.frontend, pair.dataplane
    polls, wakeups = dp.stats.polls, dp.stats.wakeups
    for k in range(12):
        assert fe.read(8 * k, 4096) == expected[4096 * k : 4096 * (k + 1)]
        sleeping_in(dp)
    # polls at passes 1-4 (misses), 6 (pause of 1 before it), 9 (pause of 2); 10-12 in a pause of 4
    assert dp.stats.polls - polls == 6
    assert dp.stats.polls_caught == 0
    assert dp.stats.wakeups - wakeups == 12


@pytest.mark.parametrize("after_sleep", [True, False], ids=["after-a-sleep", "no-sleep"])
def test_the_first_pass_after_a_sleep_is_published_in_cut_runs(tmp_path: Path, after_sleep: bool) -> None:
    """_fastpass.loop() directly, on a ring in our memory: four cached 4 KiB READs with cut = 8 KiB.
    After a wake-up (pending) the pass is answered in two runs, each pushed before the next one's
    I/O (DataPlane._cut_for_pass's rule, here in C); a pass that does not follow a sleep is one
    run. note_used is called once per run, after its push: it records rsp_prod then."""
    abi = blkif.X86_64
    ring = bytearray(4096)
    front = FrontRing(memoryview(ring), abi, 1)
    pages = {100 + i: memoryview(bytearray(4096)) for i in range(4)}
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(1 << 16))
    fd = os.open(disk, os.O_RDWR)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    peer = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        for i in range(4):
            front.put_request(
                blkif.SegmentRequest(blkif.OP_READ, 1, 0, i, 8 * i, (blkif.Segment(100 + i, 0, 7),))
            )
        front.push_requests()
        hdr = memoryview(ring).cast("I")
        pushes: list[int] = []

        class Counts:
            requests = ok = wakeups = notifies = served = 0

        counts = Counts()
        got = _fastpass.loop(
            memoryview(ring), front.size, 0, 0, 0, after_sleep, 64, 256, bytearray(1), counts, counts,
            (base.WAIT_EVENTFD, efd, 0, peer, 0),
            abi.id_offset, 128, 1 << 16, 512, False, 0, fd, fd,
            _fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK, os.sysconf("SC_PAGESIZE"), pages,
            lambda refs: pushes.append(hdr[2]), 8192,
        )  # fmt: skip
        assert got[0] == _fastpass.EXIT_OSERROR  # it would sleep: the eventfd is non-blocking
        assert got[8] == counts.requests == counts.served == 4
        assert pushes == ([2, 4] if after_sleep else [4])
        assert [r.status for r in front.take_responses()] == [blkif.RSP_OKAY] * 4
        data = disk.read_bytes()
        assert [bytes(pages[100 + i]) for i in range(4)] == [
            data[4096 * i : 4096 * (i + 1)] for i in range(4)
        ]
        hdr.release()
    finally:
        os.close(fd)
        os.close(efd)
        os.close(peer)


def test_indexed_pages_are_noted_once_a_report_and_a_replaced_page_is_never_used(tmp_path: Path) -> None:
    """_fastpass.loop() directly with the cache's pages in a Pages (the C index the loop reads
    without the GIL): a take of 4 cached READs in runs of 2 (`batch`) notes its refs once, at the
    report (here the exit where it would sleep), in ring order — on main once per run, the GIL
    taken for each. Then the cache swaps page 101 for another mapping (its pop drops the C entry
    first): the next READ of ref 101 goes into the new page, never the old one, and a ref the cache
    dropped stops the loop at its slot (Python's path maps it)."""
    abi = blkif.X86_64
    ring = bytearray(4096)
    front = FrontRing(memoryview(ring), abi, 1)
    old = {100 + i: memoryview(bytearray(4096)) for i in range(4)}
    pages = _fastpass.Pages(old)
    disk = tmp_path / "disk"
    disk.write_bytes(os.urandom(1 << 16))
    data = disk.read_bytes()
    fd = os.open(disk, os.O_RDWR)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    peer = os.eventfd(0, os.EFD_NONBLOCK)
    noted: list[list[int]] = []

    class Counts:
        requests = ok = wakeups = notifies = served = 0

    counts = Counts()

    def run(refs: list[int], cons: int, batch: int) -> tuple[Any, ...]:
        for k, ref in enumerate(refs):
            front.put_request(
                blkif.SegmentRequest(blkif.OP_READ, 1, 0, cons + k, 8 * k, (blkif.Segment(ref, 0, 7),))
            )
        front.push_requests()
        return tuple(
            _fastpass.loop(
                memoryview(ring), front.size, cons, cons, cons, False, batch, 256, bytearray(1),
                counts, counts,
                (base.WAIT_EVENTFD, efd, 0, peer, 0),
                abi.id_offset, 128, 1 << 16, 512, False, 0, fd, fd,
                _fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK, os.sysconf("SC_PAGESIZE"), pages,
                lambda refs: noted.append(list(refs)), 0,
            )
        )  # fmt: skip

    try:
        got = run([100, 101, 102, 103], 0, 2)
        assert got[0] == _fastpass.EXIT_OSERROR  # it would sleep: the eventfd is non-blocking
        assert got[8] == 4
        assert noted == [[100, 101, 102, 103]]
        assert [r.status for r in front.take_responses()] == [blkif.RSP_OKAY] * 4
        assert [bytes(old[100 + k]) for k in range(4)] == [data[4096 * k : 4096 * (k + 1)] for k in range(4)]
        new = memoryview(bytearray(4096))
        old[101][:] = bytes(4096)
        pages[101] = new  # the cache replaced the page: the C entry went with the old view
        del pages[103]  # and dropped this one
        noted.clear()
        got = run([101, 103], 4, 64)
        assert got[0] == _fastpass.EXIT_SLOT
        assert got[6:8] == (1, 2)  # ref 103 is Python's
        assert noted == [[101]]
        assert bytes(new) == data[:4096]
        assert bytes(old[101]) == bytes(4096)
        old[101].release()  # nothing holds an export on the replaced view any more
    finally:
        os.close(fd)
        os.close(efd)
        os.close(peer)


def test_loop_under_sanitizers(tmp_path: Path) -> None:
    """_fastpass.loop() on rings of random slots (direct and indirect, often hostile) and random
    req_prod values, with ASan + UBSan, the ring in a malloc'd buffer, the cache's Pages changed
    between calls, a non-blocking eventfd so that where the loop would sleep it returns
    (EXIT_OSERROR, EAGAIN). After each call the indices it returns must be sane: nothing taken
    beyond req_prod, never more than a ring, answers only for taken slots, the journal's
    COMMITTED equal to rsp_prod_pvt, and note_used given the refs of what it answered."""
    _, lib = compile_sanitized(SOURCE, tmp_path)
    script = textwrap.dedent(
        f"""
        import errno, mmap, os, random, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import _fastpass
        from xenblockctl.backend import blkif
        rnd = random.Random(22)
        fd = os.open({str(tmp_path / "disk")!r}, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 1 << 16)
        memory = mmap.mmap(-1, 8 * 4096)
        view = memoryview(memory)
        for at in range(0, 8 * 4096, 8):  # descriptor pages for indirect requests
            view[at:at + 8] = bytes([rnd.randrange(16), 0, 0, 0, rnd.randrange(9), rnd.randrange(9), 0, 0])
        entries = {{g: view[(g % 8) * 4096:(g % 8 + 1) * 4096] for g in range(16)}}
        pages = _fastpass.Pages(entries)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        peer = os.eventfd(0, os.EFD_NONBLOCK)
        from tests.fixtures.loop_fuzz import ALL_EXITS, RandomRing, Stats
        stats = Stats()
        noted = []
        def note_used(refs):
            assert refs.format == "I", refs.format
            noted.append(len(refs))
        exits = set()
        for n in range(3000):
            r = RandomRing(rnd, indirect=True)
            if rnd.random() < 0.5:
                os.eventfd_write(efd, 1)
            stop = bytearray([rnd.random() < 0.05])
            before = len(noted)
            got = _fastpass.loop(memoryview(r.ring), r.size, r.start, r.start, r.start, rnd.random() < 0.5,
                                 rnd.choice([1, 4, 64]), rnd.choice([1, 3, 256]), stop, stats, stats,
                                 (2, efd, 5, peer, 0), r.abi.id_offset, 128, 65536,
                                 rnd.choice([512, 4096]), rnd.random() < 0.2, rnd.choice([0, 512]),
                                 fd, fd, rnd.choice([0, 2, 2, 3]), rnd.choice([0, 2, 3]), mmap.PAGESIZE,
                                 rnd.choice([pages, pages, entries]), note_used, rnd.choice([0, 4096, 8192]),
                                 rnd.choice([0, 0, 2000]))
            exits.add(r.check(got, efd))
            assert got[8] == 0 or len(noted) > before
            g = rnd.randrange(16)
            if rnd.random() < 0.5:
                pages.pop(g, None)
            else:
                pages[g] = entries[g]
        assert stats.requests == stats.ok == stats.served > 30, vars(stats)
        assert exits == ALL_EXITS, exits
        print("ok")
        """
    )
    run_sanitized(script, lib)
