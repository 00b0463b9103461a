"""The data plane against a real loop device (root): BLKDISCARD, fdatasync through the loop driver,
geometry from the kernel layer's BlockDevice, read-only loop devices."""

from __future__ import annotations

import errno
import mmap
import os
import re
import threading

import pytest

from tests.fixtures.backend import PairFactory, on_disk
from tests.fixtures.kernel import ImageFactory
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
    """Buffered writes to a block device have no RWF_NOWAIT. A WRITE covering whole host pages cannot
    make the kernel read (no read-modify-write), so it runs on the ring thread instead of paying the
    pool's GIL hand-offs; a WRITE with a partial page (which could wait for a disk read) still goes
    to a worker. Either way the bytes land where they should."""
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
