"""Loop devices, systemd-grade: one atomic LOOP_CONFIGURE, a bounded retry of the GET_FREE race,
verification of what the kernel really did, ownership tags, and detach only with proof.

See kernel-devices.md §1-§4: LOOP_CTL_GET_FREE reserves nothing, so two attachers can get the same
number; the loser sees EBUSY from LOOP_CONFIGURE and must retry with another number."""

from __future__ import annotations

import _stat
import _struct as struct  # what struct.py re-exports, without its file: tests/lint/test_hotplug_imports.py
import errno
import fcntl
import posix
import time

from xenblockctl import backoff
from xenblockctl.enums import Enum
from xenblockctl.kernel.blockdev import (
    UNSUPPORTED_ERRNOS,
    BlockDevice,
    BlockIdentity,
    identify,
    open_devt,
    open_path,
    read_diskseq,
)
from xenblockctl.kernel.errors import (
    DeviceError,
    IdentityMismatch,
    LoopError,
    LoopExhausted,
    NotOurs,
    TargetEmpty,
    TargetTypeError,
    UnsupportedKernel,
)
from xenblockctl.kernel.loop_abi import (
    LO_NAME_SIZE,
    LOOP_CLR_FD,
    LOOP_CONFIGURE,
    LOOP_CTL_GET_FREE,
    LOOP_GET_STATUS64,
    LOOP_INFO64_SIZE,
    LOOP_MAJOR,
    LOOP_SET_STATUS64,
    LoopConfig,
    LoopFlags,
    LoopInfo64,
)
from xenblockctl.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

LOOP_CONTROL = "/dev/loop-control"
#: Where bound_loops() scans: one directory per block device, `loopN/loop/` only while bound.
SYS_BLOCK = "/sys/block"
#: Where /sys/block's loopN links point (loop devices have no parent device).
SYS_VIRTUAL_BLOCK = "/sys/devices/virtual/block"
#: Where /dev/loopN nodes are looked for; without one we use a private node (containers, no devtmpfs).
DEV_DIR = "/dev"
#: Every loop device we create carries a lo_file_name starting with this, so list/gc can find ours
#: and never touch an admin's.
TAG_PREFIX = "xenblockctl:"

#: errnos of LOOP_CONFIGURE (or of opening /dev/loopN) that mean "lost a race, try another number".
_RACE_ERRNOS = frozenset({errno.EBUSY, errno.ENXIO, errno.ENOENT})


class RetryPolicy(NamedTuple):
    """Bounded, jittered backoff for the GET_FREE race (measured: 15-30 EBUSY per worker with 8
    parallel attachers). Worst case sums to well under a second; libxl kills us at 40 s.

    Only a race nobody visibly won sleeps: a LOOP_CONFIGURE refused with EBUSY on a device that is
    bound now was lost to another binder, which made progress, so the next GET_FREE names another
    device and is asked at once (as a compare-and-swap loop retries; bench/README.md, issue 18's
    parallel adds: 32 adds lost ~27 races, half of them paid a sleep and `import random`)."""

    attempts: int = 64
    base_delay: float = 0.0005
    max_delay: float = 0.02

    def delay(self, attempt: int) -> float:
        return backoff.fraction() * min(self.max_delay, self.base_delay * (2.0 ** min(attempt, 16)))


DEFAULT_RETRY = RetryPolicy()
#: Immediate retries after races lost to other binders, beyond RetryPolicy.attempts: each one is
#: another attach that succeeded meanwhile, so this bounds the loop, not the fairness.
LOST_RACES_MAX = 1024


def make_tag(*parts: object) -> str:
    """`xenblockctl:<part>:<part>` fitted into lo_file_name (63 bytes + NUL)."""
    tag = TAG_PREFIX + ":".join(str(p) for p in parts)
    raw = tag.encode("ascii", "replace")
    if len(raw) >= LO_NAME_SIZE:
        raise ValueError(f"loop tag too long: {tag!r}")
    return tag


class LoopStatus(NamedTuple):
    """LOOP_GET_STATUS64 of a bound device, decoded."""

    number: int
    backing_dev: int
    backing_ino: int
    flags: LoopFlags
    tag: str
    offset: int
    sizelimit: int

    @classmethod
    def from_info(cls, info: LoopInfo64) -> LoopStatus:
        return cls(
            number=info.lo_number,
            backing_dev=info.lo_device,
            backing_ino=info.lo_inode,
            flags=LoopFlags(info.lo_flags),
            tag=info.lo_file_name.decode("ascii", "replace"),
            offset=info.lo_offset,
            sizelimit=info.lo_sizelimit,
        )


