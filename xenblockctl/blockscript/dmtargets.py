"""device-mapper target forms: named and uuid opens confirmed on the fd, and volatile snapshots.

Imported only for dm targets (the plain file/device path of every VM start does not pay for it).

Named devices (`/dev/mapper/NAME`, LVM's `/dev/VG/LV`, `uuid:...`): the kernel is asked which
device carries the name, that dev_t is opened, and DM_DEV_STATUS *by the opened fd's dev_t* must
still report the same name and uuid (kernel/dm.py open_confirmed). A rename or remove+recreate
between lookup and open is refused (`dm-identity`/`dm-missing`), never followed.

`snapshot:/path/base.img` (the disposable-VM disk): the base is attached read-only (loop, tagged),
writes go to a sparse COW file the size of the base that is unlinked from birth (O_TMPFILE next
to the base, else in /var/tmp), and a non-persistent dm-snapshot joins them. Deferred remove is
armed before anyone else can open the device, so the consumer's last close removes it, which
closes both loops, which auto-clear, which frees the COW. A script killed inside DM_DEV_CREATE ->
arm leaves a device of ours with open_count 0: the sweep at engine start (and `gc`) removes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from collections.abc import Callable

from xenblockctl.blockscript import faults
from xenblockctl.blockscript.target import Target
from xenblockctl.environment import Environment
from xenblockctl.kernel import dm, loop, sysfs
from xenblockctl.kernel.blockdev import BlockDevice
from xenblockctl.kernel.dm_abi import Cmd
from xenblockctl.kernel.errors import DeviceError

#: Where the COW goes when the base's directory cannot hold an O_TMPFILE (read-only, 9p, ...):
#: disk-backed on usual systems, unlike /tmp or /dev/shm whose pages a busy guest would pin in RAM.
COW_FALLBACK_DIR = "/var/tmp"


class SnapshotError(DeviceError):
    code = "snapshot-error"


def _ioctl_with_stops(env: Environment) -> Callable[[int, int, bytearray], int]:
    def ioctl(fd: int, req: int, buf: bytearray) -> int:
        result: int = fcntl.ioctl(fd, req, buf, True)
        if req & 0xFF == Cmd.DEV_CREATE:
            faults.pause(env, "add-dm-created")
        elif req & 0xFF == Cmd.TABLE_LOAD:
            faults.pause(env, "add-dm-loaded")
        return result

    return ioctl


def control(env: Environment) -> dm.DmControl:
    """/dev/mapper/control (DmUnavailable without dm), with the pause points when a test asks."""
    if env.pause_at in faults.DM_POINTS:
        return dm.DmControl.open(ioctl=_ioctl_with_stops(env))
    return dm.DmControl.open()


# --- named and uuid devices -----------------------------------------------------------------------


def dm_name_for(target: Target) -> str | None:
    """The dm name a path target means, or None if it is not a named dm target: /dev/mapper/NAME,
    or /dev/VG/LV when that path is a dm device called VG-LV (so /dev/md/x or /dev/block/M:m stay
    plain block devices, opened by path)."""
    if target.expect_dm_name is not None:
        return target.expect_dm_name
    if target.snapshot or target.dm_uuid is not None:
        return None
    name = dm.name_for_path(target.path)
    if name is None:
        return None
    try:
        rdev = os.stat(target.path).st_rdev
    except OSError:
        return None
    return name if sysfs.dm_name(os.major(rdev), os.minor(rdev)) == name else None


def open_named(target: Target, *, writable: bool, env: Environment) -> BlockDevice | None:
    """Open a `/dev/mapper/NAME`, `/dev/VG/LV` or `uuid:` target through dm control and confirm it
    on the fd. None: not a dm form, or (name forms only) the kernel has no dm control node, so the
    caller opens the path and checks sysfs instead."""
    name = dm_name_for(target)
    if name is None and target.dm_uuid is None:
        return None
    try:
        ctl = control(env)
    except dm.DmUnavailable:
        if target.dm_uuid is not None:
            raise
        return None
    with ctl:
        if target.dm_uuid is not None:
            resolved = ctl.status(uuid=target.dm_uuid)
        else:
            assert name is not None
            resolved = ctl.status(name=name)
        faults.pause(env, "add-dm-resolved")
        device = dm.open_confirmed(ctl, resolved, writable=writable)
    # The admin's path is what the published physical-device-path should show; for uuid: the node.
    path = target.path if target.dm_uuid is None else f"/dev/dm-{os.minor(device.dev)}"
    return BlockDevice(device.fd, device.block.identity, path)


# --- volatile snapshots ---------------------------------------------------------------------------


class VolatileDisk:
    """A snapshot we created: the dm device (held by `device`) and what the owner record proves."""

    def __init__(self, device: BlockDevice, *, uuid: str, name: str) -> None:
        self.device = device
        self.uuid = uuid
        self.name = name


def _cow_fd(base_path: str, size: int) -> int:
    """A sparse, never-linked file of `size` bytes: its blocks are freed with the last reference
    (the COW loop, auto-clearing), so no COW file can be left behind by a crash."""
    tried: list[str] = []
    for directory in (os.path.dirname(base_path) or "/", COW_FALLBACK_DIR):
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            tried.append(f"{directory}: {errno.errorcode.get(exc.errno or 0, exc.errno)}")
            continue
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            tried.append(f"{directory}: {errno.errorcode.get(exc.errno or 0, exc.errno)}")
            continue
        return fd
    raise SnapshotError(f"cannot create the COW file ({'; '.join(tried)})")


def create_snapshot(
    ctl: dm.DmControl,
    base_fd: int,
    *,
    base_path: str,
    parts: tuple[int | str, ...],
    direct_io: bool = False,
) -> VolatileDisk:
    """Attach the base read-only, make the COW, stack the dm-snapshot, let go of both loops (the dm
    table holds them now). `base_fd` is a regular file (claim.py checks that when it opens it);
    `parts` (domid, devid) name the loop tags and the dm device. The returned device is the only
    reference we keep: close it once the consumer holds its own, or on failure, and everything
    unwinds."""
    base = loop.attach_fd(
        base_fd,
        read_only=True,
        tag=loop.make_tag(*parts, "base"),
        autoclear=True,
        direct_io=direct_io,
        backing_path=base_path,
    )
    try:
        cow_fd = _cow_fd(base_path, base.identity.size_bytes)
        try:
            cow = loop.attach_fd(cow_fd, read_only=False, tag=loop.make_tag(*parts, "cow"), autoclear=True)
        finally:
            os.close(cow_fd)
        try:
            # Unique per attach: a detached predecessor may still be in its asynchronous removal.
            name = f"xenblockctl-{'-'.join(map(str, parts))}-{secrets.token_hex(4)}"
            volatile = dm.create_volatile(ctl, name, base, cow)
        finally:
            cow.close()
    finally:
        base.close()
    node = f"/dev/dm-{os.minor(volatile.dev)}"
    return VolatileDisk(
        BlockDevice(volatile.fd, volatile.block.identity, node), uuid=volatile.uuid, name=name
    )
