"""The data plane against a real loop device (root): BLKDISCARD, fdatasync through the loop driver,
geometry from the kernel layer's BlockDevice, read-only loop devices."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import threading

import pytest

from tests.fixtures.backend import PairFactory, on_disk
from tests.fixtures.kernel import ImageFactory
from tests.fixtures.ring_thread import sleeping_in
from xenblockctl.backend import blkif, io
from xenblockctl.backend.io import DeviceTarget, DiscardMode
from xenblockctl.backend.requests import IoPlan, Kind
from xenblockctl.kernel import loop

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=lambda a: a.protocol)
def test_loop_device_end_to_end(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, make_pair: PairFactory, abi: blkif.Abi
) -> None:
    # loop_devices comes first so it is torn down last: the data plane stops before the device closes
    image = make_image(size=16 << 20)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring")
    loop_devices.append(dev)
    target = DeviceTarget.from_block_device(dev)
    assert target.size_bytes == 16 << 20
    assert target.discard is DiscardMode.BLKDISCARD  # loop on a file that can punch holes
    pair = make_pair(abi=abi, ring_page_order=2, target=target, data_pages=128)
    fe = pair.frontend
    data = os.urandom(100 * 4096)  # indirect
    assert fe.write(4096, data) == blkif.RSP_OKAY
    assert fe.flush() == blkif.RSP_OKAY  # fdatasync on the loop device pushes it to the file
    assert on_disk(image, 4096 * 512, len(data)) == data
    assert fe.read(4096, len(data)) == data
    assert fe.discard(4096, 64) == blkif.RSP_OKAY
    assert fe.flush() == blkif.RSP_OKAY
    assert fe.read(4096, 64 * 512) == bytes(64 * 512)
    assert on_disk(image, 4096 * 512, 64 * 512) == bytes(64 * 512)
    last = target.sectors - 8
    assert fe.write(last, b"z" * 4096) == blkif.RSP_OKAY
    assert fe.write(last + 1, b"z" * 4096) == blkif.RSP_ERROR  # one sector past the end


def test_read_only_loop(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, make_pair: PairFactory
) -> None:
    image = make_image(size=4 << 20, fill=b"ro-data!" * 512)
    dev = loop.attach_file(str(image), read_only=True, tag="xenblockctl:test-ring-ro")
    loop_devices.append(dev)
    target = DeviceTarget.from_block_device(dev)
    assert target.read_only
    pair = make_pair(target=target)
    fe = pair.frontend
    assert fe.read(0, 4096) == b"ro-data!" * 512
    assert fe.write(0, bytes(4096)) == blkif.RSP_ERROR
    assert fe.discard(0, 8) == blkif.RSP_EOPNOTSUPP
    assert on_disk(image, 0, 4096) == b"ro-data!" * 512


def test_cold_reads_go_to_workers_cached_reads_stay_inline(
    loop_devices: list[loop.LoopDevice],
    make_image: ImageFactory,
    make_pair: PairFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh loop device has an empty page cache: RWF_NOWAIT answers EAGAIN and the read goes to an
    I/O worker (where waiting overlaps); the same range read again is cached and served inline."""
    image = make_image(size=4 << 20)
    with open(image, "r+b") as f:
        f.seek(2 << 20)  # away from the start and end that udev's probe reads
        f.write(os.urandom(64 * 1024))
    dev = loop.attach_file(str(image), read_only=True, tag="xenblockctl:test-ring-nowait")
    loop_devices.append(dev)
    target = DeviceTarget.from_block_device(dev)
    on_workers: list[int] = []
    real = io.execute

    def recording_execute(target: DeviceTarget, plan: IoPlan, bufs: list[memoryview]) -> int:
        on_workers.append(plan.offset)
        return real(target, plan, bufs)

    monkeypatch.setattr(io, "execute", recording_execute)
    pair = make_pair(target=target, workers=2, data_pages=16)
    fe = pair.frontend
    sector = (2 << 20) // 512
    data = fe.read(sector, 64 * 1024)
    assert data == on_disk(image, 2 << 20, 64 * 1024)
    try:
        os.preadv(dev.fd, [bytearray(4096)], 2 << 20, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            pytest.skip("this kernel has no RWF_NOWAIT reads on block devices")
        raise
    assert on_workers == [2 << 20]
    assert fe.read(sector, 64 * 1024) == data
    assert on_workers == [2 << 20]  # the second time the ring thread served it from the cache


def test_page_aligned_writes_run_inline_when_nowait_writes_are_unsupported(
    loop_devices: list[loop.LoopDevice],
    make_image: ImageFactory,
    make_pair: PairFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Buffered writes to a block device (one without an O_DIRECT fd) have no RWF_NOWAIT. A WRITE
    covering whole host pages cannot make the kernel read (no read-modify-write), so it runs on the
    ring thread instead of paying the pool's GIL hand-offs; a WRITE with a partial page (which could
    wait for a disk read) still goes to a worker. Either way the bytes land where they should."""
    page = mmap.PAGESIZE
    image = make_image(size=8 << 20)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring-write-inline")
    loop_devices.append(dev)
    try:
        os.pwritev(dev.fd, [bytearray(page)], 0, os.RWF_NOWAIT)
        pytest.skip("this kernel has RWF_NOWAIT for buffered block-device writes")
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    target = DeviceTarget.from_block_device(dev)
    threads: dict[int, str] = {}  # offset -> the thread that wrote it
    real = io.execute

    def recording_execute(target: DeviceTarget, plan: IoPlan, bufs: list[memoryview]) -> int:
        if plan.kind is Kind.WRITE:
            threads[plan.offset] = threading.current_thread().name
        return real(target, plan, bufs)

    monkeypatch.setattr(io, "execute", recording_execute)
    # the buffered path: what a device that cannot be reopened with O_DIRECT gets (DirectWriter.open
    # says None for it; a loop device always can, so it is turned off here)
    monkeypatch.setattr(io.DirectWriter, "open", classmethod(lambda cls, target, name: None))
    pair = make_pair(target=target, workers=2, data_pages=512)
    fe = pair.frontend
    pool_thread = re.compile(r"-io_\d+$")  # ThreadPoolExecutor(thread_name_prefix=...-io)
    aligned = {
        1 << 20: os.urandom(1 << 20),  # indirect, 256 segments: the first write also learns EOPNOTSUPP
        3 << 20: os.urandom(page),
        4 << 20: os.urandom(8 * page),
    }
    unaligned = {
        (5 << 20) + 512: os.urandom(page),  # whole length, offset inside a page
        6 << 20: os.urandom(page + 512),  # aligned offset, ragged end
        (7 << 20) + 1024: os.urandom(512),  # a sector inside a page
    }
    for offset, data in {**aligned, **unaligned}.items():
        assert fe.write(offset // 512, data) == blkif.RSP_OKAY
    for offset in aligned:
        assert not pool_thread.search(threads[offset]), f"aligned write at {offset} ran on {threads[offset]}"
    for offset in unaligned:
        assert pool_thread.search(threads[offset]), f"unaligned write at {offset} ran on {threads[offset]}"
    assert fe.flush() == blkif.RSP_OKAY
    for offset, data in {**aligned, **unaligned}.items():
        assert fe.read(offset // 512, len(data)) == data
        assert on_disk(image, offset, len(data)) == data


# --- issue 20: WRITEs with O_DIRECT on a second fd of the device ---------------------------------
class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_SYS_CACHESTAT = 451  # the same number on every architecture (Linux >= 6.5)
_libc = ctypes.CDLL(None, use_errno=True)


def _cached(fd: int, offset: int, length: int) -> tuple[int, int]:
    """(cached, dirty) pages of the range in the device's page cache, from cachestat(2)."""
    stat = _CacheStat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(offset, length)), ctypes.byref(stat), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            pytest.skip("no cachestat(2) on this kernel (Linux >= 6.5)")
        raise OSError(err, os.strerror(err))
    return stat.nr_cache, stat.nr_dirty


