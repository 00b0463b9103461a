"""Run validated requests against the device fd: preadv/pwritev straight into grant pages.

`DeviceTarget` describes the open device (the engine holds the fd for the backend's lifetime; we
never close it). `Executor` runs reads and writes on the calling ring thread when RWF_NOWAIT says
they will not block (page cache), everything else on a small thread pool (preadv/pwritev/
fdatasync release the GIL, so several requests really are in flight), or everything inline with
`workers=0`. It tracks pool requests, and `drain()` waits for all of them, which teardown must do
before unmapping grant pages.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from xenblockctl.backend import blkif
from xenblockctl.backend.requests import BARRIER, DISCARD, FLUSH, READ, WRITE, DeviceLimits, IoPlan, Kind
from xenblockctl.backend.writegate import DeviceWrites, WriteClass
from xenblockctl.errors import XenblockError
from xenblockctl.kernel.blockdev import BlockDevice, read_diskseq

log = logging.getLogger(__name__)

# <linux/fs.h>: BLKDISCARD = _IO(0x12, 119), BLKSECDISCARD = _IO(0x12, 125); argument uint64_t[2]
# {start, length} in bytes. Checked against the header by tests/unit/test_backend_io.py.
BLKDISCARD = 0x1277
BLKSECDISCARD = 0x127D
_RANGE = struct.Struct("=QQ")
# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class DiscardMode(enum.Enum):
    NONE = "none"
    BLKDISCARD = "blkdiscard"  # block device with discard_max_bytes > 0
    PUNCH_HOLE = "punch-hole"  # regular file: fallocate(PUNCH_HOLE | KEEP_SIZE)
    NBD_TRIM = "nbd-trim"  # an NBD export with SEND_TRIM (backend/nbdio.py)


def _writable(fd: int) -> bool:
    return (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) != os.O_RDONLY


def _sysfs_int(major: int, minor: int, rel: str) -> int | None:
    try:
        return int(Path(f"/sys/dev/block/{major}:{minor}/{rel}").read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class DeviceTarget:
    """The device the requests go to. `fd` is borrowed: the engine owns and closes it."""

    fd: int
    size_bytes: int
    logical_block_size: int = 512
    physical_block_size: int = 512
    read_only: bool = False
    discard: DiscardMode = DiscardMode.NONE
    discard_granularity: int = 512
    discard_secure: bool = False
    #: the block device's diskseq as verified when it was opened (None: a file, or not known): a
    #: second fd on the device (DirectWriter) must name this same instance
    diskseq: int | None = None
    #: WRITEs go out with O_DIRECT on a second fd where one can be opened (DirectWriter); False:
    #: buffered on `fd`. The engine sets it from `xenblockctl backend --direct-writes` (off by
    #: default: EngineConfig.direct_writes says why)
    direct_writes: bool = True
    #: direct WRITEs run on the I/O pool unless alone on their ring (True), or on the ring thread
    #: (`xenblockctl backend --direct-writes-on-pool`; see Executor)
    direct_writes_on_pool: bool = False
    #: READs go through the O_DIRECT fd too, where direct writes have one (`xenblockctl backend
    #: --direct-reads`; off by default, see DirectWriter): they then meet the device as blkback's
    #: bios do, instead of missing the page cache that direct writes keep emptying
    direct_reads: bool = False

    def __post_init__(self) -> None:
        lbs = self.logical_block_size
        if lbs < blkif.SECTOR_SIZE or lbs & (lbs - 1) or lbs > blkif.PAGE_SIZE:
            raise XenblockError(f"unsupported logical block size {lbs}", code="device-geometry")
        if self.physical_block_size % lbs:
            raise XenblockError(
                "physical block size is not a multiple of the logical one", code="device-geometry"
            )

    @property
    def sectors(self) -> int:
        """The `sectors` node: whole 512-byte units (a ragged tail is not exported)."""
        return self.size_bytes // blkif.SECTOR_SIZE

    @classmethod
    def from_fd(
        cls, fd: int, *, read_only: bool | None = None, logical_block_size: int = 512
    ) -> DeviceTarget:
        """Describe a plain file or a block device fd (geometry from lseek/sysfs)."""
        st = os.fstat(fd)
        if read_only is None:
            read_only = not _writable(fd)
        if stat.S_ISBLK(st.st_mode):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            size = os.lseek(fd, 0, os.SEEK_END)
            lbs = _sysfs_int(major, minor, "queue/logical_block_size") or logical_block_size
            pbs = _sysfs_int(major, minor, "queue/physical_block_size") or lbs
            return cls._block(fd, major, minor, size=size, lbs=lbs, pbs=pbs, read_only=read_only)
        if not stat.S_ISREG(st.st_mode):
            raise XenblockError("target is neither a block device nor a regular file", code="target-type")
        return cls(
            fd=fd,
            size_bytes=st.st_size,
            logical_block_size=logical_block_size,
            physical_block_size=logical_block_size,
            read_only=read_only,
            discard=DiscardMode.NONE if read_only else DiscardMode.PUNCH_HOLE,
            discard_granularity=max(logical_block_size, st.st_blksize or 0),
        )

    @classmethod
    def from_block_device(cls, dev: BlockDevice) -> DeviceTarget:
        """From the kernel layer's BlockDevice (the engine's normal path); geometry from its identity."""
        i = dev.identity
        return cls._block(
            dev.fd,
            i.major,
            i.minor,
            size=i.size_bytes,
            lbs=i.logical_block_size,
            pbs=i.physical_block_size,
            read_only=i.read_only or not _writable(dev.fd),
            diskseq=i.diskseq,
        )

    @classmethod
    def _block(
        cls,
        fd: int,
        major: int,
        minor: int,
        *,
        size: int,
        lbs: int,
        pbs: int,
        read_only: bool,
        diskseq: int | None = None,
    ) -> DeviceTarget:
        max_discard = _sysfs_int(major, minor, "queue/discard_max_bytes") or 0
        granularity = _sysfs_int(major, minor, "queue/discard_granularity") or lbs
        return cls(
            fd=fd,
            size_bytes=size,
            logical_block_size=lbs,
            physical_block_size=pbs,
            read_only=read_only,
            discard=DiscardMode.BLKDISCARD if max_discard > 0 and not read_only else DiscardMode.NONE,
            discard_granularity=max(granularity, lbs),
            # secure discard is only real on hardware that erases; loop/dm do not support it
            discard_secure=False,
            diskseq=diskseq,
        )

    def executor(self, *, workers: int = 4, name: str = "xbc-io") -> Executor:
        """What runs this target's plans for one data plane (an NbdTarget gives its own kind)."""
        return Executor(self, workers=workers, name=name)

    def limits(
        self,
        *,
        flush: bool = True,
        barrier: bool = True,
        discard: bool = True,
        max_indirect_segments: int = blkif.DEFAULT_MAX_INDIRECT_SEGMENTS,
    ) -> DeviceLimits:
        """The validation limits matching what the engine will advertise for this device."""
        return DeviceLimits(
            sectors=self.sectors,
            logical_block_size=self.logical_block_size,
            read_only=self.read_only,
            flush=flush,
            barrier=barrier,
            discard=discard and self.discard is not DiscardMode.NONE,
            discard_secure=self.discard_secure,
            max_indirect_segments=max_indirect_segments,
        )


