"""Opening a target and claiming it: the one path `add` (and `attach`, which runs add in-process)
and `identify` take from a parsed target to a device someone may hold.

Two steps, so that nothing is allocated before the sharing check has passed:

  open_target(target, writable=...) -> Opened
      opens the target exactly once and reads every identity fact from that fd (target.py says
      which forms exist); checks what the form promises (dm name, diskseq, "is a regular file");
      allocates nothing. The result knows its lock key and what the sharing check must be asked.
  claim(opened, use=..., lock_timeout=..., check=..., publish=...) -> Claimed
      under the per-target lock: the sharing check, then Opened.make() (a loop device for a file,
      the dm snapshot, or the device itself after the post-lock identity re-check), then `publish`,
      all before the lock is released, so a concurrent add of the same target sees our claim.

`identify` calls open_target and make() only: no lock, no check, nothing published.

One class per kind of target (file, block device, named dm device, volatile snapshot, NBD export
as a kernel NBD device). A new kind is one more Opened subclass and one case in open_target;
claim() and its callers stay as they are."""

from __future__ import annotations

import _stat
import posix

from xenblockctl.blockscript import faults
from xenblockctl.blockscript.locks import target_lock
from xenblockctl.blockscript.owner import OwnerRecord
from xenblockctl.blockscript.sharing import Wanted
from xenblockctl.blockscript.target import Target, maybe_dm
from xenblockctl.environment import Environment
from xenblockctl.kernel import blockdev, loop
from xenblockctl.kernel.blockdev import BlockDevice, BlockIdentity
from xenblockctl.kernel.errors import IdentityMismatch, TargetNotFound, TargetTypeError
from xenblockctl.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from types import TracebackType
    from typing import Self

    from xenblockctl.kernel.dm import DmControl
    from xenblockctl.nbd.client import ExportInfo
    from xenblockctl.nbd.uri import NbdUri


class Use(NamedTuple):
    """Whom the device is made for: `parts` name its loop tags (`xenblockctl:<parts>`) and a
    snapshot's dm name; (domid, devid) for a backend, ("identify", pid) for identify."""

    parts: tuple[int | str, ...]
    direct_io: bool = False

    def tag(self, *extra: str) -> str:
        return loop.make_tag(*self.parts, *extra)


class Claimed(NamedTuple):
    """The device to publish (its holder must keep it open until the consumer has its own
    reference: delete-on-close), its owner record and the path shown as physical-device-path."""

    device: BlockDevice
    owner: OwnerRecord
    path: str


