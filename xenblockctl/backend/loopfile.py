"""Serve a loop device's guest I/O on its backing file (issue 20): the file opened from the loop's
sysfs `backing_file` and verified against what the already verified loop fd says it is bound to.

Why: kernel blkback submits bios to the loop device; the loop worker reads and writes the
*backing file*, through the file's page cache, which earlier attaches left warm. A buffered
preadv/pwritev on the loop device instead goes through the loop device's own page cache, empty at
every attach (a new loop device): each first read of a block misses, a write allocates the pages
anew, and a FLUSH copies the data a second time from that cache into the file's
(bench/README.md, "On real Xen", wcold20). On the file itself, reads and writes meet the cache
blkback's loop worker uses, and a FLUSH is one fdatasync of the file.

Coherence: this bypasses the loop device's page cache exactly as blkback's bios do (the loop
worker never looks at it), so whoever reads the loop device buffered while a guest writes sees
what they would see under blkback; an O_DIRECT reader of the loop sees the file. What the loop's
cache holds *dirty* when we switch (a previous engine that wrote through it, before a
takeover; anyone who wrote to the loop node) is written back into the file first (BLKFLSBUF:
write back, then drop its clean pages, with no device flush), so no later writeback of a stale
page can land over a guest's newer write.

What stays the loop device's: the published identity (diskseq, checked by the caller on its fd
before this runs), delete-on-close (AUTOCLEAR holds the loop open only through the engine's loop
fd, which the engine keeps, parks in the fd store and hands over; a successor re-derives the file
from the loop fd it verified, never from a handed-over file fd), and the device's size: the
engine serves the loop's sectors (its identity), never the file's length, so a sizelimit or a
file grown since is honoured.

Refused (the caller logs why and keeps serving the loop device, per device): not bound; an
lo_offset (every I/O path, the native passes too, uses device offsets as file offsets); a loop
with DIRECT_IO (the admin chose no page cache: the engine's I/O model, RWF_NOWAIT tries on the
ring thread and a buffered fallback for what O_DIRECT refuses, needs a buffered fd, so the loop
path, where the loop itself does O_DIRECT, is kept); a read-only loop served read-write; a backing
file deleted, renamed or replaced (the path's inode is not the loop's lo_device/lo_inode); not a
regular file (a loop over a block device); a file shorter than the loop's size (a read past its
end would be short: the loop zero-fills it, we would fail it); the loop's cache that cannot be
written back. A backing file changed later under a live read-only loop (LOOP_CHANGE_FD) or an
offset set later (LOOP_SET_STATUS64) are root's reconfigurations of a device in use; the file fd
keeps serving the file it verified.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import replace

from xenblockctl.backend.io import DeviceTarget, DiscardMode
from xenblockctl.kernel.blockdev import BlockDevice
from xenblockctl.kernel.errors import LoopError
from xenblockctl.kernel.ioctls import BLKFLSBUF
from xenblockctl.kernel.loop import get_status
from xenblockctl.kernel.loop_abi import LOOP_MAJOR, LoopFlags
from xenblockctl.kernel.sysfs import block_dir

#: what the kernel appends to a bound loop's `loop/backing_file` (its d_path) once the file is unlinked
_DELETED = " (deleted)"


class NotServed(Exception):
    """The loop device's backing file will not be served: why (the caller logs it)."""


def is_loop(device: BlockDevice) -> bool:
    """A whole loop device (not a partition of one: those are blkext, and carry an offset)."""
    return device.identity.major == LOOP_MAJOR


def on_backing_file(device: BlockDevice, target: DeviceTarget) -> DeviceTarget:
    """`target` (the loop device `device` described) with its I/O on the loop's backing file: only
    the fd changes (a new one, the caller's to close after the target's last I/O) and a discard
    becomes the hole punch the loop itself would make of it; the size stays the loop's, so
    neither a sizelimit nor a file longer than the loop is ever served past. NotServed as
    open_backing_file."""
    fd = open_backing_file(device, read_only=target.read_only)
    # the loop turns a discard into fallocate(PUNCH_HOLE | KEEP_SIZE) on its file: the same here
    discard = DiscardMode.NONE if target.discard is DiscardMode.NONE else DiscardMode.PUNCH_HOLE
    return replace(target, fd=fd, discard=discard)


def open_backing_file(device: BlockDevice, *, read_only: bool) -> int:
    """An fd on the backing file of the loop device `device` (whose identity the caller verified),
    opened read-only when `read_only`, checked to be the inode the loop is bound to, large enough
    for the loop's size, with the loop's own dirty pages written back into it. NotServed (nothing
    left open) if anything does not hold."""
    fd = device.fd
    i = device.identity
    try:
        status = get_status(fd)
    except LoopError as exc:
        raise NotServed(f"LOOP_GET_STATUS64 failed ({exc.one_line()})") from None
    if status is None:
        raise NotServed("the loop device is not bound")
    if status.flags & LoopFlags.DIRECT_IO:
        raise NotServed("the loop device does direct I/O (direct_io): the admin chose no page cache")
    if status.offset:
        raise NotServed(f"the loop device starts at offset {status.offset} of its backing file")
    if not read_only and status.flags & LoopFlags.READ_ONLY:
        raise NotServed("the loop device is read-only, the backend read-write")
    try:
        # read here, not with sysfs.read_attr: the path exactly as the kernel wrote it (only its
        # newline cut, not stripped) and any bytes it holds (surrogateescape)
        with open(
            f"{block_dir(i.major, i.minor)}/loop/backing_file", encoding="utf-8", errors="surrogateescape"
        ) as f:
            path = f.read().removesuffix("\n")
    except OSError as exc:
        raise NotServed(f"cannot read its backing_file ({exc.strerror})") from None
    if path.endswith(_DELETED):
        raise NotServed(f"its backing file {path} is deleted")
    bound = (status.backing_dev, status.backing_ino)
    # stat before open: opening whatever the path names now (a FIFO, a device) can have effects
    try:
        pre = os.stat(path)
    except OSError as exc:
        raise NotServed(f"cannot stat its backing file {path} ({exc.strerror})") from None
    _check(path, pre, bound, i.size_bytes)
    try:
        file_fd = os.open(
            path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        )
    except OSError as exc:
        raise NotServed(f"cannot open its backing file {path} ({exc.strerror})") from None
    try:
        _check(path, os.fstat(file_fd), bound, i.size_bytes)
        try:
            # the loop's dirty pages into the file before anything is served from the file (module
            # docstring, "Coherence"); its clean pages go too, read by nobody from now on
            fcntl.ioctl(fd, BLKFLSBUF)
        except OSError as exc:
            raise NotServed(f"cannot write back the loop device's page cache ({exc.strerror})") from None
    except BaseException:
        os.close(file_fd)
        raise
    return file_fd


def _check(path: str, st: os.stat_result, bound: tuple[int, int], size: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotServed(f"its backing file {path} is not a regular file")
    if (st.st_dev, st.st_ino) != bound:
        raise NotServed(
            f"{path} is inode {st.st_ino} on device {st.st_dev:#x}, the loop device is bound to inode"
            f" {bound[1]} on {bound[0]:#x} (renamed or replaced)"
        )
    if st.st_size < size:
        raise NotServed(f"its backing file {path} has {st.st_size} bytes, fewer than the loop's {size}")