# --- the I/O primitives ---------------------------------------------------------------------------
def _full_vectored(
    call: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    bufs: list[memoryview],
    offset: int,
    length: int,
    *,
    moved: int | None = None,
) -> None:
    """preadv/pwritev until all `length` bytes of `bufs` (exactly their size: see _out_of_bounds)
    moved; a 0-byte transfer (EOF) is an error, not a loop. `moved`: what a first call the caller
    already made returned (execute() makes it inline: it moves everything in the common case)."""
    if not length:
        return
    remaining = length
    n = call(fd, bufs, offset) if moved is None else moved
    while True:
        if n <= 0:
            raise OSError(errno.EIO, "short transfer at end of device")
        offset += n
        remaining -= n
        if not remaining:
            return
        # drop fully transferred buffers, trim a partially transferred one
        while bufs and n >= bufs[0].nbytes:
            n -= bufs[0].nbytes
            bufs = bufs[1:]
        if n:
            bufs = [bufs[0][n:], *bufs[1:]]
        n = call(fd, bufs, offset)


def _nbytes(bufs: list[memoryview]) -> int:
    return bufs[0].nbytes if len(bufs) == 1 else sum(b.nbytes for b in bufs)


def _out_of_bounds(target: DeviceTarget, plan: IoPlan, bufs: list[memoryview]) -> str | None:
    """The last guard before the kernel, whatever validation said: the range lies inside the device
    and the buffers add up to exactly its length (a longer iovec would move bytes past it)."""
    offset, length = plan.offset, plan.length
    if offset < 0 or offset + length > target.size_bytes:
        return f"{offset}+{length} outside the device ({target.size_bytes} bytes)"
    # one buffer (every 4 KiB request, and consecutive pages on the local transport) without a call
    if bufs and (bufs[0].nbytes if len(bufs) == 1 else _nbytes(bufs)) != length:
        return f"buffers of {_nbytes(bufs)} bytes for a {length}-byte request"
    return None