def _device_fds(devt: int) -> int:
    """How many of this process's fds are open on the block device `devt`."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        n += stat.S_ISBLK(st.st_mode) and st.st_rdev == devt
    return n


def test_writes_bypass_the_device_page_cache(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, make_pair: PairFactory, engine_path: str
) -> None:
    """A guest's WRITE goes to the device as a bio (O_DIRECT), as kernel blkback submits it: not into
    the device's own page cache, from which the kernel would later write it back through the loop
    driver, copying every byte a second time (bench/README.md, ring_write). So the range is not in
    the device's cache after the write, and the loop driver already put it in the backing file
    before the answer (no FLUSH needed to see it there). Both ring passes; the second fd is closed
    when the data plane stops."""
    image = make_image(size=16 << 20)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring-odirect")
    loop_devices.append(dev)
    target = DeviceTarget.from_block_device(dev)
    pair = make_pair(target=target, data_pages=512, persistent=True)
    fe = pair.frontend
    writes = {4 << 20: os.urandom(1 << 20), 8 << 20: os.urandom(4096), (9 << 20) + 4096: os.urandom(8 * 4096)}
    # twice: which pass serves a write whose pages are not in the grant cache yet (Python, or native
    # after a pass maps them ahead) depends on how the requests fall into passes; the second round's
    # pages are cached, so the native pass writes them whatever the timing
    for _ in range(2):
        for offset, data in writes.items():
            assert fe.write(offset // 512, data) == blkif.RSP_OKAY
    for offset, data in writes.items():
        assert _cached(dev.fd, offset, len(data)) == (0, 0), f"the write at {offset} is in the device's cache"
        assert on_disk(image, offset, len(data)) == data
    if engine_path.startswith("native"):
        fast = pair.dataplane._fast
        assert fast is not None
        sleeping_in(pair.dataplane)  # the native loop counts what it served when it settles
        assert fast.served > 0
    assert fe.flush() == blkif.RSP_OKAY
    for offset, data in writes.items():
        assert fe.read(offset // 512, len(data)) == data
    assert _device_fds(target_devt := os.fstat(dev.fd).st_rdev) == 2  # ours, and the O_DIRECT one
    assert pair.dataplane.stop(timeout=30)
    assert _device_fds(target_devt) == 1


def test_reads_after_direct_writes_see_the_new_data(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, make_pair: PairFactory, engine_path: str
) -> None:
    """Coherence between the two fds: a range read (so cached) through the engine, then written with
    O_DIRECT, reads back new through the engine's buffered, RWF_NOWAIT-first read path and through
    any buffered reader of the device (the kernel writes back and drops the range's cached pages
    around a direct write); a partial overwrite too; a FLUSH puts it in the image."""
    old = os.urandom(64 * 1024)
    image = make_image(size=16 << 20)
    with open(image, "r+b") as f:
        f.seek(2 << 20)
        f.write(old)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring-odirect-coherent")
    loop_devices.append(dev)
    pair = make_pair(target=DeviceTarget.from_block_device(dev), data_pages=64, persistent=True)
    fe = pair.frontend
    sector = (2 << 20) // 512
    assert fe.read(sector, len(old)) == old
    assert fe.read(sector, len(old)) == old  # a second time: from the page cache
    assert _cached(dev.fd, 2 << 20, len(old))[0] == len(old) // 4096
    new = os.urandom(len(old))
    assert fe.write(sector, new) == blkif.RSP_OKAY
    assert fe.read(sector, len(new)) == new
    assert os.pread(dev.fd, len(new), 2 << 20) == new
    patch = os.urandom(8192)
    assert fe.write(sector + 16, patch) == blkif.RSP_OKAY
    want = new[:8192] + patch + new[16384:]
    assert fe.read(sector, len(want)) == want
    assert os.pread(dev.fd, len(want), 2 << 20) == want
    assert fe.flush() == blkif.RSP_OKAY
    assert on_disk(image, 2 << 20, len(want)) == want


def test_direct_reads_bypass_the_device_page_cache(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, make_pair: PairFactory, engine_path: str
) -> None:
    """With direct reads (issue 20, `backend --direct-reads`) a guest's READ goes to the device
    through the O_DIRECT fd as well, as blkback's bios do: the data is right, before and after a
    direct write over it, and the device's page cache stays empty (a buffered read would fill it,
    and after direct writes it would miss). Both ring passes; the native pass serves them."""
    image = make_image(size=16 << 20)
    old = os.urandom(1 << 20)
    with open(image, "r+b") as f:
        f.seek(3 << 20)
        f.write(old)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring-odirect-reads")
    loop_devices.append(dev)
    target = dataclasses.replace(DeviceTarget.from_block_device(dev), direct_reads=True)
    pair = make_pair(target=target, data_pages=512, persistent=True)
    fe = pair.frontend
    sector = (3 << 20) // 512
    assert fe.read(sector, len(old)) == old
    assert fe.read(sector, len(old)) == old  # the pages now in the grant cache: the native pass's
    assert _cached(dev.fd, 3 << 20, len(old)) == (0, 0)
    new = os.urandom(64 * 1024)
    assert fe.write(sector + 128, new) == blkif.RSP_OKAY
    assert fe.read(sector, len(old)) == old[: 128 * 512] + new + old[128 * 512 + len(new) :]
    assert _cached(dev.fd, 3 << 20, len(old)) == (0, 0)
    if engine_path.startswith("native"):
        fast = pair.dataplane._fast
        assert fast is not None
        sleeping_in(pair.dataplane)  # the native loop counts what it served when it settles
        assert fast.served > 0


def test_a_write_o_direct_refuses_goes_buffered(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """O_DIRECT wants memory aligned to the device's DMA alignment: a buffer that is not (here one
    byte off; guest segments never are, being whole sectors of grant pages) gets EINVAL from the
    kernel before any I/O, and the write goes through the buffered fd instead, logged once."""
    image = make_image(size=4 << 20)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring-odirect-einval")
    loop_devices.append(dev)
    target = DeviceTarget.from_block_device(dev)
    direct = io.DirectWriter.open(target, "t-einval")
    assert direct is not None
    try:
        for offset in (8192, 16384):
            data = os.urandom(4096)
            off_by_one = memoryview(bytearray(4097))[1:]
            off_by_one[:] = data
            plan = IoPlan(1, blkif.OP_WRITE, Kind.WRITE, offset, 4096, (0,))
            with caplog.at_level(logging.INFO, logger="xenblockctl.backend.io"):
                assert io.execute(target, plan, [off_by_one], direct) == blkif.RSP_OKAY
            assert os.pread(dev.fd, 4096, offset) == data
            aligned = mmap.mmap(-1, 4096)
            aligned.write(data[::-1])
            assert direct.write([memoryview(aligned)], offset, 4096)  # the writer still works
            assert os.pread(dev.fd, 4096, offset) == data[::-1]
            aligned.close()
    finally:
        direct.close()
    assert [r.getMessage() for r in caplog.records].count(
        "t-einval: a write went buffered instead of O_DIRECT (EINVAL for 4096 bytes at 8192 in 1 buffers);"
        " further ones not logged"
    ) == 1
    assert len(caplog.records) == 1


def test_direct_writer_is_the_published_device_or_nothing(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The second fd names the device instance the engine verified (major:minor and diskseq), or
    writes stay buffered on the verified fd: a diskseq that does not match is refused (logged as an
    error), no diskseq to compare is refused, and read-only devices, plain files and a target with
    direct writes turned off get none."""
    image = make_image(size=4 << 20)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring-odirect-identity")
    loop_devices.append(dev)
    target = DeviceTarget.from_block_device(dev)
    assert target.diskseq == dev.identity.diskseq
    writer = io.DirectWriter.open(target, "t-id")
    assert writer is not None
    assert os.fstat(writer.fd).st_rdev == os.fstat(dev.fd).st_rdev
    assert fcntl.fcntl(writer.fd, fcntl.F_GETFL) & os.O_DIRECT
    writer.close()
    with caplog.at_level(logging.INFO, logger="xenblockctl.backend.io"):
        assert io.DirectWriter.open(dataclasses.replace(target, diskseq=target.diskseq + 1), "t-id") is None
        assert io.DirectWriter.open(dataclasses.replace(target, diskseq=None), "t-id") is None
        assert io.DirectWriter.open(dataclasses.replace(target, read_only=True), "t-id") is None
        # `backend --no-direct-writes`
        assert io.DirectWriter.open(dataclasses.replace(target, direct_writes=False), "t-id") is None
        with open(image, "r+b") as f:
            assert io.DirectWriter.open(DeviceTarget.from_fd(f.fileno()), "t-id") is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"diskseq {target.diskseq + 1:x}" in errors[0]
    assert "writes stay buffered" in errors[0]
    assert any("no verified diskseq" in r.getMessage() for r in caplog.records)
    assert _device_fds(os.fstat(dev.fd).st_rdev) == 1  # every refused fd was closed


