"""Frontends without persistent grants on the Xen transport's two data paths, run on the host: data
pages grant-copied (backend/grantcopy.py, one copy per ring pass) or mapped per request, as gntdev
does them. The local transport's `data_pages="copy"` / `"map"` give the data plane exactly those
paths over real memfd grant tables, so the end-to-end tests of test_ring_dataplane run again here
on both, and the copy path's own rules (per-segment failures fail their request alone, one copy
per pass, no per-request mapping) are checked against a real ring."""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.backend import Pair, PairFactory, on_disk
from tests.unit.test_ring_dataplane import (  # noqa: F401  (collected again here, on each data path)
    test_barrier_orders_and_completes,
    test_drain_waits_for_in_flight_io,
    test_indirect_beyond_advertised_is_refused,
    test_indirect_requests,
    test_out_of_range_and_unknown_ops_answered,
    test_queue_depth_32,
    test_read_only_device_refuses_writes,
    test_reconnect_keeps_device_and_data,
    test_unmappable_indirect_page,
    test_write_read_flush_discard,
)
from tests.unit.test_ring_fuzz import DEVICE, PATTERN, test_hostile_frontend  # noqa: F401
from xenblockctl.backend import blkif, grantcopy, io
from xenblockctl.backend.blkif import IndirectRequest, Segment, SegmentRequest
from xenblockctl.backend.grantcopy import BouncePool, Staged, failures
from xenblockctl.backend.io import DeviceTarget, DiscardMode
from xenblockctl.backend.requests import READ, WRITE, IoPlan
from xenblockctl.backend.transport import xen
from xenblockctl.backend.transport.base import GNTST_BAD_GNTREF, GNTST_OKAY, Bounce, copy_segments
from xenblockctl.backend.transport.local import LocalEventChannel, LocalTransport

#: the data paths: grant copy with the native pass (where built) and its wait-and-serve loop, the
#: native pass without the loop (a Python turn per wake-up: an event channel with no native waiter),
#: grant copy by the pure-Python path alone (as without the extension), and map per request
PATHS = ["copy", "copy-noloop", "copy-python", "map"]


def _path(patch: pytest.MonkeyPatch, path: str) -> None:
    """What a data path turns off before its pairs are made."""
    if path == "copy-python":
        patch.setattr(grantcopy, "_native", None)
    if path == "copy-noloop":
        patch.setattr(LocalEventChannel, "native_waiter", lambda self: None)


@pytest.fixture(params=PATHS)
def local_transport(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalTransport]:
    """Overrides the shared fixture in this module: every pair here runs without the grant-table
    shortcut, on the path the Xen transport takes."""
    _path(monkeypatch, request.param)
    transport = LocalTransport(str(tmp_path / "grants.sock"), data_pages=request.param.split("-")[0])
    yield transport
    transport.close()