def get_status(fd: int) -> LoopStatus | None:
    """Status of the loop device on fd; None when it is not bound (ENXIO)."""
    buf = bytearray(LOOP_INFO64_SIZE)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise LoopError("LOOP_GET_STATUS64 failed", errno=exc.errno) from exc
    return LoopStatus.from_info(LoopInfo64.unpack(bytes(buf)))


class LoopDevice(BlockDevice):
    """A loop device we configured, open on `fd`. With AUTOCLEAR, closing the last fd detaches it."""

    def __init__(
        self, fd: int, identity: BlockIdentity, number: int, status: LoopStatus, backing_path: str
    ) -> None:
        super().__init__(fd, identity, f"/dev/loop{number}")
        self.number = number
        self.status = status
        self.backing_path = backing_path

    @property
    def tag(self) -> str:
        return self.status.tag

    @property
    def autoclear(self) -> bool:
        return LoopFlags.AUTOCLEAR in self.status.flags

    @property
    def direct_io(self) -> bool:
        return LoopFlags.DIRECT_IO in self.status.flags

    def set_autoclear(self, on: bool) -> None:
        """Turn AUTOCLEAR on or off on the bound device (LOOP_SET_STATUS64 may change exactly that).

        Kernel blkback drops its reference when a frontend reconnects; a device it consumes must
        not auto-clear then, so the block script clears the flag only after blkback holds it."""
        buf = bytearray(LOOP_INFO64_SIZE)
        fcntl.ioctl(self.fd, LOOP_GET_STATUS64, buf, True)
        info = LoopInfo64.unpack(bytes(buf))
        flags = (info.lo_flags | LoopFlags.AUTOCLEAR) if on else (info.lo_flags & ~LoopFlags.AUTOCLEAR)
        new = LoopInfo64(
            lo_offset=info.lo_offset,
            lo_sizelimit=info.lo_sizelimit,
            lo_flags=int(flags),
            lo_file_name=info.lo_file_name,
        )
        try:
            fcntl.ioctl(self.fd, LOOP_SET_STATUS64, new.pack())
        except OSError as exc:
            raise LoopError("LOOP_SET_STATUS64 (autoclear) failed", errno=exc.errno) from exc
        status = get_status(self.fd)
        if status is None or (LoopFlags.AUTOCLEAR in status.flags) != on:
            raise LoopError("kernel did not apply the autoclear change")
        self.status = status

    def __repr__(self) -> str:
        i = self.identity
        return f"<LoopDevice loop{self.number} {i.major}:{i.minor} diskseq={i.diskseq} tag={self.tag!r}>"


def _open_loop_number(number: int, writable: bool) -> int:
    """Open /dev/loopN, or a private node for 7:N where /dev has none (containers)."""
    flags = (posix.O_RDWR if writable else posix.O_RDONLY) | posix.O_CLOEXEC | posix.O_NONBLOCK
    devt = posix.makedev(LOOP_MAJOR, number)
    path = f"{DEV_DIR}/loop{number}"
    try:
        st = posix.stat(path)
        if _stat.S_ISBLK(st.st_mode) and st.st_rdev == devt:
            return posix.open(path, flags)
    except FileNotFoundError:
        pass
    return open_devt(devt, writable=writable).fd  # private node; identity read is cheap and harmless


class LoopRequest(NamedTuple):
    """What the caller wants of a new loop device."""

    read_only: bool
    tag: str
    autoclear: bool = True
    direct_io: bool = False
    block_size: int = 512

    def flags(self) -> LoopFlags:
        flags = LoopFlags(0)
        if self.read_only:
            flags |= LoopFlags.READ_ONLY
        if self.autoclear:
            flags |= LoopFlags.AUTOCLEAR
        if self.direct_io:
            flags |= LoopFlags.DIRECT_IO
        return flags