def test_direct_writes_on_the_pool_unless_alone(
    loop_devices: list[loop.LoopDevice],
    make_image: ImageFactory,
    make_pair: PairFactory,
    monkeypatch: pytest.MonkeyPatch,
    engine_path: str,
) -> None:
    """`backend --direct-writes-on-pool`: a direct WRITE with others outstanding on its ring runs on
    an I/O worker (several in the device at once), one alone on the ring runs inline (nothing to
    overlap it with); either way with O_DIRECT, and the bytes land."""
    image = make_image(size=16 << 20)
    dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-ring-odirect-pool")
    loop_devices.append(dev)
    target = dataclasses.replace(DeviceTarget.from_block_device(dev), direct_writes_on_pool=True)
    threads: dict[int, str] = {}
    real = io.execute

    def recording_execute(
        target: DeviceTarget, plan: IoPlan, bufs: list[memoryview], direct: io.DirectWriter | None = None
    ) -> int:
        if plan.kind is Kind.WRITE:
            assert direct is not None
            threads[plan.offset] = threading.current_thread().name
        return real(target, plan, bufs, direct)

    monkeypatch.setattr(io, "execute", recording_execute)
    pair = make_pair(target=target, workers=2, data_pages=256, persistent=True)
    fe = pair.frontend
    alone = os.urandom(1 << 20)
    assert fe.write((1 << 20) // 512, alone) == blkif.RSP_OKAY
    batch = {(4 << 20) + i * (128 << 10): os.urandom(128 << 10) for i in range(8)}
    for offset, data in batch.items():
        fe.submit_write(offset // 512, data)
    done = fe.collect(len(batch), timeout=30)
    assert [c.response.status for c in done.values()] == [blkif.RSP_OKAY] * len(batch)
    pool_thread = re.compile(r"-io_\d+$")
    assert not pool_thread.search(threads[1 << 20])
    assert any(pool_thread.search(threads[offset]) for offset in batch)
    for offset, data in {1 << 20: alone, **batch}.items():
        assert _cached(dev.fd, offset, len(data)) == (0, 0)
        assert on_disk(image, offset, len(data)) == data
