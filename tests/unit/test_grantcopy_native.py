"""The native grant-copy pass (backend/_grantcopy.c via grantcopy.NativeCopy) against the Python rules.

Its decoder is another implementation of requests.validate_slot's rules for direct READ/WRITE
requests: the agreement tests feed both arbitrary slot bytes and well-formed requests with hostile
fields and require the same verdict (and, when accepted, the same range and segments). `serve` then
runs against a real file and the local transport's simulated grant copy (the same 24-byte gntdev
segments the ioctl takes); a data plane of a frontend without persistent grants serves GRUB's
shape of request (one page, one at a time) there, and everything it must not serve — a bad ref, a
read that would block — goes to the pure-Python path, which answers and logs it as before
(tests/unit/test_grant_copy.py runs the whole copy suite with and without this pass).
"""

from __future__ import annotations

import logging
import mmap
import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.backend import PairFactory, on_disk
from tests.fixtures.native import compile_extension, compile_sanitized, limits_st, request_st, run_sanitized
from xenblockctl.backend import blkif, grantcopy, io
from xenblockctl.backend.blkif import Segment, SegmentRequest
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.requests import READ, WRITE, DeviceLimits, IoPlan, validate_slot
from xenblockctl.backend.transport.base import Bounce
from xenblockctl.backend.transport.local import LocalTransport

if not grantcopy.native_available():
    pytest.skip("the native grant-copy pass (_grantcopy.c) is not built here", allow_module_level=True)

from xenblockctl.backend import _grantcopy

SOURCE = Path(grantcopy.__file__).with_name("_grantcopy.c")
ABIS = [blkif.X86_64, blkif.X86_32]


@pytest.fixture
def local_transport(tmp_path: Path) -> object:
    """Overrides the shared fixture: frontends here have no persistent grants and Xen's copy path."""
    transport = LocalTransport(str(tmp_path / "grants.sock"), data_pages="copy")
    yield transport
    transport.close()


def assert_agree(abi: blkif.Abi, slot: bytes, limits: DeviceLimits) -> None:
    def no_indirect(refs: object) -> bytes:
        raise KeyError("no indirect pages here")

    plan = validate_slot(abi, slot, 0, limits, no_indirect)
    got = _grantcopy.check(
        slot,
        0,
        abi.id_offset,
        limits.sectors,
        limits.sectors * 512,
        limits.logical_block_size,
        limits.read_only,
    )
    simple = isinstance(plan, IoPlan) and plan.kind in (READ, WRITE) and slot[0] in (0, 1)
    if not simple:
        assert got is None, (plan, got)
        return
    assert isinstance(plan, IoPlan)
    assert got == (
        plan.id,
        plan.operation,
        plan.offset,
        plan.length,
        tuple((s.gref, s.offset, s.length) for s in plan.segments),
    )


@settings(max_examples=3000, deadline=None)
@given(abi=st.sampled_from(ABIS), slot=st.binary(min_size=112, max_size=112), limits=limits_st)
def test_agrees_with_validate_slot_on_any_bytes(abi: blkif.Abi, slot: bytes, limits: DeviceLimits) -> None:
    head = bytearray(slot)
    head[0] %= 3
    head[1] %= 13
    assert_agree(abi, bytes(head[: abi.entry_size]), limits)


@settings(max_examples=3000, deadline=None)
@given(abi=st.sampled_from(ABIS), req=request_st, limits=limits_st)
def test_agrees_with_validate_slot_on_requests(
    abi: blkif.Abi, req: SegmentRequest, limits: DeviceLimits
) -> None:
    assert_agree(abi, abi.encode_request(req), limits)


def test_accepts_what_grub_and_blkfront_send() -> None:
    """Not vacuous: GRUB's one-page READ and full 11-segment requests are accepted."""
    limits = DeviceLimits(sectors=1 << 20)
    for abi in ABIS:
        grub = abi.encode_request(SegmentRequest(0, 1, 0, 0, 2048, (Segment(8, 0, 7),)))
        assert _grantcopy.check(grub, 0, abi.id_offset, 1 << 20, 1 << 29, 512, False) == (
            0,
            0,
            2048 * 512,
            4096,
            ((8, 0, 4096),),
        )
        segs = tuple(Segment(100 + i, 0, 7) for i in range(11))
        for op in (blkif.OP_READ, blkif.OP_WRITE):
            assert_agree(abi, abi.encode_request(SegmentRequest(op, 11, 0, 7, 88, segs)), limits)