def attach_fd(
    backing_fd: int,
    *,
    read_only: bool,
    tag: str,
    autoclear: bool = True,
    direct_io: bool = False,
    block_size: int = 512,
    backing_path: str = "",
    retry: RetryPolicy = DEFAULT_RETRY,
) -> LoopDevice:
    """Bind a fresh loop device to an already open regular file with one LOOP_CONFIGURE.

    The backing fd is the file the caller validated; the kernel takes its own reference, so the
    caller may close it afterwards. The returned device's identity (diskseq!) is read through the
    loop fd after configuring, so it names exactly this binding."""
    request = LoopRequest(read_only, tag, autoclear, direct_io, block_size)
    name = backing_path or "backing file"
    st = posix.fstat(backing_fd)
    if not _stat.S_ISREG(st.st_mode):
        raise TargetTypeError(f"{name} is not a regular file")
    if st.st_size < 512:
        raise TargetEmpty(f"{name} is empty or smaller than one sector")
    accmode = fcntl.fcntl(backing_fd, fcntl.F_GETFL) & posix.O_ACCMODE
    if not read_only and accmode == posix.O_RDONLY:
        raise LoopError("a writable loop device needs a backing fd opened read-write")
    if not tag.startswith(TAG_PREFIX) or len(tag.encode("ascii")) >= LO_NAME_SIZE:
        raise ValueError(f"bad loop tag {tag!r}")
    try:
        ctl = posix.open(LOOP_CONTROL, posix.O_RDWR | posix.O_CLOEXEC)
    except OSError as exc:
        raise UnsupportedKernel(f"cannot open {LOOP_CONTROL}", errno=exc.errno) from exc
    try:
        return _attach_loop(ctl, backing_fd, st, request, backing_path=backing_path, retry=retry)
    finally:
        posix.close(ctl)


def _attach_loop(
    ctl: int,
    backing_fd: int,
    st: posix.stat_result,
    request: LoopRequest,
    *,
    backing_path: str,
    retry: RetryPolicy,
) -> LoopDevice:
    last_errno = 0
    lost_to_binder = False
    attempt = -1  # counts the tries that were not an immediate retry after a race lost to a binder
    for _ in range(retry.attempts + LOST_RACES_MAX):
        if not lost_to_binder:
            attempt += 1
            if attempt == retry.attempts:
                break
            if attempt:
                time.sleep(retry.delay(attempt))
        lost_to_binder = False
        try:
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
        except OSError as exc:
            raise LoopError("LOOP_CTL_GET_FREE failed (no free loop devices?)", errno=exc.errno) from exc
        try:
            fd = _open_loop_number(number, writable=not request.read_only)
        except (OSError, DeviceError) as exc:
            code = exc.errno
            if code in _RACE_ERRNOS:
                last_errno = code or 0
                continue
            raise LoopError(f"cannot open loop{number}", errno=code) from exc
        raw_tag = request.tag.encode("ascii")
        config = LoopConfig(
            fd=backing_fd,
            block_size=request.block_size,
            info=LoopInfo64(lo_flags=int(request.flags()), lo_file_name=raw_tag),
        )
        try:
            fcntl.ioctl(fd, LOOP_CONFIGURE, config.pack())
        except OSError as exc:
            if exc.errno in _RACE_ERRNOS:
                # Bound now: another binder won this number (no sleep before the next GET_FREE).
                lost_to_binder = exc.errno == errno.EBUSY and _bound(fd)
                posix.close(fd)
                last_errno = exc.errno or 0
                continue
            posix.close(fd)
            if exc.errno == errno.EINVAL and request.direct_io:
                # Some kernels refuse DIRECT_IO outright for this backing file: go on buffered.
                request = request._replace(direct_io=False)
                continue
            if exc.errno in UNSUPPORTED_ERRNOS:
                raise UnsupportedKernel(
                    "LOOP_CONFIGURE not supported (Linux >= 5.8 needed)", errno=exc.errno
                ) from exc
            raise LoopError("LOOP_CONFIGURE failed", errno=exc.errno) from exc
        try:
            return _verify(fd, number, st, request, backing_path)
        except BaseException:
            # We bound it: undo before reporting. CLR_FD then close detaches even without AUTOCLEAR.
            try:  # noqa: SIM105 (contextlib is kept off the hotplug path's imports)
                fcntl.ioctl(fd, LOOP_CLR_FD)
            except OSError:
                pass
            posix.close(fd)
            raise
    raise LoopExhausted(
        f"no loop device after {retry.attempts} attempts (lost the GET_FREE race)", errno=last_errno
    )