@pytest.fixture(scope="module", params=PATHS)
def fuzz_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalTransport, DeviceTarget, Path]]:
    """test_ring_fuzz's environment, on each of these data paths (the hostile frontend again)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        f.write(bytes(DEVICE) + PATTERN)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    transport = LocalTransport(str(tmp / "grants.sock"), data_pages=request.param.split("-")[0])
    target = DeviceTarget(fd=fd, size_bytes=DEVICE, discard=DiscardMode.PUNCH_HOLE, discard_granularity=512)
    with pytest.MonkeyPatch.context() as patch:
        _path(patch, request.param)
        yield transport, target, path
    transport.close()
    os.close(fd)


def _copy_pair(make_pair: PairFactory, local_transport: LocalTransport, **kw: object) -> Pair:
    if local_transport.data_pages != "copy":
        pytest.skip("the grant copy path only")
    return make_pair(**kw)


def test_no_request_maps_pages(make_pair: PairFactory, local_transport: LocalTransport) -> None:
    """Grant copy maps nothing per request: the ring pages are the only mapping, and a pass of
    32 writes (and one of 32 reads) costs one copy call each."""
    pair = _copy_pair(make_pair, local_transport, ring_page_order=1, data_pages=64)
    fe = pair.frontend
    blobs = [os.urandom(4096) for _ in range(32)]
    ids = [fe.submit_write(i * 8, blob) for i, blob in enumerate(blobs)]
    calls = local_transport.copy_calls
    done = fe.collect(32)
    assert all(done[rid].response.status == blkif.RSP_OKAY for rid in ids)
    writes_calls = local_transport.copy_calls - calls
    ids = [fe.submit_read(i * 8, 4096) for i in range(32)]
    calls = local_transport.copy_calls
    done = fe.collect(32)
    assert [done[rid].data for rid in ids] == blobs
    reads_calls = local_transport.copy_calls - calls
    # one pass takes them all unless the ring thread woke between two pushes: a few at most
    assert 1 <= writes_calls <= 4
    assert 1 <= reads_calls <= 4
    assert local_transport.map_calls == 1  # the ring
    assert local_transport.mapped_pages == 2


def test_bad_gref_fails_its_request_alone(
    make_pair: PairFactory, local_transport: LocalTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """In one pass: good writes and reads around a WRITE and a READ whose second segment names a
    ref that is not granted. Those two get RSP_ERROR with the copy's reason logged; the others
    complete and move the right bytes; nothing of the bad WRITE reaches the disk."""
    pair = _copy_pair(make_pair, local_transport, data_pages=64)
    fe = pair.frontend
    bad_ref = fe.total_pages + 1000
    good_page = fe.gref_base + 60
    fe.page(good_page)[:] = b"\x07" * 4096
    assert fe.write(0, b"a" * 8192) == blkif.RSP_OKAY
    a = fe.submit_write(256, b"c" * 8192)  # the batch's requests run in any order: apart
    segs = (Segment(good_page, 0, 7), Segment(bad_ref, 0, 7))
    fe.submit_raw(SegmentRequest(blkif.OP_WRITE, 2, 0, 901, 64, segs))
    fe.submit_raw(SegmentRequest(blkif.OP_READ, 2, 0, 902, 0, segs))
    b = fe.submit_read(0, 8192)
    with caplog.at_level(logging.WARNING):
        done = fe.collect(4)
    assert done[a].response.status == blkif.RSP_OKAY
    assert done[901].response.status == blkif.RSP_ERROR
    assert done[902].response.status == blkif.RSP_ERROR
    assert done[b].response.status == blkif.RSP_OKAY
    assert done[b].data == b"a" * 8192
    assert on_disk(pair.path, 256 * 512, 8192) == b"c" * 8192
    assert on_disk(pair.path, 64 * 512, 8192) == bytes(8192)  # the bad write moved nothing
    logged = [r.getMessage() for r in caplog.records if "error response" in r.getMessage()]
    assert any(f"id 901: grant-map: grant copy out of ref {bad_ref} (segment 1)" in m for m in logged)
    assert any(f"id 902: grant-map: grant copy into ref {bad_ref} (segment 1)" in m for m in logged)
    assert pair.dataplane.errors.counts["grant-map"] == 2
    assert fe.read(0, 4096) == b"a" * 4096  # still serving


def test_bad_indirect_page_by_copy(
    make_pair: PairFactory, local_transport: LocalTransport, caplog: pytest.LogCaptureFixture
) -> None:
    pair = _copy_pair(make_pair, local_transport)
    fe = pair.frontend
    bad = fe.total_pages + 7
    fe.submit_raw(IndirectRequest(blkif.OP_WRITE, 5, 9, 0, 0, (bad,) + (0,) * 7))
    with caplog.at_level(logging.WARNING):
        assert fe.collect(1)[9].response.status == blkif.RSP_ERROR
    assert any(
        "indirect pages unusable: " in r.getMessage()
        and f"grant copy of indirect page ref {bad} failed: bad grant ref" in r.getMessage()
        for r in caplog.records
    )


def test_no_bounce_memory_fails_that_request_alone(
    make_pair: PairFactory,
    local_transport: LocalTransport,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """mmap refusing a bounce buffer (ENOMEM: a fault the kernel gives only under real memory
    pressure, so injected) answers the requests that needed one with RSP_ERROR and a logged reason;
    the ring is not broken and smaller requests in the same pass complete. (The pool's path: the
    native pass has its own buffer, made once with the data plane.)"""
    monkeypatch.setattr(grantcopy, "_native", None)
    pair = _copy_pair(make_pair, local_transport, data_pages=64)
    fe = pair.frontend
    assert fe.write(0, b"z" * 4096) == blkif.RSP_OKAY
    real = BouncePool.take

    def take(self: BouncePool, nbytes: int) -> Bounce:
        if nbytes > 4096:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        return real(self, nbytes)

    monkeypatch.setattr(BouncePool, "take", take)
    big_write = fe.submit_write(64, b"w" * 8192)
    big_read = fe.submit_read(0, 8192)
    small = fe.submit_read(0, 4096)
    with caplog.at_level(logging.WARNING):
        done = fe.collect(3)
    assert done[big_write].response.status == blkif.RSP_ERROR
    assert done[big_read].response.status == blkif.RSP_ERROR
    assert done[small].data == b"z" * 4096
    assert on_disk(pair.path, 64 * 512, 8192) == bytes(8192)
    logged = [r.getMessage() for r in caplog.records]
    assert sum("no memory for a 8192-byte bounce buffer" in m for m in logged) == 2
    assert pair.dataplane.broken is None
    monkeypatch.undo()
    assert fe.read(0, 8192)[:4096] == b"z" * 4096


def test_reads_on_workers_copy_their_own_data(
    make_pair: PairFactory, local_transport: LocalTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A READ that misses the page cache runs on a worker, which copies its data into the guest's
    pages before answering; every buffer goes back to the pool."""
    monkeypatch.setattr(io, "execute_nowait", lambda target, plan, bufs: None)
    pair = _copy_pair(make_pair, local_transport, workers=4, data_pages=256)
    fe = pair.frontend
    data = os.urandom(200 * 4096)  # indirect
    assert fe.write(2048, data) == blkif.RSP_OKAY
    ids = {fe.submit_read(2048 + i * 8, 4096): i for i in range(16)}
    done = fe.collect(16)
    for rid, i in ids.items():
        assert done[rid].data == data[i * 4096 : (i + 1) * 4096]
    assert fe.read(2048, len(data)) == data