# --- serve() on a real file, with the local transport's copy --------------------------------------
def _bytes(fe: LocalFrontend, ref: int, count: int = 1) -> bytes:
    """A copy of the frontend's pages (the view released at once: the frontend closes its map)."""
    view = fe.page(ref, count)
    try:
        return bytes(view)
    finally:
        view.release()


def test_serve_copies_and_stops_where_python_must_take_over(tmp_path: Path) -> None:
    """READs land in the granted pages, WRITEs take their bytes from them; a bad ref, a FLUSH and a
    read that would block each end the run at its slot, with nothing answered for it."""
    abi = blkif.X86_64
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(64 * 1024))
    before = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    transport = LocalTransport(str(tmp_path / "g.sock"), data_pages="copy")
    fe = LocalFrontend(transport.socket_path, 5, persistent=False, data_pages=8)
    bounce = Bounce(grantcopy.NATIVE_BOUNCE_BYTES)
    try:
        how = transport.native_copier(5, bounce)
        assert how is not None
        assert how[0] == -1
        base = fe.reserve_pages(4)[0]
        fe.page(base + 1)[:] = b"w" * 4096
        bad = fe.total_pages + 50
        slots = [
            SegmentRequest(0, 2, 0, 1, 0, (Segment(base, 0, 7), Segment(base + 2, 0, 3))),  # 6 KiB read
            SegmentRequest(1, 1, 0, 2, 16, (Segment(base + 1, 0, 7),)),  # 4 KiB write
            SegmentRequest(3, 0, 0, 3, 0, ()),  # FLUSH: Python's
            SegmentRequest(0, 1, 0, 4, 0, (Segment(base + 3, 1, 2),)),  # sub-page read
            SegmentRequest(0, 1, 0, 5, 0, (Segment(bad, 0, 7),)),  # not granted: Python's
            SegmentRequest(1, 1, 0, 6, 0, (Segment(bad, 0, 7),)),
        ]
        data = b"".join(abi.encode_request(s) for s in slots)
        mode = _grantcopy.MODE_BLOCK
        args = (
            abi.id_offset,
            128,
            65536,
            512,
            False,
            fd,
            fd,
            mode,
            mode,
            mmap.PAGESIZE,
            bounce.view,
            5,
            *how,
        )
        calls = transport.copy_calls
        assert _grantcopy.serve(data, 0, len(slots), *args) == ([(1, 0, 0), (2, 1, 0)], 2)
        assert transport.copy_calls == calls + 2  # one copy out (the WRITE), one in (the READ)
        assert _bytes(fe, base) == before[:4096]
        assert _bytes(fe, base + 2)[:2048] == before[4096:6144]
        assert path.read_bytes()[16 * 512 : 16 * 512 + 4096] == b"w" * 4096
        assert _grantcopy.serve(data, 3, len(slots), *args) == ([(4, 0, 0)], 4)
        assert _bytes(fe, base + 3)[512:1536] == before[:1024]  # sectors 0-1 into bytes 512..1535
        assert _grantcopy.serve(data, 4, len(slots), *args) == ([], 4)  # the copy into ref `bad` failed
        assert _grantcopy.serve(data, 5, len(slots), *args) == ([], 5)  # the copy out of it failed
        assert path.read_bytes()[:4096] == before[:4096]  # ... and nothing was written
        # a read-only device, a READ where run_now would hand it to a worker, a read past the file
        ro = (abi.id_offset, 128, 65536, 512, True, fd, fd, mode, mode, mmap.PAGESIZE, bounce.view, 5, *how)
        assert _grantcopy.serve(data, 1, 2, *ro) == ([], 1)
        stop = (abi.id_offset, 128, 65536, 512, False, fd, fd, _grantcopy.MODE_STOP, mode)
        assert _grantcopy.serve(data, 0, 2, *stop, mmap.PAGESIZE, bounce.view, 5, *how) == ([], 0)
        past = abi.encode_request(SegmentRequest(0, 1, 0, 7, 127, (Segment(base, 0, 7),)))
        big = (abi.id_offset, 1 << 20, 1 << 29, 512, False, fd, fd, mode, mode, mmap.PAGESIZE, bounce.view, 5)
        assert _grantcopy.serve(past, 0, 1, *big, *how) == ([], 0)
        with pytest.raises(ValueError, match="outside"):
            _grantcopy.serve(data, 0, len(slots) + 1, *args)
        with pytest.raises(ValueError, match="bounce"):
            _grantcopy.serve(data, 0, 1, *args[:10], bounce.view[:4096], 5, *how)
    finally:
        bounce.close()
        fe.close()
        transport.close()
        os.close(fd)