def _bound(fd: int) -> bool:
    """Whether the loop device open as `fd` is bound (LOOP_GET_STATUS64 answers ENXIO if not)."""
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64_SIZE))
    except OSError:
        return False
    return True


def _verify(
    fd: int, number: int, st: posix.stat_result, request: LoopRequest, backing_path: str
) -> LoopDevice:
    """Read back what the kernel really configured: the backing file must be the one we opened,
    AUTOCLEAR/READ_ONLY must be set as asked. DIRECT_IO may be silently dropped (alignment)."""
    status = get_status(fd)
    if status is None:
        raise LoopError(f"loop{number} unbound right after LOOP_CONFIGURE")
    if (status.backing_dev, status.backing_ino) != (st.st_dev, st.st_ino):
        raise IdentityMismatch(f"loop{number} is bound to another file than the one we opened")
    wanted = request.flags()
    for needed in (LoopFlags.AUTOCLEAR, LoopFlags.READ_ONLY):
        if needed in wanted and needed not in status.flags:
            raise LoopError(f"loop{number}: kernel did not set {needed.name}")
    if status.tag != request.tag:
        raise LoopError(f"loop{number}: ownership tag not stored")
    identity = identify(fd)
    if request.read_only and not identity.read_only:
        raise LoopError(f"loop{number}: read-only requested but BLKROGET says writable")
    return LoopDevice(fd, identity, number, status, backing_path)


def attach_file(
    path: str, *, read_only: bool, tag: str, autoclear: bool = True, direct_io: bool = False
) -> LoopDevice:
    """Open `path` once (O_RDONLY for read-only) and bind it; the backing fd is closed afterwards."""
    backing = open_path(path, writable=not read_only)
    try:
        if not _stat.S_ISREG(posix.fstat(backing).st_mode):
            raise TargetTypeError(f"{path} is not a regular file")
        return attach_fd(
            backing, read_only=read_only, tag=tag, autoclear=autoclear, direct_io=direct_io, backing_path=path
        )
    finally:
        posix.close(backing)


class DetachResult(Enum):
    DETACHED = "detached"  # we cleared it (or armed AUTOCLEAR while a consumer still holds it)
    ALREADY_GONE = "already-gone"  # unbound, or the number now names another binding (diskseq differs)


