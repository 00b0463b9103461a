"""The native wait-and-serve loop of the grant-copy path (backend/_grantcopy.c loop(), grantcopy.
NativeCopy.loop, DataPlane._loop_natively): GRUB's one-page READs, one at a time, served with the
ring thread never leaving C between them — and everything around it as Python's path does it: the
answers and their journal byte for byte, the counts, the stop, a hostile req_prod judged by ring.py.

The whole grant-copy suite (tests/unit/test_grant_copy.py, the hostile-frontend fuzz included) runs
with the loop ("copy") and without it ("copy-noloop"); this file checks what is the loop's own.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.backend import PairFactory
from tests.fixtures.native import compile_sanitized, run_sanitized
from tests.fixtures.ring_thread import (
    assert_hostile_req_prod_is_judged,
    assert_journal_complete,
    assert_stop_ends_it_asleep,
)
from xenblockctl.backend import blkif, grantcopy
from xenblockctl.backend.fastpath import LoopExit
from xenblockctl.backend.ring import BackRing
from xenblockctl.backend.transport import base
from xenblockctl.backend.transport.local import LocalEventChannel, LocalTransport

if not grantcopy.native_available():
    pytest.skip("the native grant-copy pass (_grantcopy.c) is not built here", allow_module_level=True)

from xenblockctl.backend import _grantcopy

SOURCE = Path(grantcopy.__file__).with_name("_grantcopy.c")


@pytest.fixture
def local_transport(tmp_path: Path) -> object:
    """Overrides the shared fixture: frontends here have no persistent grants and Xen's copy path."""
    transport = LocalTransport(str(tmp_path / "grants.sock"), data_pages="copy")
    yield transport
    transport.close()


def test_waiter_kinds_are_the_c_loops() -> None:
    assert (base.WAIT_EVTCHN, base.WAIT_EVENTFD) == (_grantcopy.WAIT_EVTCHN, _grantcopy.WAIT_EVENTFD)