def test_serve_runs_a_pass_larger_than_its_buffer_in_chunks(tmp_path: Path) -> None:
    """64 eleven-page READs (2.8 MiB) through the 1 MiB buffer: all served in one call."""
    abi = blkif.X86_64
    path = tmp_path / "disk"
    content = os.urandom(64 * 44 * 1024)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    transport = LocalTransport(str(tmp_path / "g.sock"), data_pages="copy")
    fe = LocalFrontend(transport.socket_path, 6, persistent=False, data_pages=64 * 11)
    bounce = Bounce(grantcopy.NATIVE_BOUNCE_BYTES)
    try:
        how = transport.native_copier(6, bounce)
        assert how is not None
        base = fe.reserve_pages(64 * 11)[0]
        reqs = [
            SegmentRequest(0, 11, 0, i, i * 88, tuple(Segment(base + i * 11 + j, 0, 7) for j in range(11)))
            for i in range(64)
        ]
        data = b"".join(abi.encode_request(r) for r in reqs)
        sectors = len(content) // 512
        mode = _grantcopy.MODE_BLOCK
        got = _grantcopy.serve(
            data, 0, 64, abi.id_offset, sectors, len(content), 512, False, fd, fd, mode, mode,
            mmap.PAGESIZE, bounce.view, 6, *how,
        )  # fmt: skip
        assert got == ([(i, 0, 0) for i in range(64)], 64)
        assert _bytes(fe, base, 64 * 11) == content
    finally:
        bounce.close()
        fe.close()
        transport.close()
        os.close(fd)


# --- inside the data plane ---------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 4])
def test_data_plane_serves_grub_reads_natively(make_pair: PairFactory, workers: int) -> None:
    """GRUB's shape: one single-page READ at a time, no persistent grants. Each is served by the
    native pass with two grant copies at most per request (none out, one in), answered once."""
    pair = make_pair(persistent=False, workers=workers, data_pages=32)
    fe, dp = pair.frontend, pair.dataplane
    native = dp._fast_copy
    assert native is not None
    data = os.urandom(64 * 4096)
    assert fe.write(0, data[: 11 * 4096]) == blkif.RSP_OKAY  # a WRITE through the native pass too
    with open(pair.path, "r+b") as f:
        f.write(data)
    for i in range(64):
        assert fe.read(8 * i, 4096) == data[i * 4096 : (i + 1) * 4096]
    # the wait-and-serve loop counts a request just after its answer is out: all in once it ended
    assert dp.stop()
    # the WRITE too where it runs inline (workers=0); with workers a buffered RWF_NOWAIT write may
    # be refused (EAGAIN) and go to a worker through Python's path
    assert native.served == 65 if workers == 0 else native.served >= 64
    assert dp.stats.errors == 0
    assert dp.stats.requests == 65
    assert on_disk(pair.path, 0, len(data)) == data