# --- the pieces --------------------------------------------------------------------------------------
def test_copy_segments_back_to_back() -> None:
    assert copy_segments((5, 6), None) == [(5, 0, 4096, 0), (6, 0, 4096, 4096)]
    assert copy_segments((5, 6, 7), ((512, 1024), (0, 4096), (0, 512))) == [
        (5, 512, 1024, 0),
        (6, 0, 4096, 1024),
        (7, 0, 512, 5120),
    ]


def test_failures_name_the_first_bad_segment_of_each_request() -> None:
    pool = BouncePool()
    a = Staged(pool, IoPlan(1, blkif.OP_READ, READ, 0, 8192, (10, 11)), True)
    b = Staged(pool, IoPlan(2, blkif.OP_WRITE, WRITE, 0, 4096, (12,)), False)
    try:
        assert failures([a, b], [GNTST_OKAY] * 3) == {}
        got = failures([a, b], [GNTST_OKAY, GNTST_BAD_GNTREF, GNTST_BAD_GNTREF])
        assert got == {
            0: "grant copy into ref 11 (segment 1) failed: bad grant ref (-3)",
            1: "grant copy out of ref 12 (segment 0) failed: bad grant ref (-3)",
        }
    finally:
        a.unmap()
        b.unmap()
        pool.close()


def test_bounce_pool_reuses_and_bounds() -> None:
    pool = BouncePool(max_idle_bytes=8192)
    one = pool.take(100)
    assert one.nbytes == 4096
    pool.give(one)
    assert pool.take(4096) is one  # reused
    big = pool.take(5 * 4096)
    assert big.nbytes == 8 * 4096  # rounded to a power of two of pages
    pool.give(big)  # over the idle bound: unmapped, not kept
    assert big._map is None
    pool.give(one)
    pool.close()
    assert one._map is None
    late = Bounce(4096)
    pool.give(late)  # after close: unmapped at once
    assert late._map is None


def test_grant_copy_ioctl_layout() -> None:
    """struct gntdev_grant_copy_segment as include/uapi/xen/gntdev.h lays it out (24 bytes), both
    directions, whole pages and sub-page segments, and the statuses read back from where the kernel
    writes them."""
    assert xen.IOCTL_GNTDEV_GRANT_COPY == 0x00104708
    assert xen.COPY_SEGMENT_SIZE == 24
    one, two = Bounce(8192), Bounce(8192)
    try:
        items = [((7, 9), ((512, 1024), (0, 4096)), one), ((11, 12), None, two)]
        out = xen.encode_grant_copy(3, items, to_guest=True).tobytes()
        assert len(out) == 4 * 24
        seg = struct.Struct("<QIHHHHhxx")
        assert seg.unpack_from(out, 0) == (one.address, 7, 512, 3, 1024, 2, 0)
        assert seg.unpack_from(out, 24) == (one.address + 1024, 9, 0, 3, 4096, 2, 0)
        assert seg.unpack_from(out, 48) == (two.address, 11, 0, 3, 4096, 2, 0)
        assert seg.unpack_from(out, 72) == (two.address + 4096, 12, 0, 3, 4096, 2, 0)
        back = xen.encode_grant_copy(0x7FEF, items, to_guest=False)
        raw = back.tobytes()
        assert struct.unpack_from("<IHHQHHhxx", raw, 0) == (7, 512, 0x7FEF, one.address, 1024, 1, 0)
        assert struct.unpack_from("<IHHQHHhxx", raw, 72) == (12, 0, 0x7FEF, two.address + 4096, 4096, 1, 0)
        view = memoryview(back).cast("B")
        struct.pack_into("<h", view, 24 + 20, -3)  # what the kernel writes for a bad ref
        view.release()
        assert xen.decode_copy_statuses(back) == [0, -3, 0, 0]
    finally:
        one.close()
        two.close()