def detach_with_proof(
    devt: int, *, diskseq: int, tag: str, backing: tuple[int, int] | None = None
) -> DetachResult:
    """Detach the loop device `devt` only if it is still exactly the binding we created.

    Proof = same device number, same diskseq (a re-attach bumps it), our tag in lo_file_name, and
    (when known) the same backing inode. LOOP_CLR_FD only arms AUTOCLEAR while others hold the
    device; the real detach happens at their last close, never under a consumer's feet."""
    if posix.major(devt) != LOOP_MAJOR:
        raise NotOurs(f"{posix.major(devt)}:{posix.minor(devt)} is not a loop device")
    number = posix.minor(devt)
    if not _registered(number):
        return DetachResult.ALREADY_GONE  # removed; do not open 7:N, that would re-create it
    dev = open_devt(devt, writable=False, node=f"/dev/loop{number}")
    try:
        if dev.identity.diskseq != diskseq:
            return DetachResult.ALREADY_GONE
        status = get_status(dev.fd)
        if status is None:
            return DetachResult.ALREADY_GONE
        if status.tag != tag:
            raise NotOurs(f"loop{number} carries tag {status.tag!r}, not {tag!r}")
        if backing is not None and (status.backing_dev, status.backing_ino) != backing:
            raise NotOurs(f"loop{number} is backed by another file than recorded")
        try:
            fcntl.ioctl(dev.fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return DetachResult.ALREADY_GONE
            raise LoopError(f"LOOP_CLR_FD on loop{number} failed", errno=exc.errno) from exc
        return DetachResult.DETACHED
    finally:
        dev.close()


def autoclear_now(number: int) -> bool | None:
    """Whether loop device `number`'s current binding has AUTOCLEAR on, from sysfs (None: not
    bound). Which binding that is, the caller proves separately (detach_with_proof's diskseq)."""
    try:
        with open(f"{SYS_BLOCK}/loop{number}/loop/autoclear") as f:
            return f.read().strip() == "1"
    except OSError:  # unbound (no loop/ directory) or detached meanwhile (ENODEV)
        return None


def _registered(number: int) -> bool:
    """Whether the kernel still has loop device 7:number, asked of sysfs so that nothing is opened
    (or re-created). A stat, not kernel/sysfs: that module imports pathlib (~5 ms of every remove)."""
    try:
        posix.stat(f"/sys/dev/block/{LOOP_MAJOR}:{number}/dev")
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


class BoundLoop(NamedTuple):
    """A bound loop device as seen by a scan: number, diskseq, backing file path and status."""

    number: int
    diskseq: int
    backing_file: str
    status: LoopStatus

    @property
    def devt(self) -> int:
        return posix.makedev(LOOP_MAJOR, self.number)


def bound_loops(tag_prefix: str | None = TAG_PREFIX) -> Iterator[BoundLoop]:
    """Bound loop devices (optionally only those whose tag starts with `tag_prefix`).

    Scans sysfs first (no opens for unbound devices, so nothing is created or held), then reads
    the tag through LOOP_GET_STATUS64 on a short-lived read-only fd."""
    # os, not pathlib: this runs in every block script add of a file (pathlib costs ~5 ms to import)
    for name in sorted(n for n in posix.listdir(SYS_BLOCK) if n.startswith("loop")):
        try:
            number = int(name.removeprefix("loop"))
            with open(f"{SYS_BLOCK}/{name}/loop/backing_file") as f:
                backing_file = f.read().strip()
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        except OSError as exc:
            # Detached between the listing and the read (another script's remove, a last close):
            # sysfs answers ENODEV for the vanished attribute. Not bound any more: not a claim.
            if exc.errno != errno.ENODEV:
                raise
            continue
        try:
            dev = open_devt(posix.makedev(LOOP_MAJOR, number), writable=False, node=f"/dev/loop{number}")
        except DeviceError:
            continue
        try:
            status = get_status(dev.fd)
            diskseq = dev.identity.diskseq
        finally:
            dev.close()
        if status is None:
            continue
        if tag_prefix is not None and not status.tag.startswith(tag_prefix):
            continue
        yield BoundLoop(number=number, diskseq=diskseq, backing_file=backing_file, status=status)


#: lo_device and lo_inode: the first two fields of struct loop_info64 (loop_abi.LoopInfo64).
_BACKING = struct.Struct("=QQ")
#: lo_file_name (our tag), after five u64 and four u32 fields of struct loop_info64.
_NAME = struct.Struct(f"=40x16x{LO_NAME_SIZE}s")
#: Read-only, never blocking on a device without medium, never a controlling tty (blockdev's flags).
_SCAN_FLAGS = posix.O_RDONLY | posix.O_NONBLOCK | posix.O_NOCTTY | posix.O_CLOEXEC


def bound_loops_backed_by(backing: tuple[int, int]) -> Iterator[BoundLoop]:
    """The bound loop devices whose backing file is `backing` (st_dev, st_ino), whoever set them up:
    exactly what bound_loops(tag_prefix=None) yields for that file, in the same order.

    The sharing check of every file add looks at every bound loop device on the host, so a device
    backed by another file costs only what telling it apart needs: a stat of its sysfs `loop/`
    directory (bound or not: no open of an unbound minor, which would create nothing but costs an
    open), a stat, open and fstat of its node, and LOOP_GET_STATUS64, whose first two fields are the
    backing inode. The diskseq, the decoded status and the sysfs backing path are read only for a
    match (bound_loops reads all three, plus five identity ioctls, for every device).

    The sysfs look is a stat relative to one fd on the loop devices' own directory
    (/sys/devices/virtual/block, where /sys/block's links point), not /sys/block/loopN/loop: the
    symlink walk per minor was most of it (bench/README.md, issue 18's parallel adds). That
    directory is the only one listed: a loop disk has no parent device, so the kernel always makes
    it there, and /sys/block (every disk of the host) is listed only where that directory lists no
    loop device at all (absent, or another sysfs layout). On a host that keeps hundreds of unbound
    minors (earlier attaches leave them) most of the scan is per-minor work, so an unbound minor
    costs its name test and one stat: its number is parsed, and the names sorted, for bound ones
    only (work18: a second listing, the set check, a sort and an int() per minor were +0.3 ms of a
    file add's CPU against the stdlib floor's scan on this host)."""
    where, names = _sysfs_loop_dir()
    try:
        yield from _matching(_bound_names(names, where), lambda info: _BACKING.unpack_from(info) == backing)
    finally:
        posix.close(where)


def bound_loops_tagged(tag: str) -> Iterator[BoundLoop]:
    """The bound loop devices whose tag is exactly `tag`, at bound_loops_backed_by's cost: one
    LOOP_GET_STATUS64 a bound device, whose lo_file_name tells them apart; the diskseq and the
    sysfs backing path only for a match (remove's pass over a vbd's devices without a record runs
    on removes that find none, e.g. after a failed add: bound_loops costs ~7.8 ms at 32 bound
    devices, bench/README.md)."""
    raw = tag.encode("ascii")
    where, names = _sysfs_loop_dir()
    try:
        yield from _matching(
            _bound_names(names, where), lambda info: _NAME.unpack_from(info)[0].rstrip(b"\0") == raw
        )
    finally:
        posix.close(where)


def _sysfs_loop_dir() -> tuple[int, list[str]]:
    """A dir fd to stat `<name>/loop` under, and the loop names it lists: SYS_VIRTUAL_BLOCK's when it
    lists any (a block device's name is unique, so that entry is the device /sys/block/<name>
    links to), else SYS_BLOCK's, whose loopN links the stat follows."""
    flags = posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC
    try:
        fd = posix.open(SYS_VIRTUAL_BLOCK, flags)
    except OSError:
        pass
    else:
        try:
            names = [n for n in posix.listdir(fd) if n.startswith("loop")]
        except OSError:
            names = []
        if names:
            return fd, names
        posix.close(fd)
    fd = posix.open(SYS_BLOCK, flags)
    try:
        return fd, [n for n in posix.listdir(fd) if n.startswith("loop")]
    except BaseException:
        posix.close(fd)
        raise


def _bound_names(names: list[str], where: int) -> list[str]:
    """The names among `names` with a sysfs `loop/` directory under `where` (bound now), sorted as
    bound_loops sorts them."""
    bound = []
    for name in names:
        try:
            posix.stat(name + "/loop", dir_fd=where)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # detached meanwhile, as in bound_loops
                raise
            continue
        bound.append(name)
    bound.sort()
    return bound


def _matching(names: list[str], match: Callable[[bytearray], bool]) -> Iterator[BoundLoop]:
    """The devices among `names` whose struct loop_info64 (as LOOP_GET_STATUS64 fills it) `match`es."""
    for name in names:
        try:
            number = int(name.removeprefix("loop"))
        except ValueError:
            continue
        fd = _open_for_scan(posix.makedev(LOOP_MAJOR, number), f"{DEV_DIR}/loop{number}")
        if fd < 0:
            continue
        try:
            buf = bytearray(LOOP_INFO64_SIZE)
            try:
                fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    continue  # detached between the stat and the ioctl
                raise LoopError("LOOP_GET_STATUS64 failed", errno=exc.errno) from exc
            if not match(buf):
                continue
            status = LoopStatus.from_info(LoopInfo64.unpack(bytes(buf)))
            diskseq = read_diskseq(fd)
        finally:
            posix.close(fd)
        try:
            with open(f"{SYS_BLOCK}/{name}/loop/backing_file") as f:
                backing_file = f.read().strip()
        except OSError:
            backing_file = ""  # detached since: the claim stands for the binding the fd saw
        yield BoundLoop(number=number, diskseq=diskseq, backing_file=backing_file, status=status)


def _open_for_scan(devt: int, node: str) -> int:
    """A read-only fd on `devt`, -1 if it cannot be opened (as bound_loops skips it). `node` when it
    is this block device (checked before and after opening, as open_devt does, without its identity
    ioctls), else open_devt's private node."""
    fd = -1
    try:
        st = posix.stat(node)
        if _stat.S_ISBLK(st.st_mode) and st.st_rdev == devt:
            fd = posix.open(node, _SCAN_FLAGS)
            st = posix.fstat(fd)
            if _stat.S_ISBLK(st.st_mode) and st.st_rdev == devt:
                return fd
    except OSError:
        pass
    if fd >= 0:
        posix.close(fd)
    try:
        dev = open_devt(devt, writable=False)
    except DeviceError:
        return -1
    with dev:
        return posix.dup(dev.fd)
