"""Issue 20: a loop device's guest I/O served on its verified backing file (backend/loopfile.py),
with real loop devices: what is served where, that the loop device and the file agree both ways,
the loop's size as the bound, and every refusal (the loop device kept, nothing left open)."""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.backend import PairFactory, on_disk
from tests.fixtures.kernel import ImageFactory
from tests.unit.test_ring_loop import _cached
from xenblockctl.backend import blkif
from xenblockctl.backend.io import DeviceTarget, DiscardMode, execute
from xenblockctl.backend.loopfile import NotServed, is_loop, on_backing_file
from xenblockctl.backend.requests import IoPlan, Kind
from xenblockctl.kernel import loop
from xenblockctl.kernel.blockdev import identify
from xenblockctl.kernel.loop_abi import (
    LOOP_GET_STATUS64,
    LOOP_INFO64_SIZE,
    LOOP_SET_STATUS64,
    LoopFlags,
    LoopInfo64,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


@pytest.fixture
def served() -> Iterator[list[int]]:
    """The backing-file fds a test opened; closed at teardown. Request it before make_pair, so the
    data planes stop (make_pair's teardown) before their fd is closed."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def _attach(
    loop_devices: list[loop.LoopDevice], image: Path, *, read_only: bool = False, **kw: bool
) -> loop.LoopDevice:
    dev = loop.attach_file(str(image), read_only=read_only, tag="xenblockctl:test-loopfile", **kw)
    loop_devices.append(dev)
    return dev


def _serve(dev: loop.LoopDevice, served: list[int]) -> DeviceTarget:
    target = on_backing_file(dev, DeviceTarget.from_block_device(dev))
    served.append(target.fd)
    return target


def _direct(dev: loop.LoopDevice) -> int:
    """A second fd on the loop device with O_DIRECT: what reaches the loop worker, as blkback's bios."""
    return os.open(f"/proc/self/fd/{dev.fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)


def _set_status(dev: loop.LoopDevice, *, offset: int = 0, sizelimit: int = 0) -> None:
    buf = bytearray(LOOP_INFO64_SIZE)
    fcntl.ioctl(dev.fd, LOOP_GET_STATUS64, buf, True)
    info = LoopInfo64.unpack(bytes(buf))._replace(lo_offset=offset, lo_sizelimit=sizelimit)
    try:
        fcntl.ioctl(dev.fd, LOOP_SET_STATUS64, info.pack())
    except OSError as exc:
        pytest.skip(f"LOOP_SET_STATUS64 offset {offset} sizelimit {sizelimit} refused here: {exc}")


def test_io_is_served_on_the_backing_file_and_meets_the_loop_device_both_ways(
    served: list[int],
    loop_devices: list[loop.LoopDevice],
    make_image: ImageFactory,
    make_pair: PairFactory,
    engine_path: str,
) -> None:
    """The target's fd is the file the loop is bound to; a guest's write is what an O_DIRECT reader
    of the loop device reads (as after blkback), an O_DIRECT write to the loop device is what the
    guest reads back, and neither fills the loop device's own page cache (the point: blkback's
    loop worker uses the file's). A discard punches the file. All three ring passes."""
    image = make_image(size=16 << 20)
    dev = _attach(loop_devices, image)
    target = _serve(dev, served)
    st, img = os.fstat(target.fd), os.stat(image)
    assert (st.st_dev, st.st_ino) == (img.st_dev, img.st_ino)
    assert target.size_bytes == dev.identity.size_bytes
    assert not target.read_only
    assert target.discard is DiscardMode.PUNCH_HOLE
    fe = make_pair(target=target, data_pages=512, persistent=True).frontend
    data = os.urandom(1 << 20)
    assert fe.write((2 << 20) // 512, data) == blkif.RSP_OKAY
    assert fe.read((2 << 20) // 512, len(data)) == data
    direct = _direct(dev)
    try:
        buf = mmap.mmap(-1, len(data))
        assert os.preadv(direct, [buf], 2 << 20) == len(data)
        assert bytes(buf) == data, "an O_DIRECT reader of the loop device sees the guest's write"
        other = os.urandom(len(data))
        buf[:] = other
        assert os.pwritev(direct, [buf], 5 << 20) == len(data)
    finally:
        os.close(direct)
    assert fe.read((5 << 20) // 512, len(other)) == other, "the guest sees an O_DIRECT write to the loop"
    assert _cached(dev.fd, 0, 16 << 20) == (0, 0), "the loop device's page cache stayed empty"
    assert fe.flush() == blkif.RSP_OKAY
    assert on_disk(image, 2 << 20, len(data)) == data
    blocks = os.stat(image).st_blocks
    assert fe.discard((2 << 20) // 512, (1 << 20) // 512) == blkif.RSP_OKAY
    assert os.stat(image).st_blocks < blocks, "the discard punched a hole in the file"
    assert on_disk(image, 2 << 20, 1 << 20) == bytes(1 << 20)


def test_the_loop_devices_size_bounds_the_file(
    served: list[int], loop_devices: list[loop.LoopDevice], make_image: ImageFactory, make_pair: PairFactory
) -> None:
    """A loop device limited to 8 MiB of a 16 MiB file: the served target is 8 MiB, a guest request
    past it is refused, and the last guard before the kernel refuses one that validation let by."""
    image = make_image(size=16 << 20)
    with open(image, "r+b") as f:
        f.seek(8 << 20)
        f.write(b"\xaa" * 512)
    dev = _attach(loop_devices, image)
    _set_status(dev, sizelimit=8 << 20)
    limited = loop.LoopDevice(dev.fd, identify(dev.fd), dev.number, dev.status, dev.backing_path)
    assert limited.identity.size_bytes == 8 << 20
    target = _serve(limited, served)
    assert target.sectors == (8 << 20) // 512
    fe = make_pair(target=target).frontend
    with pytest.raises(Exception, match="status"):
        fe.read((8 << 20) // 512, 4096)
    assert fe.write((8 << 20) // 512 - 8, b"x" * 4096) == blkif.RSP_OKAY
    page = mmap.mmap(-1, 4096)
    past = IoPlan(1, blkif.OP_WRITE, Kind.WRITE, 8 << 20, 4096, (0,))
    assert execute(target, past, [memoryview(page)]) == blkif.RSP_ERROR
    assert on_disk(image, 8 << 20, 512) == b"\xaa" * 512, "nothing written past the loop device"


def test_the_loop_devices_dirty_pages_reach_the_file_before_it_is_served(
    served: list[int], loop_devices: list[loop.LoopDevice], make_image: ImageFactory
) -> None:
    """What someone wrote through the loop device's page cache (a previous engine before a
    takeover) is in the file before the file is served: no later writeback lands over a guest's."""
    image = make_image(size=16 << 20)
    dev = _attach(loop_devices, image)
    data = os.urandom(64 << 10)
    assert os.pwrite(dev.fd, data, 1 << 20) == len(data)
    assert _cached(dev.fd, 1 << 20, len(data))[1] > 0, "the write is dirty in the loop device's cache"
    target = _serve(dev, served)
    assert os.pread(target.fd, len(data), 1 << 20) == data
    assert _cached(dev.fd, 0, 16 << 20) == (0, 0)


def test_a_read_only_loop_is_served_read_only(
    served: list[int], loop_devices: list[loop.LoopDevice], make_image: ImageFactory
) -> None:
    dev = _attach(loop_devices, make_image(), read_only=True)
    target = _serve(dev, served)
    assert target.read_only
    assert target.discard is DiscardMode.NONE
    assert fcntl.fcntl(target.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def _offset(dev: loop.LoopDevice, image: Path) -> None:
    _set_status(dev, offset=4096)


def _direct_io(dev: loop.LoopDevice, image: Path) -> None:
    status = loop.get_status(dev.fd)
    if status is None or not status.flags & LoopFlags.DIRECT_IO:
        pytest.skip("this kernel refused direct_io for the test file's loop device")


def _deleted(dev: loop.LoopDevice, image: Path) -> None:
    image.unlink()


def _replaced(dev: loop.LoopDevice, image: Path) -> None:
    """Another file renamed over the path: the loop's inode is unlinked (sysfs says so)."""
    other = image.with_name("other.img")
    other.write_bytes(bytes(image.stat().st_size))
    other.rename(image)


@pytest.fixture
def mounted_over() -> Iterator[list[Path]]:
    """Paths a test bind-mounted another file over; unmounted at teardown."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["umount", str(path)], check=True)


def _overmounted(dev: loop.LoopDevice, image: Path, mounts: list[Path]) -> None:
    """Another file mounted over the path (or the path read in another mount namespace): sysfs
    names the path, which now resolves to another inode."""
    other = image.with_name("other.img")
    other.write_bytes(bytes(image.stat().st_size))
    subprocess.run(["mount", "--bind", str(other), str(image)], check=True)
    mounts.append(image)


def _truncated(dev: loop.LoopDevice, image: Path) -> None:
    os.truncate(image, 4 << 20)  # the loop device keeps its size until LOOP_SET_CAPACITY


def _refused(dev: loop.LoopDevice, why: str) -> None:
    """on_backing_file refuses `dev` saying `why`, and leaves no fd open."""
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(NotServed, match=why):
        on_backing_file(dev, DeviceTarget.from_block_device(dev))
    assert sorted(os.listdir("/proc/self/fd")) == before, "a refusal left an fd open"


REFUSALS: dict[str, tuple[Callable[[loop.LoopDevice, Path], None], str]] = {
    "offset": (_offset, "starts at offset 4096"),
    "direct-io": (_direct_io, "does direct I/O"),
    "deleted": (_deleted, "is deleted"),
    "replaced": (_replaced, "is deleted"),
    "shorter": (_truncated, "fewer than the loop's"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_keeps_the_loop_device_and_leaves_nothing_open(
    case: str, loop_devices: list[loop.LoopDevice], make_image: ImageFactory
) -> None:
    change, why = REFUSALS[case]
    image = make_image(size=16 << 20)
    dev = _attach(loop_devices, image, direct_io=case == "direct-io")
    change(dev, image)
    _refused(dev, why)


def test_a_path_that_names_another_inode_is_refused(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory, mounted_over: list[Path]
) -> None:
    image = make_image(size=16 << 20)
    dev = _attach(loop_devices, image)
    _overmounted(dev, image, mounted_over)
    _refused(dev, "renamed or replaced")


def test_a_read_only_loop_is_not_served_read_write(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory
) -> None:
    dev = _attach(loop_devices, make_image(), read_only=True)
    target = dataclasses.replace(DeviceTarget.from_block_device(dev), read_only=False)
    with pytest.raises(NotServed, match="read-only"):
        on_backing_file(dev, target)


def test_only_loop_devices_are_candidates(
    loop_devices: list[loop.LoopDevice], make_image: ImageFactory
) -> None:
    assert is_loop(_attach(loop_devices, make_image()))