def _discard(target: DeviceTarget, offset: int, length: int, secure: bool) -> None:
    if length == 0:
        return
    if target.discard is DiscardMode.BLKDISCARD:
        fcntl.ioctl(target.fd, BLKSECDISCARD if secure else BLKDISCARD, _RANGE.pack(offset, length))
    elif target.discard is DiscardMode.PUNCH_HOLE:
        if _libc.fallocate(target.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    else:
        raise OSError(errno.EOPNOTSUPP, "discard not supported by the device")


class DirectWriter:
    """WRITEs to a block device through a second fd on it opened with O_DIRECT (issue 20).

    A buffered pwritev on a block device copies the guest's data into the device's own page cache;
    for a loop device the kernel later writes those pages back through the loop driver, which
    copies them again into the backing file's cache, and a FLUSH waits for both. Kernel blkback
    submits bios: the loop driver's copy only. With O_DIRECT our write is a bio too (measured in
    bench/README.md, "ring_write": half the CPU per GiB written, the writeback gone; but on the
    real-Xen lane, from grant-mapped pages, slower than buffered in two boots of three, so the
    engine uses it only with `backend --direct-writes`). Reads stay on the buffered fd (the page
    cache is what makes them cheap, and RWF_NOWAIT works there).

    Identity: the second fd is opened from the engine's own verified fd (/proc/self/fd/N: the same
    inode, whatever node or private node it came through) and must show the same major:minor and
    the diskseq the engine verified (DeviceTarget.diskseq); anything else, or no diskseq to compare,
    and writes stay buffered on the verified fd (logged). Coherence: the kernel writes back and
    drops the cached pages of a direct write's range before and after it, so a later buffered read
    sees the new data; FLUSH/BARRIER stay fdatasync on the device (one mapping, one cache flush
    for both fds). Alignment: O_DIRECT wants offset, length and memory aligned to the logical
    block size; guest segments are whole sectors of page-aligned grant pages, so they are for 512,
    and anything the kernel refuses with EINVAL (checked before any I/O) is written buffered
    instead, logged once per writer.

    Reads (issue 20, `backend --direct-reads`): after direct writes the device's page cache no
    longer holds what the guest wrote, so a buffered read of it misses, and the engine's miss path
    (a NOWAIT try, then the pool, one 128 KiB readahead at a time) read at a fifth of kernel
    blkback's rate on the real-Xen lane. With `reads` the READs go through this fd as well (same
    alignment rule and buffered fallback), so both directions reach the loop device as blkback's
    bios do; the native pass merges adjacent requests of a pass into one call for both.
    """

    __slots__ = ("_mask", "_warned", "fd", "name", "reads")

    def __init__(self, fd: int, logical_block_size: int, name: str, reads: bool = False) -> None:
        self.fd = fd
        self._mask = logical_block_size - 1
        self._warned = False
        self.name = name
        #: READs go through this fd too (DeviceTarget.direct_reads)
        self.reads = reads

    @classmethod
    def open(cls, target: DeviceTarget, name: str) -> DirectWriter | None:
        """The direct writer for `target`, or None where writes stay buffered: a regular file (its
        page cache is the only one: nothing is copied twice), a read-only target or direct writes
        turned off, quietly; a
        device that cannot be reopened with O_DIRECT (EINVAL: some dm/NBD stacks) or whose
        identity cannot be confirmed, logged."""
        if target.read_only or not target.direct_writes:
            return None
        try:
            st = os.fstat(target.fd)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        expected = target.diskseq
        if expected is None:
            log.info("%s: writes stay buffered: no verified diskseq to check a second fd against", name)
            return None
        try:
            fd = os.open(
                f"/proc/self/fd/{target.fd}",
                os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY,
            )
        except OSError as exc:
            log.info("%s: writes stay buffered: cannot reopen the device with O_DIRECT (%s)", name, exc)
            return None
        try:
            again = os.fstat(fd)
            seq = read_diskseq(fd)
        except (OSError, XenblockError) as exc:
            os.close(fd)
            log.warning("%s: writes stay buffered: cannot check the O_DIRECT fd's identity (%s)", name, exc)
            return None
        if not stat.S_ISBLK(again.st_mode) or again.st_rdev != st.st_rdev or seq != expected:
            os.close(fd)
            log.error(
                "%s: writes stay buffered: the device reopened for O_DIRECT is %d:%d diskseq %x, not"
                " %d:%d diskseq %x",
                name,
                os.major(again.st_rdev),
                os.minor(again.st_rdev),
                seq,
                os.major(st.st_rdev),
                os.minor(st.st_rdev),
                expected,
            )
            return None
        return cls(fd, target.logical_block_size, name, reads=target.direct_reads)

    def write(self, bufs: list[memoryview], offset: int, length: int) -> bool:
        """Write it all with O_DIRECT: True; False if it must be written buffered (nothing was
        written: an unaligned range, or buffers the kernel refused with EINVAL). Other errors raise."""
        return self._move(os.pwritev, bufs, offset, length, "write")

    def read(self, bufs: list[memoryview], offset: int, length: int) -> bool:
        """Read it all with O_DIRECT: True; False if it must be read buffered (as write())."""
        return self._move(os.preadv, bufs, offset, length, "read")

    def _move(
        self,
        call: Callable[[int, Sequence[memoryview], int], int],
        bufs: list[memoryview],
        offset: int,
        length: int,
        what: str,
    ) -> bool:
        if (offset | length) & self._mask:
            self._fallback(what, f"{offset}+{length} not aligned to {self._mask + 1} bytes")
            return False
        try:
            n = call(self.fd, bufs, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fallback(what, f"EINVAL for {length} bytes at {offset} in {len(bufs)} buffers")
            return False
        if n != length:
            _full_vectored(call, self.fd, bufs, offset, length, moved=n)
        return True

    def _fallback(self, what: str, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.info(
                "%s: a %s went buffered instead of O_DIRECT (%s); further ones not logged",
                self.name,
                what,
                why,
            )

    def close(self) -> None:
        os.close(self.fd)


def execute(
    target: DeviceTarget, plan: IoPlan, bufs: list[memoryview], direct: DirectWriter | None = None
) -> int:
    """Do one plan synchronously; return the blkif status. Never raises for I/O errors. `direct`:
    where WRITEs go first (their data, a FLUSH's or BARRIER's included)."""
    try:
        refused = _out_of_bounds(target, plan, bufs)
        if refused is not None:
            # validation already refused this; a second check costs nothing and guards the device
            log.error("refusing I/O: %s", refused)
            return blkif.RSP_ERROR
        kind = plan.kind
        if kind is READ or kind is WRITE:
            if direct is None or not (
                direct.write(bufs, plan.offset, plan.length)
                if kind is WRITE
                else direct.reads and direct.read(bufs, plan.offset, plan.length)
            ):
                call = os.preadv if kind is READ else os.pwritev
                # the common case moves everything in one call; _full_vectored resumes a short one
                n = call(target.fd, bufs, plan.offset)
                if n != plan.length:
                    _full_vectored(call, target.fd, bufs, plan.offset, plan.length, moved=n)
        elif kind in (FLUSH, BARRIER):
            if bufs:
                # REQ_PREFLUSH | REQ_FUA semantics: earlier writes durable first, then this one.
                # fdatasync on the verified fd covers a direct write too: one device, one flush.
                os.fdatasync(target.fd)
                if direct is None or not direct.write(bufs, plan.offset, plan.length):
                    _full_vectored(os.pwritev, target.fd, bufs, plan.offset, plan.length)
            os.fdatasync(target.fd)
        elif kind is DISCARD:
            _discard(target, plan.offset, plan.length, plan.secure)
        return blkif.RSP_OKAY
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP and plan.kind is DISCARD:
            return blkif.RSP_EOPNOTSUPP
        log.warning("%s of %d bytes at %d failed: %s", plan.kind.value, plan.length, plan.offset, exc)
        return blkif.RSP_ERROR


class Where(enum.IntEnum):
    """Where Executor.run_now runs a READ or a WRITE (Executor.placement: what the native pass
    must do to choose as run_now does)."""

    POOL = 0  # not on the ring thread: submit() hands it to a worker
    NOWAIT = 1  # try with RWF_NOWAIT inline; anything short of done goes to a worker
    INLINE = 2  # inline, may block
    INLINE_ALIGNED = 3  # inline if offset and length are whole host pages, else POOL
    INLINE_MEMORY = 4  # inline: the file is memory (tmpfs), there is no disk or throttle to wait for


#: kinds that can be tried with RWF_NOWAIT on the ring thread before falling back to a worker
_NOWAIT_KINDS: Final = (READ, WRITE)
#: the host's page size: the page cache's unit (not blkif.PAGE_SIZE, the guest's segment unit)
_HOST_PAGE: Final = mmap.PAGESIZE


def execute_nowait(target: DeviceTarget, plan: IoPlan, bufs: list[memoryview]) -> int | None:
    """Try a READ/WRITE with RWF_NOWAIT: the blkif status if it completed in full without blocking,
    None if the caller must run it with `execute` on a worker (page-cache miss, dirty throttling,
    a short transfer, an error to report, or a kernel/filesystem without RWF_NOWAIT for it: then
    raises `NowaitUnsupported` so the caller stops trying).

    A partial transfer is not resumed here: the worker redoes the whole request. That is safe
    because the request has not been answered yet: a read fills the same guest pages with the same
    bytes again, a write stores the same bytes at the same place (a guest that changes an in-flight
    write buffer gets one of the torn results it already had to expect).
    """
    if _out_of_bounds(target, plan, bufs) is not None:
        return None  # execute() refuses it and logs
    call = os.preadv if plan.kind is READ else os.pwritev
    try:
        n = call(target.fd, bufs, plan.offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise NowaitUnsupported(plan.kind) from exc
        return None
    return blkif.RSP_OKAY if n == plan.length else None


class NowaitUnsupported(Exception):
    """The device's kernel path has no RWF_NOWAIT for this kind of I/O."""

    def __init__(self, kind: Kind) -> None:
        super().__init__(f"RWF_NOWAIT not supported for {kind.value}")
        self.kind = kind


Completion = Callable[[int], None]


class InFlight:
    """What every executor must track: requests taken and not yet completed. A request counts
    until its completion callback has returned (teardown unmaps the guest's pages only after
    `drain`), a callback's exception is logged and never stops the count, and a closed executor
    takes nothing new."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._count = 0
        self._closed = False

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    def enter(self) -> None:
        with self._cond:
            if self._closed:
                raise XenblockError("executor closed", code="internal")
            self._count += 1

    def leave(self, done: Completion, status: int) -> None:
        """Complete one request: `done(status)`, then it no longer counts."""
        try:
            done(status)
        except Exception:
            log.exception("%s: completion callback failed", self.name)
        finally:
            with self._cond:
                self._count -= 1
                if self._count == 0:
                    self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Take nothing new, then drain; False if requests are still in flight after `timeout`."""
        with self._cond:
            self._closed = True
        return self.drain(timeout)


class Executor:
    """Runs plans and tracks them until their completion callback has returned.

    The caller (the ring thread) first offers each plan to `run_now`: with `workers=0` that runs
    everything inline; with workers it runs a READ/WRITE inline only if RWF_NOWAIT lets it finish
    without blocking (data in the page cache). Anything else goes to `submit`, which runs it on a
    worker; with `workers=0`, `submit` runs inline too. Handing a request to a worker costs two GIL
    hand-offs and a Future, several times a cached 4 KiB read, so cached I/O never takes that path,
    while I/O that waits for the disk still overlaps on the pool. (Sending cached copies over
    128 KiB to the pool was measured too: slower and more CPU per 1 MiB request, bench/README.md.)

    WRITEs to a block device go through the DirectWriter (O_DIRECT, see its docstring) where it
    could be opened: they always wait for the device, so `inline_direct_writes` says whether they
    run on the ring thread or on the pool (unless alone on their ring). What follows is about buffered
    writes: plain files, and devices without a DirectWriter.

    How a buffered write may wait depends on the file's kind (writegate.py: `writes`, decided from
    statfs/S_ISBLK when the executor is made, corrected by the kernel's first RWF_NOWAIT answer).
    On xfs and btrfs it is tried with RWF_NOWAIT, and a refusal (the dirty throttle, a timestamp
    update, a lock) is written on the ring thread as below, not on the pool: it holds that ring
    alone, and the ring's requests finish in ring order (a ring group hands such a write back to
    the ring's thread for this). On tmpfs (no writeback, no disk) reads and writes run inline:
    their RWF_NOWAIT is refused with EOPNOTSUPP, which used to send every read to the pool.

    Buffered writes to a block device (and on ext4 and overlayfs) have no RWF_NOWAIT: the kernel says
    EOPNOTSUPP. Then a WRITE that covers whole host pages (offset and length multiples of the page
    size) runs inline on the ring thread anyway, and only other WRITEs go to the pool. Such a write
    never makes the kernel read: a page it touches is overwritten in full, so an uncached page is
    not read first (a partial page would be, and that read waits for the disk, blocking the ring).
    What it can still wait for: balance_dirty_pages throttling when the host has too much dirty
    data, page reclaim, and a page under writeback on a device that needs stable pages. That stalls
    this ring alone, which is what the throttle means to do to a writer; other rings, other disks
    and the pool are unaffected, and a stalled ring pushes back on its guest through the ring
    itself. Kernel blkback does no better: its one thread per ring submits each bio inline and
    blocks in the block layer when the queue is full. The gain: on real Xen every WRITE on the pool
    paid two GIL hand-offs, and the workers spent most of their time waiting for the GIL
    (bench/README.md, "write path inline"). Every guest segment is whole 4 KiB pages in practice
    (Linux blkfront's 1 MiB and 4 KiB writes), so the pool keeps only sub-page writes.

    A READ that would block also runs inline when `alone()` says it is the only request
    its ring has outstanding (the data plane sets it: consumed and not answered). There is nothing
    to overlap it with then, and the pool would only add its hand-off: a Future, a worker woken
    and the GIL passed back and forth, which on real Xen under TCG is a large part of one request
    (issue 20: GRUB reads its kernel from a cold device at queue depth 1, every request a page-cache
    miss). A request that arrives meanwhile waits for this one, as it would behind a full pool.

    Completion callbacks run on the worker thread; they must not call `drain()`.
    """

    def __init__(self, target: DeviceTarget, workers: int = 4, name: str = "xbc-io") -> None:
        self.target = target
        #: how the device's buffered I/O may wait, and its ring-group write gate (writegate.py)
        self.writes = DeviceWrites.of(target.fd, name)
        #: its ring's native loop last ran in a ring group (fastpath.FastPass.loop): a refused
        #: write is a hand-off
        self.in_group = False
        self._released = False
        #: where WRITEs go first: O_DIRECT on a second fd of a block device, or None (buffered)
        self._direct = DirectWriter.open(target, name)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) if workers > 0 else None
        self._tracked = InFlight(name)
        #: True when the request being offered to run_now is the only one outstanding on its ring
        self.alone: Callable[[], bool] | None = None
        # kinds still worth trying with RWF_NOWAIT (dropped for good after EOPNOTSUPP: e.g. buffered
        # writes on ext4 and on block devices); a direct write never asks
        self._nowait: set[Kind] = set(_NOWAIT_KINDS) if self._pool is not None else set()
        if self.writes.cls is not WriteClass.NOWAIT:
            self._nowait.discard(WRITE)  # known to refuse (GATED), or nothing to wait for (MEMORY)
        if self.writes.cls is WriteClass.MEMORY:
            self._nowait.discard(READ)
        if self._direct is not None:
            self._nowait.discard(WRITE)
            if self._direct.reads:
                self._nowait.discard(READ)  # a direct read waits for the device: RWF_NOWAIT cannot tell
        #: WRITEs through the DirectWriter run on the ring thread (True) or on the pool unless alone
        #: on their ring (False: DeviceTarget.direct_writes_on_pool). A direct write always waits
        #: for the device (RWF_NOWAIT cannot tell), so this trades the pool's overlap (several
        #: writes in the device at once, as blkback submits a ring's bios) against its GIL
        #: hand-offs: see bench/README.md, ring_write and the Xen section.
        self.inline_direct_writes = not target.direct_writes_on_pool

    @property
    def write_fd(self) -> int:
        """The fd WRITEs go to first (the O_DIRECT one, else the device's): the native pass's."""
        return self._direct.fd if self._direct is not None else self.target.fd

    @property
    def read_fd(self) -> int:
        """The fd READs go to first (the O_DIRECT one with direct reads, else the device's)."""
        direct = self._direct
        return direct.fd if direct is not None and direct.reads else self.target.fd

    def placement(self) -> tuple[Where, Where]:
        """Where run_now would run a READ and a WRITE now, for the native pass (it re-asks per
        call: a NOWAIT the kernel refused with EOPNOTSUPP is dropped as run_now meets it)."""
        if self._pool is None:
            return Where.INLINE, Where.INLINE
        memory = self.writes.cls is WriteClass.MEMORY
        read = Where.INLINE_MEMORY if memory else Where.NOWAIT if READ in self._nowait else Where.POOL
        if self._direct is not None:
            direct = Where.INLINE if self.inline_direct_writes else Where.POOL
            return direct if self._direct.reads else read, direct
        if memory:
            return read, Where.INLINE_MEMORY
        return read, Where.NOWAIT if WRITE in self._nowait else Where.INLINE_ALIGNED

    def _execute(self, plan: IoPlan, bufs: list[memoryview]) -> int:
        if self._direct is None:
            return execute(self.target, plan, bufs)
        return execute(self.target, plan, bufs, self._direct)

    def run_now(self, plan: IoPlan, bufs: list[memoryview]) -> int | None:
        """Run `plan` on the calling thread if that is the right place: its status, or None if it
        must be `submit`ted. Nothing is tracked: the I/O is over when this returns."""
        if self._pool is None:
            return self._execute(plan, bufs)
        kind = plan.kind
        direct = self._direct
        if direct is not None and (kind is WRITE or (kind is READ and direct.reads)):
            # placed as direct writes are (inline_direct_writes): both wait for the device
            if self.inline_direct_writes or (self.alone is not None and self.alone()):
                return self._execute(plan, bufs)
            return None
        if self.writes.cls is WriteClass.MEMORY and (kind is READ or kind is WRITE):
            return execute(self.target, plan, bufs)  # tmpfs: nothing to wait for (writegate.py)
        refused = False
        if kind in self._nowait:
            try:
                status = execute_nowait(self.target, plan, bufs)
            except NowaitUnsupported as exc:
                log.debug("%s; page-aligned writes run inline, others on the worker pool", exc)
                self._nowait.discard(exc.kind)
                if exc.kind is WRITE:
                    self.writes.unsupported()
                # nothing was written: fall through to the choice made from now on
            else:
                if status is not None:
                    return status
                if kind is READ:
                    if self.alone is not None and self.alone():
                        return execute(self.target, plan, bufs)  # nothing to overlap it with
                    return None
                # a WRITE the kernel would not take without waiting (dirty throttle, a timestamp
                # update, a lock): written here as a write without RWF_NOWAIT is (below), on the
                # ring's own thread, not the pool: the wait then holds this ring alone and its
                # requests still finish in ring order (a ring group hands such a write back here).
                # Not the pool even where nothing later overlaps it: pool writes hold the file's
                # lock, so ~3x the ring's writes were refused and xfs writers kept 0.3-0.7 of their
                # MiB/s; the pool's only gain was its wake-ups preempting a CPU-bound neighbour
                # of a group's CPU (bench/README.md, the xfs neighbour cost)
                refused = True
        if kind is WRITE and not (plan.offset | plan.length) % _HOST_PAGE:
            # whole pages: no read-modify-write, so no wait for the disk (see the class docstring).
            # The iovec's segment boundaries do not matter: the kernel fills each page from the
            # iterator across segments, so only the range's edges decide whether a page is partial.
            if refused and self.in_group:
                self.writes.refused()
            return execute(self.target, plan, bufs)
        return None

    @property
    def in_flight(self) -> int:
        return self._tracked.count

    def submit(self, plan: IoPlan, bufs: list[memoryview], done: Completion) -> None:
        self._tracked.enter()
        if self._pool is None:
            self._run(plan, bufs, done)
        else:
            self._pool.submit(self._run, plan, bufs, done)

    def _run(self, plan: IoPlan, bufs: list[memoryview], done: Completion) -> None:
        status = blkif.RSP_ERROR
        try:
            status = self._execute(plan, bufs)
        finally:
            self._tracked.leave(done, status)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight; False on timeout."""
        return self._tracked.drain(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, drain, stop the workers. True if everything completed."""
        drained = self._tracked.close(timeout)
        if not self._released:
            self._released = True
            self.writes.release()
        if self._pool is not None:
            self._pool.shutdown(wait=drained)
        if drained and self._direct is not None:
            # an opener of the device: closed only once nothing can write through it (the engine
            # closes the verified fd after this, so the last close stays the engine's)
            self._direct.close()
            self._direct = None
        return drained