def test_data_plane_falls_back_for_what_the_pass_refuses(
    make_pair: PairFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A READ the page cache cannot serve without blocking goes to a worker (Python's path), and a
    bad ref is answered RSP_ERROR with the copy's reason logged, once — then the pass goes on."""
    pair = make_pair(persistent=False, workers=4, data_pages=32)
    fe, dp = pair.frontend, pair.dataplane
    native = dp._fast_copy
    assert native is not None
    assert fe.write(0, b"q" * 8192) == blkif.RSP_OKAY
    bad = fe.total_pages + 9
    fe.submit_raw(SegmentRequest(blkif.OP_READ, 1, 0, 700, 0, (Segment(bad, 0, 7),)))
    with caplog.at_level(logging.WARNING):
        assert fe.collect(1)[700].response.status == blkif.RSP_ERROR
    logged = [r.getMessage() for r in caplog.records if "error response" in r.getMessage()]
    assert sum(f"id 700: grant-map: grant copy into ref {bad} (segment 0)" in m for m in logged) == 1
    # RWF_NOWAIT refused: the native pass stops, Python's run_now hands it to a worker
    monkeypatch.setattr(io, "execute_nowait", lambda target, plan, bufs: None)
    monkeypatch.setattr(type(dp.executor), "placement", lambda self: (io.Where.POOL, io.Where.POOL))
    # the wait-and-serve loop takes its placement when it starts, and the ring thread may have
    # restarted it before the patch: one more request it refuses (a bad ref) sends it back through
    # Python's path, which starts it again with the patched placement. Its counts are settled when
    # it exits for that slot, before Python answers it, so `served` is read after the answer.
    fe.submit_raw(SegmentRequest(blkif.OP_READ, 1, 0, 701, 0, (Segment(bad, 0, 7),)))
    with caplog.at_level(logging.WARNING):
        assert fe.collect(1)[701].response.status == blkif.RSP_ERROR
    served = native.served
    assert fe.read(0, 8192) == b"q" * 8192
    assert native.served == served
    monkeypatch.undo()
    # the wait-and-serve loop took its placement when it last started (before the undo): the next
    # request may still stop there and go through Python's path, which brings the loop back
    assert fe.read(0, 4096) == b"q" * 4096
    assert fe.read(0, 4096) == b"q" * 4096
    assert dp.stop()  # the loop counts a request after its answer is out: all in once it ended
    assert native.served > served
    assert dp.broken is None


def test_native_off_or_without_the_module(make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_pair(persistent=True).dataplane._fast_copy is None  # persistent: the other pass
    monkeypatch.setattr(grantcopy, "_native", None)
    pair = make_pair(persistent=False)
    assert pair.dataplane._fast_copy is None
    assert pair.frontend.read(0, 4096) == bytes(4096)


# --- the build ---------------------------------------------------------------------------------------
def test_builds_without_warnings(tmp_path: Path) -> None:
    compile_extension(SOURCE, tmp_path, "-O2")


def test_serve_under_sanitizers(tmp_path: Path) -> None:
    """serve() on random slots with ASan + UBSan, its copier checking every segment it is given: our
    side inside the bounce buffer, the guest's inside its page, the domain the data plane's; the
    copier fails segments at random (any sanitizer report aborts the child)."""
    _, lib = compile_sanitized(SOURCE, tmp_path)
    script = textwrap.dedent(
        f"""
        import mmap, os, random, struct, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import _grantcopy
        from xenblockctl.backend import blkif
        from xenblockctl.backend.transport.base import Bounce
        rnd = random.Random(20)
        fd = os.open({str(tmp_path / "disk")!r}, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 1 << 16)
        bounce = Bounce(64 * 4096)
        seen = [0]
        def copier(segs):
            for at in range(0, len(segs), 24):
                src, dst, length, flags = struct.unpack_from("=QQHH", segs, at)
                ours, foreign = (src, dst) if flags == 2 else (dst, src)
                assert flags in (1, 2), flags
                assert bounce.address <= ours and ours + length <= bounce.address + bounce.nbytes
                assert 0 < length and (foreign >> 32 & 0xFFFF) + length <= 4096
                assert foreign >> 48 == 7
                struct.pack_into("=h", segs, at + 20, 0 if rnd.random() < 0.9 else -3)
                seen[0] += 1
        for n in range(20000):
            abi = rnd.choice([blkif.X86_64, blkif.X86_32])
            count = rnd.randrange(1, 40)
            data = bytearray(rnd.randbytes(abi.entry_size * count))
            for k in range(count):
                base = k * abi.entry_size
                data[base] = rnd.choice([0, 0, 1, 2]); data[base + 1] %= 13
                for i in range(11):
                    at = base + abi.segments_offset + 8 * i
                    data[at + 4] %= 9; data[at + 5] %= 9
                    if rnd.random() < 0.9:  # mostly valid: first <= last <= 7
                        data[at + 4], data[at + 5] = 0, rnd.randrange(8)
                if rnd.random() < 0.9:
                    data[base + 1] = rnd.randrange(1, 3)
                    at = base + abi.id_offset + 8
                    data[at:at + 8] = rnd.randrange(140).to_bytes(8, "little")
            sectors = rnd.choice([0, 8, 128, 128, 2**40])
            got, stop = _grantcopy.serve(bytes(data), 0, count, abi.id_offset, min(sectors, 128), 65536,
                                         rnd.choice([512, 512, 4096]), rnd.random() < 0.2, fd, fd,
                                         rnd.choice([0, 2, 2, 3]), rnd.choice([0, 2, 3]), mmap.PAGESIZE,
                                         bounce.view, 7, -1, copier)
            assert 0 <= stop <= count and len(got) <= stop
        assert seen[0] > 2000, seen
        print("ok")
        """
    )
    run_sanitized(script, lib)