def test_grub_reads_never_come_back_to_python(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRUB's shape: 64 single-page READs, one at a time. The ring thread serves them all in the
    native loop: Python's ring pass (take_slots, the native pass's Python wrapper, _answer) never
    runs for them, and the counts are those of the requests (all ok, a notify for each answer the
    frontend waited for, a wake-up for each sleep the frontend ended). On main each request took a
    Python turn: take_slots ran 64 times."""
    taken: list[int] = []
    original = BackRing.take_slots

    def counting(self: BackRing, limit: int | None = None) -> tuple[bytes, int]:
        taken.append(1)
        return original(self, limit)

    pair = make_pair(persistent=False, workers=4, data_pages=32)
    fe, dp = pair.frontend, pair.dataplane
    with open(pair.path, "r+b") as f:
        data = os.urandom(64 * 4096)
        f.write(data)
    monkeypatch.setattr(BackRing, "take_slots", counting)
    for i in range(64):
        assert fe.read(8 * i, 4096) == data[i * 4096 : (i + 1) * 4096]
    assert dp.stop()  # its last counts go in before it returns
    assert taken == []
    assert dp._fast_copy is not None
    assert dp._fast_copy.served == 64
    stats = dp.stats
    assert (stats.requests, stats.ok, stats.errors) == (64, 64, 0)
    assert 1 <= stats.wakeups <= 64
    assert 1 <= stats.notifies <= 64


def _ring_after(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch, abi: blkif.Abi, *, loop: bool
) -> bytes:
    """The shared ring's bytes after the same requests (reads, writes, one refused), with or
    without the loop."""
    calls: list[int] = []
    original = grantcopy.NativeCopy.loop

    def counting(self: grantcopy.NativeCopy, *args: Any, **kw: Any) -> LoopExit:
        calls.append(1)
        return original(self, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(grantcopy.NativeCopy, "loop", counting)
        if not loop:
            patch.setattr(LocalEventChannel, "native_waiter", lambda self: None)
        pair = make_pair(abi=abi, persistent=False, workers=0, data_pages=16, domid=300 + loop)
        fe, dp = pair.frontend, pair.dataplane
        for i in range(40):  # more than the ring's 32 slots: the indices wrap
            if i % 3 == 0:
                assert fe.write(8 * i, bytes([i]) * 4096) == blkif.RSP_OKAY
            elif i == 20:  # a bad sector: refused by Python's path (the loop stops there)
                fe.submit_raw(
                    blkif.SegmentRequest(blkif.OP_READ, 1, 0, 999, 2**60, (blkif.Segment(0, 0, 7),))
                )
                assert fe.collect(1)[999].response.status == blkif.RSP_ERROR
            else:
                fe.read(8 * (i - i % 3), 4096)
        assert dp.stop()
        assert bool(calls) == loop
        return bytes(fe.ring._buf)


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=["x86_64", "x86_32"])
def test_answers_and_journal_are_python_paths_byte_for_byte(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch, abi: blkif.Abi
) -> None:
    """The loop writes every answer by ring.py's journal protocol (ring_answer.h, shared with
    _fastpass.respond): after the same requests the whole ring — our indices, req_event, the
    responses, the journal's words and its copy of the last response — is what Python's path
    leaves."""
    with_loop = _ring_after(make_pair, monkeypatch, abi, loop=True)
    without = _ring_after(make_pair, monkeypatch, abi, loop=False)
    # all but rsp_event (bytes 12-15): the frontend's, moved as its own waits happened to go
    assert with_loop[:12] == without[:12]
    assert with_loop[16:] == without[16:]
    assert_journal_complete(with_loop)


def test_a_successor_recovers_nothing_owed_after_the_loop(make_pair: PairFactory) -> None:
    """Issue 21: a successor engine attaching to the ring the loop served finds every taken
    request answered (rsp_prod == COMMITTED == req_prod) and nothing to run again."""
    pair = make_pair(persistent=False, workers=0, data_pages=16)
    fe, dp = pair.frontend, pair.dataplane
    for i in range(10):
        fe.read(8 * i, 4096)
    assert dp.stop()
    successor = BackRing(fe.ring._buf, blkif.X86_64, 1)
    try:
        assert successor.recovered == 0
        assert successor.outstanding_at_attach == 0
        assert successor.req_cons == fe.ring.req_prod
    finally:
        successor.release()


def test_a_hostile_req_prod_is_judged_by_ring_py(make_pair: PairFactory) -> None:
    pair = make_pair(persistent=False, workers=0, data_pages=16)
    fe = pair.frontend
    assert fe.read(0, 4096) == bytes(4096)
    assert_hostile_req_prod_is_judged(pair)


def test_stop_ends_the_loop_asleep(make_pair: PairFactory) -> None:
    pair = make_pair(persistent=False, workers=0, data_pages=16)
    fe = pair.frontend
    assert fe.read(0, 4096) == bytes(4096)
    assert_stop_ends_it_asleep(pair.dataplane)


def test_loop_under_sanitizers(tmp_path: Path) -> None:
    """loop() on a ring of random slots and random (often hostile) req_prod values, with ASan +
    UBSan, the ring in a malloc'd buffer (out-of-bounds reads or writes hit ASan's red zones), a
    copier checking every segment's bounds and failing some, a non-blocking eventfd so that where
    the loop would sleep it returns (EXIT_OSERROR, EAGAIN). After each call the indices it returns
    must be sane: nothing taken beyond req_prod, never more than a ring, answers only for taken
    slots, and the journal's COMMITTED equal to rsp_prod_pvt."""
    _, lib = compile_sanitized(SOURCE, tmp_path)
    script = textwrap.dedent(
        f"""
        import errno, mmap, os, random, struct, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import _grantcopy
        from xenblockctl.backend import blkif
        from xenblockctl.backend.transport.base import Bounce
        rnd = random.Random(21)
        fd = os.open({str(tmp_path / "disk")!r}, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 1 << 16)
        bounce = Bounce(64 * 4096)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        peer = os.eventfd(0, os.EFD_NONBLOCK)
        from tests.fixtures.loop_fuzz import ALL_EXITS, RandomRing, Stats
        stats = Stats()
        def copier(segs):
            for at in range(0, len(segs), 24):
                src, dst, length, flags = struct.unpack_from("=QQHH", segs, at)
                ours, foreign = (src, dst) if flags == 2 else (dst, src)
                assert flags in (1, 2), flags
                assert bounce.address <= ours and ours + length <= bounce.address + bounce.nbytes
                assert 0 < length and (foreign >> 32 & 0xFFFF) + length <= 4096
                struct.pack_into("=h", segs, at + 20, 0 if rnd.random() < 0.95 else -3)
        exits = set()
        for n in range(3000):
            r = RandomRing(rnd, indirect=False)
            if rnd.random() < 0.5:
                os.eventfd_write(efd, 1)
            stop = bytearray([rnd.random() < 0.05])
            got = _grantcopy.loop(memoryview(r.ring), r.size, r.start, r.start, r.start, rnd.random() < 0.5,
                                  rnd.choice([1, 4, 64]), rnd.choice([1, 3, 256]), stop, stats, stats,
                                  (2, efd, 5, peer, 0), r.abi.id_offset, 128, 65536,
                                  rnd.choice([512, 4096]), rnd.random() < 0.2, fd, fd,
                                  rnd.choice([0, 2, 2, 3]), rnd.choice([0, 2, 3]), mmap.PAGESIZE,
                                  bounce.view, 7, -1, copier)
            exits.add(r.check(got, efd))
        assert stats.requests == stats.ok == stats.served > 100, vars(stats)
        assert exits == ALL_EXITS, exits
        print("ok")
        """
    )
    run_sanitized(script, lib)