class Opened:
    """A target opened once, nothing allocated yet. Subclasses set `key` (the per-target lock)
    and `wanted` (what the sharing check is asked) and implement make(); close() releases what
    the open holds, never what make() handed out."""

    key: str
    wanted: Wanted

    def make(self, use: Use) -> Claimed:
        """Allocate the device a consumer will hold. The caller owns the result."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_target(target: Target, *, writable: bool, env: Environment, for_backend: bool = False) -> Opened:
    """Open `target` once and check what its form promises. `snapshot:` targets are assembled for
    a backend only (`for_backend`); everything else may also be opened just to look at it."""
    if target.nbd is not None:
        return _NbdKernel.open(target.nbd, writable=writable, env=env)
    if target.snapshot:
        if not for_backend:
            raise TargetTypeError("a snapshot: target is assembled by the block script for a backend only")
        return _Snapshot.open(target, writable=writable, env=env)
    if maybe_dm(target):
        from xenblockctl.blockscript import dmtargets  # dm code only for dm forms

        named = dmtargets.open_named(target, writable=writable, env=env)
        if named is not None:
            return _Named(named, writable=writable)
    fd = blockdev.open_path(target.path, writable=writable)
    try:
        st = posix.fstat(fd)
        if is_file(st):
            if target.expect_dm_name is not None or target.expect_diskseq is not None:
                raise IdentityMismatch(f"{target.path} is a regular file, expected a block device")
            return _File(fd, st, target.path, writable=writable)
        ident = blockdev.identify(fd)
        check_expectations(target, ident)
        return _Device(fd, ident, target.path, writable=writable)
    except BaseException:
        posix.close(fd)
        raise


def claim(
    opened: Opened,
    *,
    use: Use,
    lock_timeout: float,
    env: Environment,
    check: Callable[[Wanted], None],
    publish: Callable[[Claimed], None],
) -> Claimed:
    """Lock -> sharing check -> make -> publish, the lock held throughout. A failure after make()
    closes the made device (delete-on-close unwinds it); the caller still closes `opened`."""
    faults.pause(env, "add-target-open")
    with target_lock(opened.key, timeout=lock_timeout, lock_dir=env.lock_dir):
        faults.pause(env, "add-locked")  # tests: a second add of the target waits on the lock
        check(opened.wanted)
        claimed = opened.make(use)
        try:
            publish(claimed)
        except BaseException:
            claimed.device.close()
            raise
        return claimed


def is_file(st: posix.stat_result) -> bool:
    """The one "is a regular file" rule: a file is attached through a new loop device (or is a
    snapshot's base); anything else open_path let through is a block device used as it is."""
    return _stat.S_ISREG(st.st_mode)


def check_expectations(target: Target, ident: BlockIdentity) -> None:
    """The identity checks a /dev/mapper/NAME or by-diskseq target promises, on the opened device."""
    if target.expect_dm_name is not None:
        from xenblockctl.kernel import sysfs  # here, not at the top: pathlib stays off a file add

        name = sysfs.dm_name(ident.major, ident.minor)
        if name != target.expect_dm_name:
            raise IdentityMismatch(
                f"{target.path} opened {ident.major}:{ident.minor} whose dm name is {name!r}, not "
                f"{target.expect_dm_name!r} (renamed or re-created while opening)"
            )
    if target.expect_diskseq is not None and ident.diskseq != target.expect_diskseq:
        raise IdentityMismatch(
            f"{target.path} opened a device with diskseq {ident.diskseq}, not {target.expect_diskseq}"
            " (by-diskseq links go stale after a detach)"
        )


def file_key(st: posix.stat_result) -> str:
    return f"file-{st.st_dev:x}-{st.st_ino:x}"


def device_key(ident: BlockIdentity) -> str:
    return f"dev-{ident.major}-{ident.minor}"


def export_key(export: NbdUri) -> str:
    """An NBD export's lock key (kernel NBD and engine-served alike): its canonical URI, hashed
    into a file name."""
    import hashlib  # here: the file and device paths never pay for it

    return "nbd-" + hashlib.sha256(export.canonical().encode()).hexdigest()[:32]


# --- the kinds ------------------------------------------------------------------------------------


class _FdOpened(Opened):
    """A kind whose open holds one fd (the file or device as opened by path)."""

    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            posix.close(fd)


class _File(_FdOpened):
    """A regular file: claimed by its (st_dev, st_ino); made into a fresh auto-clearing loop device."""

    def __init__(self, fd: int, st: posix.stat_result, path: str, *, writable: bool) -> None:
        self.fd, self.path, self.writable = fd, path, writable
        self.key = file_key(st)
        self.wanted = Wanted(writable=writable, file_id=(st.st_dev, st.st_ino))

    def make(self, use: Use) -> Claimed:
        device = loop.attach_fd(
            self.fd,
            read_only=not self.writable,
            tag=use.tag(),
            autoclear=True,
            direct_io=use.direct_io,
            backing_path=self.path,
        )
        owner = OwnerRecord.for_device(device, writable=self.writable)
        return Claimed(device, owner, f"/dev/loop{device.number}")


class _Device(_FdOpened):
    """A block device opened by path, its expectations checked on the fd before locking."""

    def __init__(self, fd: int, ident: BlockIdentity, path: str, *, writable: bool) -> None:
        self.fd, self.ident, self.path, self.writable = fd, ident, path, writable
        self.key = device_key(ident)
        self.wanted = Wanted(writable=writable, devt=ident.devt, diskseq=ident.diskseq)

    def make(self, use: Use) -> Claimed:
        # The sharing check was for the identity read before locking: a device resized, set
        # read-only or rebound since then is not what was checked.
        device = BlockDevice(posix.dup(self.fd), blockdev.identify(self.fd), self.path)
        if device.identity != self.ident:
            device.close()
            raise IdentityMismatch(f"{self.path} changed identity while it was being checked")
        return Claimed(device, OwnerRecord.for_device(device, writable=self.writable), self.path)


class _Named(Opened):
    """A dm device found by name or uuid and confirmed on its fd (dmtargets.open_named): the open
    already holds the device, make() hands that very reference over."""

    def __init__(self, device: BlockDevice, *, writable: bool) -> None:
        self.device: BlockDevice | None = device
        self.writable = writable
        self.key = device_key(device.identity)
        self.wanted = Wanted(writable=writable, devt=device.identity.devt, diskseq=device.identity.diskseq)

    def make(self, use: Use) -> Claimed:
        device, self.device = self.device, None
        if device is None:
            raise RuntimeError("a named dm target is made once")
        return Claimed(device, OwnerRecord.for_device(device, writable=self.writable), device.path or "")

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None


class _Snapshot(_FdOpened):
    """`snapshot:BASE`: the base is only ever read, so the sharing check asks for read-only use of
    the base file; the writable dm device made on top is new and private to its backend."""

    def __init__(self, fd: int, st: posix.stat_result, path: str, *, writable: bool) -> None:
        self.fd, self.st, self.path, self.writable = fd, st, path, writable
        self.key = file_key(st)
        self.wanted = Wanted(writable=False, file_id=(st.st_dev, st.st_ino))
        self.ctl: DmControl | None = None

    @classmethod
    def open(cls, target: Target, *, writable: bool, env: Environment) -> _Snapshot:
        from xenblockctl.blockscript import dmtargets

        fd = blockdev.open_path(target.path, writable=False)
        try:
            st = posix.fstat(fd)
            if not is_file(st):
                raise TargetTypeError(
                    f"{target.path}: the base of a snapshot: target must be a regular image file"
                )
            opened = cls(fd, st, target.path, writable=writable)
            opened.ctl = dmtargets.control(env)  # no dm: fail before anything is allocated
            return opened
        except BaseException:
            posix.close(fd)
            raise

    def make(self, use: Use) -> Claimed:
        from xenblockctl.blockscript import dmtargets

        assert self.ctl is not None, "open() sets it"
        disk = dmtargets.create_snapshot(
            self.ctl, self.fd, base_path=self.path, parts=use.parts, direct_io=use.direct_io
        )
        try:
            owner = OwnerRecord.for_dm(
                disk.device.identity,
                uuid=disk.uuid,
                backing=(self.st.st_dev, self.st.st_ino),
                writable=self.writable,
            )
        except BaseException:
            disk.device.close()  # deferred remove is armed: this removes it, the loops follow
            raise
        return Claimed(disk.device, owner, disk.device.path or "")

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        super().close()


class _NbdKernel(Opened):
    """An NBD export, made into a fresh kernel NBD device (kernel/nbd.py) that kernel blkback (or
    the engine) opens like any block device.

    open() does the handshake in userspace (nbd/client.py: a bad URI, an unreachable server, a
    refused or empty export fail here, before anything exists in the kernel). make() hands the
    connected socket to the kernel with delete-on-close flags and opens the new device at once:
    the one window in which a device could outlive us is between those two steps (an unopened
    NBD device does not clear by itself), so any failure there disconnects it explicitly, and
    `gc` disconnects an unopened device carrying our backend identifier. The diskseq is fresh
    (nbds_max=0: every connect creates a new device), so it is published like a loop device's.

    Sharing: NBD has no lock of its own; whether a second client may write is the server's policy
    (qemu-nbd and qemu-storage-daemon admit one by default, nbdkit any). The check refuses a
    writer beside an engine-served user of the same export on this host (their owner records name
    its URI, nbdexport.py); two kernel NBD devices of one export are not told apart yet (their
    records name the device, not the export)."""

    def __init__(
        self, export: NbdUri, sock: socket.socket, info: ExportInfo, *, writable: bool, env: Environment
    ) -> None:
        self.export, self.sock, self.info, self.writable, self.env = export, sock, info, writable, env
        self.key = export_key(export)
        self.wanted = Wanted(writable=writable, nbd_uri=export.canonical())

    @classmethod
    def open(cls, export: NbdUri, *, writable: bool, env: Environment) -> _NbdKernel:
        from xenblockctl.nbd import client

        sock = client.open_socket(export)
        try:
            info = client.handshake(sock, export)
            if writable and info.read_only:
                raise TargetTypeError(f"{export.canonical()}: the export is read-only, the disk is writable")
        except BaseException:
            sock.close()
            raise
        return cls(export, sock, info, writable=writable, env=env)

    def make(self, use: Use) -> Claimed:
        from xenblockctl.kernel import nbd as knbd

        identifier = use.tag()
        index = knbd.connect(self.sock.fileno(), self.info.size, self.info.flags, identifier)
        try:
            # killed here, the device stays connected unopened: `remove` and `gc` disconnect it
            faults.pause(self.env, "add-nbd-connected")
            fd = _open_new_node(f"/dev/nbd{index}", writable=self.writable)
        except BaseException:
            try:  # noqa: SIM105 (contextlib is kept off the hotplug path's imports)
                knbd.disconnect(index)
            except knbd.NbdDeviceError:
                pass
            raise
        device = BlockDevice(fd, blockdev.identify(fd), f"/dev/nbd{index}")
        return Claimed(device, OwnerRecord.for_device(device, writable=self.writable), device.path or "")

    def close(self) -> None:
        self.sock.close()  # the kernel holds its own reference once connected


def _open_new_node(path: str, *, writable: bool, wait: float = 2.0) -> int:
    """Open a device node the kernel has just created: devtmpfs makes it while the disk is added,
    but a udev-managed /dev may lag a moment, so ENOENT is retried briefly (bounded)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        try:
            return blockdev.open_path(path, writable=writable)
        except TargetNotFound:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
