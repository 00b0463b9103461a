"""device-mapper through /dev/mapper/control: identity-safe opens and delete-on-close devices.

Two jobs (kernel-devices.md §11):

* Open an admin's named dm device (`/dev/mapper/NAME`, `/dev/VG/LV`, `uuid:...`) without being
  fooled by a rename or a remove+recreate between "look the name up" and "open it": we open the
  dev_t we resolved, then ask the kernel *by the dev_t of the opened fd* whether that device still
  carries the name and uuid we resolved. The fd pins the device, so a positive answer stays true.
* Create our own devices (uuid prefix `XENBLOCKCTL-`) that vanish when the last holder closes them
  (DM_DEFERRED_REMOVE). Unlike loop's AUTOCLEAR that is not atomic: a process killed between
  DM_DEV_CREATE and arming leaks the device, so `sweep_owned` removes ours that nobody holds and
  whose creator is dead.

The ioctl function is injectable so the logic runs in unit tests against replayed kernel buffers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

from xenblockctl.kernel import sysfs
from xenblockctl.kernel.blockdev import BlockDevice, identify, open_devt
from xenblockctl.kernel.dm_abi import (
    DM_DATA_START,
    DM_VERSION_MAJOR,
    Cmd,
    DmIoctl,
    Flag,
    NameListEntry,
    Target,
    TargetVersion,
    lvm_dm_name,
    pack_table,
    pack_target_msg,
    parse_deps,
    parse_name_list,
    parse_table,
    parse_target_versions,
    request,
    validate_name,
    validate_uuid,
)
from xenblockctl.kernel.errors import DeviceError, IdentityMismatch
from xenblockctl.kernel.fdhandle import FdHandle

CONTROL_PATH = "/dev/mapper/control"
MISC_SYSFS = "/sys/class/misc/device-mapper/dev"
#: Every dm device we create has a uuid starting with this; sweeps never touch any other.
OWNED_UUID_PREFIX = "XENBLOCKCTL-"
#: Initial output buffer for commands that return data; grown on DM_BUFFER_FULL up to the cap.
_INITIAL_BUFFER = 16 * 1024
_MAX_BUFFER = 16 * 1024 * 1024

#: (fd, request, mutable buffer) -> ioctl return value; raises OSError like fcntl.ioctl.
IoctlFn = Callable[[int, int, bytearray], int]


def _kernel_ioctl(fd: int, req: int, buf: bytearray) -> int:
    result: int = fcntl.ioctl(fd, req, buf, True)
    return result


class DmError(DeviceError):
    code = "dm-error"


class DmUnavailable(DmError):
    """No device-mapper in this kernel (or no way to reach its control node)."""

    code = "dm-unavailable"


class DmNotFound(DmError):
    code = "dm-missing"


class DmBusy(DmError):
    code = "dm-busy"


class DmIdentityError(IdentityMismatch):
    """The device we opened is not (any more) the one the name or uuid pointed at."""

    code = "dm-identity"


@dataclass(frozen=True)
class DeviceStatus:
    """What DM_DEV_STATUS (and most other commands) report about one device."""

    name: str
    uuid: str
    dev: int
    open_count: int
    flags: int
    event_nr: int
    target_count: int

    @classmethod
    def from_header(cls, hdr: DmIoctl) -> DeviceStatus:
        return cls(hdr.name, hdr.uuid, hdr.dev, hdr.open_count, hdr.flags, hdr.event_nr, hdr.target_count)

    @property
    def major(self) -> int:
        return os.major(self.dev)

    @property
    def minor(self) -> int:
        return os.minor(self.dev)

    @property
    def active(self) -> bool:
        return bool(self.flags & Flag.ACTIVE_PRESENT)

    @property
    def suspended(self) -> bool:
        return bool(self.flags & Flag.SUSPEND)

    @property
    def deferred_remove(self) -> bool:
        return bool(self.flags & Flag.DEFERRED_REMOVE)


def _selector(name: str | None, uuid: str | None, dev: int | None) -> DmIoctl:
    # The kernel looks a device up by uuid, else name, else dev, and newer kernels refuse a request
    # naming more than one: exactly one selector keeps us unambiguous everywhere.
    given = [x for x in (name, uuid, dev) if x is not None]
    if len(given) != 1:
        raise ValueError("select a dm device by exactly one of name, uuid, dev")
    if name is not None:
        return DmIoctl(name=validate_name(name))
    if uuid is not None:
        return DmIoctl(uuid=validate_uuid(uuid))
    assert dev is not None
    if dev == 0:
        raise ValueError("dev 0 selects no device")
    return DmIoctl(dev=dev)


def _describe(name: str | None, uuid: str | None, dev: int | None) -> str:
    if name is not None:
        return f"dm device {name!r}"
    if uuid is not None:
        return f"dm device uuid {uuid!r}"
    return f"dm device {os.major(dev or 0)}:{os.minor(dev or 0)}"


class DmControl(FdHandle):
    """An open /dev/mapper/control plus the negotiated interface version."""

    def __init__(self, fd: int, *, ioctl: IoctlFn = _kernel_ioctl) -> None:
        self.fd = fd
        self._ioctl = ioctl
        self.kernel_version = self.version()

    @classmethod
    def open(cls, path: str = CONTROL_PATH, *, ioctl: IoctlFn = _kernel_ioctl) -> DmControl:
        fd = _open_control(path)
        try:
            return cls(fd, ioctl=ioctl)
        except BaseException:
            os.close(fd)
            raise

    # --- the one ioctl path ------------------------------------------------------------------

    def call(
        self, cmd: Cmd, hdr: DmIoctl, payload: bytes = b"", *, out: bool = False, what: str = ""
    ) -> tuple[DmIoctl, bytes]:
        """Issue one dm command; return the kernel's header and its output payload.

        `out`: the command returns data, so start with a roomy buffer and grow it while the
        kernel answers DM_BUFFER_FULL (the list of devices can grow between two calls)."""
        size = DM_DATA_START + len(payload)
        if out:
            size = max(size, _INITIAL_BUFFER)
        while True:
            buf = bytearray(size)
            sent = DmIoctl(
                name=hdr.name,
                uuid=hdr.uuid,
                flags=hdr.flags,
                dev=hdr.dev,
                event_nr=hdr.event_nr,
                target_count=hdr.target_count,
                data_size=size,
                data_start=DM_DATA_START,
            )
            buf[: DM_DATA_START + len(payload)] = sent.pack() + payload
            try:
                self._ioctl(self.fd, request(cmd), buf)
            except OSError as exc:
                raise _error(cmd, exc, what) from exc
            got = DmIoctl.unpack(buf)
            if got.flags & Flag.BUFFER_FULL:
                if size >= _MAX_BUFFER:
                    raise DmError(f"DM_{cmd.name}: output exceeds {_MAX_BUFFER} bytes")
                size *= 4
                continue
            data = b""
            if out and DM_DATA_START <= got.data_start < got.data_size <= size:
                data = bytes(buf[got.data_start : got.data_size])
            return got, data

    # --- commands ----------------------------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """DM_VERSION: the kernel writes its interface version back. We speak major 4 only."""
        got, _ = self.call(Cmd.VERSION, DmIoctl(), what="interface version")
        if got.version[0] != DM_VERSION_MAJOR:
            raise DmUnavailable(f"device-mapper interface {got.version[0]}.x, we speak {DM_VERSION_MAJOR}.x")
        return got.version

    def list_devices(self) -> list[NameListEntry]:
        """All dm devices. DM_UUID_FLAG asks 4.46+ kernels to include uuids; older ones ignore it
        and the entries carry uuid None."""
        _, data = self.call(Cmd.LIST_DEVICES, DmIoctl(flags=Flag.UUID), out=True, what="device list")
        return parse_name_list(data)

    def target_versions(self) -> list[TargetVersion]:
        _, data = self.call(Cmd.LIST_VERSIONS, DmIoctl(), out=True, what="target list")
        return parse_target_versions(data)

    def status(
        self, *, name: str | None = None, uuid: str | None = None, dev: int | None = None
    ) -> DeviceStatus:
        got, _ = self.call(Cmd.DEV_STATUS, _selector(name, uuid, dev), what=_describe(name, uuid, dev))
        return DeviceStatus.from_header(got)

    def table(
        self,
        *,
        name: str | None = None,
        uuid: str | None = None,
        dev: int | None = None,
        table: bool = True,
        inactive: bool = False,
    ) -> list[Target]:
        """DM_TABLE_STATUS: the table lines (`table`) or the targets' status lines."""
        sel = _selector(name, uuid, dev)
        flags = (Flag.STATUS_TABLE if table else 0) | (Flag.QUERY_INACTIVE_TABLE if inactive else 0)
        sel = DmIoctl(name=sel.name, uuid=sel.uuid, dev=sel.dev, flags=flags)
        got, data = self.call(Cmd.TABLE_STATUS, sel, out=True, what=_describe(name, uuid, dev))
        return parse_table(data, got.target_count, status_output=True)

    def deps(self, *, name: str | None = None, uuid: str | None = None, dev: int | None = None) -> list[int]:
        _, data = self.call(
            Cmd.TABLE_DEPS, _selector(name, uuid, dev), out=True, what=_describe(name, uuid, dev)
        )
        return parse_deps(data) if data else []

    def create(self, name: str, uuid: str | None = None, *, dev: int | None = None) -> DeviceStatus:
        """DM_DEV_CREATE. An existing name or uuid is EBUSY. No gendisk exists until a table load."""
        hdr = DmIoctl(
            name=validate_name(name),
            uuid=validate_uuid(uuid) if uuid is not None else "",
            dev=dev or 0,
            flags=Flag.PERSISTENT_DEV if dev else 0,
        )
        got, _ = self.call(Cmd.DEV_CREATE, hdr, what=f"create dm device {name!r}")
        return DeviceStatus.from_header(got)

    def load(
        self,
        targets: Iterable[Target],
        *,
        name: str | None = None,
        uuid: str | None = None,
        dev: int | None = None,
        read_only: bool = False,
    ) -> DeviceStatus:
        """DM_TABLE_LOAD into the inactive slot; `resume` makes it live."""
        payload, count = pack_table(targets)
        if count == 0:
            raise ValueError("a dm table needs at least one target")
        sel = _selector(name, uuid, dev)
        hdr = DmIoctl(
            name=sel.name,
            uuid=sel.uuid,
            dev=sel.dev,
            target_count=count,
            flags=Flag.READONLY if read_only else 0,
        )
        got, _ = self.call(Cmd.TABLE_LOAD, hdr, payload, what=f"load table into {_describe(name, uuid, dev)}")
        return DeviceStatus.from_header(got)

    def resume(
        self, *, name: str | None = None, uuid: str | None = None, dev: int | None = None
    ) -> DeviceStatus:
        """DM_DEV_SUSPEND without DM_SUSPEND_FLAG: swap in the inactive table and resume I/O."""
        got, _ = self.call(
            Cmd.DEV_SUSPEND, _selector(name, uuid, dev), what=f"resume {_describe(name, uuid, dev)}"
        )
        return DeviceStatus.from_header(got)

    def suspend(
        self, *, name: str | None = None, uuid: str | None = None, dev: int | None = None
    ) -> DeviceStatus:
        sel = _selector(name, uuid, dev)
        hdr = DmIoctl(name=sel.name, uuid=sel.uuid, dev=sel.dev, flags=Flag.SUSPEND)
        got, _ = self.call(Cmd.DEV_SUSPEND, hdr, what=f"suspend {_describe(name, uuid, dev)}")
        return DeviceStatus.from_header(got)

    def remove(
        self,
        *,
        name: str | None = None,
        uuid: str | None = None,
        dev: int | None = None,
        deferred: bool = False,
    ) -> DeviceStatus:
        """DM_DEV_REMOVE. Without `deferred` an open device is EBUSY (so a racing opener wins);
        with it an open device is marked and removed by its last close, an unopened one at once."""
        sel = _selector(name, uuid, dev)
        hdr = DmIoctl(
            name=sel.name, uuid=sel.uuid, dev=sel.dev, flags=Flag.DEFERRED_REMOVE if deferred else 0
        )
        got, _ = self.call(Cmd.DEV_REMOVE, hdr, what=f"remove {_describe(name, uuid, dev)}")
        return DeviceStatus.from_header(got)

    def rename(self, name: str, new_name: str) -> DeviceStatus:
        """DM_DEV_RENAME: the kernel finds the device by its current name; the new one is the payload."""
        payload = validate_name(new_name).encode("ascii") + b"\0"
        got, _ = self.call(
            Cmd.DEV_RENAME, DmIoctl(name=validate_name(name)), payload, what=f"rename dm device {name!r}"
        )
        return DeviceStatus.from_header(got)

    def message(
        self,
        message: str,
        *,
        sector: int = 0,
        name: str | None = None,
        uuid: str | None = None,
        dev: int | None = None,
    ) -> None:
        self.call(
            Cmd.TARGET_MSG,
            _selector(name, uuid, dev),
            pack_target_msg(sector, message),
            what=f"message to {_describe(name, uuid, dev)}",
        )

    def cancel_deferred_remove(
        self, *, name: str | None = None, uuid: str | None = None, dev: int | None = None
    ) -> None:
        """Undo an armed deferred remove: the device then survives its last close."""
        self.message("@cancel_deferred_remove", name=name, uuid=uuid, dev=dev)


def _error(cmd: Cmd, exc: OSError, what: str) -> DmError:
    subject = what or f"DM_{cmd.name}"
    if exc.errno == errno.ENXIO:
        return DmNotFound(f"{subject}: no such dm device", errno=exc.errno)
    if exc.errno == errno.EBUSY:
        # DEV_CREATE says EBUSY for an existing name/uuid; REMOVE and TABLE_LOAD for a held device.
        return DmBusy(f"{subject}: busy (exists or in use)", errno=exc.errno)
    if exc.errno == errno.ENOTTY:
        return DmUnavailable(f"{subject}: not a device-mapper control node", errno=exc.errno)
    return DmError(f"{subject}: DM_{cmd.name} failed", errno=exc.errno)


def _open_control(path: str) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass  # no devtmpfs node (container, static /dev): try a private node below
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise DmUnavailable("kernel has no device-mapper (dm_mod not loaded)", errno=exc.errno) from exc
        raise DmError(f"cannot open {path}", errno=exc.errno) from exc
    try:
        with open(MISC_SYSFS) as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
    except (OSError, ValueError) as exc:
        raise DmUnavailable("kernel has no device-mapper (dm_mod not loaded)", errno=errno.ENOENT) from exc
    with tempfile.TemporaryDirectory(prefix="xenblockctl-dm-") as tmp:
        node = os.path.join(tmp, "control")
        try:
            os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(major, minor))
            return os.open(node, flags)
        except OSError as exc:
            raise DmUnavailable("cannot reach /dev/mapper/control", errno=exc.errno) from exc


# --- identity-safe opens --------------------------------------------------------------------------


class DmDevice:
    """An open dm device whose name and uuid were confirmed through the fd we hold.

    For devices we created, closing the last fd removes the device (deferred remove)."""

    def __init__(self, block: BlockDevice, status: DeviceStatus) -> None:
        self.block = block
        self.status = status

    @property
    def fd(self) -> int:
        return self.block.fd

    @property
    def name(self) -> str:
        return self.status.name

    @property
    def uuid(self) -> str:
        return self.status.uuid

    @property
    def dev(self) -> int:
        return self.status.dev

    @property
    def diskseq(self) -> int:
        return self.block.identity.diskseq

    def close(self) -> None:
        self.block.close()

    def __enter__(self) -> DmDevice:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DmDevice {self.name!r} {self.status.major}:{self.status.minor} diskseq={self.diskseq}>"


def open_confirmed(ctl: DmControl, expected: DeviceStatus, *, writable: bool) -> DmDevice:
    """Open `expected.dev` and prove the opened device still is `expected` (name and uuid).

    The proof asks DM_DEV_STATUS by the st_rdev of the opened fd, not by the number we meant to
    open: a rename or a remove+recreate in between shows up as a different name or uuid (or no dm
    device at all) and we refuse. The diskseq comes from the same fd."""
    # dm names its disks dm-<minor>; open_devt uses that node only if it is a block node for exactly
    # this dev_t, else a private one. (Resolving /sys/dev/block/M:m instead cost 10 ms under TCG.)
    node = f"/dev/dm-{os.minor(expected.dev)}"
    try:
        block = open_devt(expected.dev, writable=writable, node=node)
    except DeviceError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT, errno.ENODEV):
            raise DmNotFound(
                f"dm device {expected.name!r} vanished before it could be opened", errno=exc.errno
            ) from exc
        raise
    try:
        rdev = os.fstat(block.fd).st_rdev
        try:
            now = ctl.status(dev=rdev)
        except DmNotFound as exc:
            raise DmIdentityError(
                f"{os.major(rdev)}:{os.minor(rdev)} is no dm device any more (wanted {expected.name!r})"
            ) from exc
        if now.name != expected.name or now.uuid != expected.uuid:
            raise DmIdentityError(
                f"dm device changed while opening: wanted {expected.name!r} uuid {expected.uuid!r}, "
                f"{os.major(rdev)}:{os.minor(rdev)} is {now.name!r} uuid {now.uuid!r}"
            )
        return DmDevice(block, now)
    except BaseException:
        block.close()
        raise


def open_named(ctl: DmControl, name: str, *, uuid: str | None = None, writable: bool) -> DmDevice:
    """Open the dm device called `name` (and, if given, carrying `uuid`)."""
    resolved = ctl.status(name=name)
    if uuid is not None and resolved.uuid != uuid:
        raise DmIdentityError(f"dm device {name!r} has uuid {resolved.uuid!r}, not {uuid!r}")
    return open_confirmed(ctl, resolved, writable=writable)


def open_uuid(ctl: DmControl, uuid: str, *, writable: bool) -> DmDevice:
    """Open the dm device with this uuid (the `uuid:` target form)."""
    return open_confirmed(ctl, ctl.status(uuid=uuid), writable=writable)


def name_for_path(path: str) -> str | None:
    """The dm name an admin path means: /dev/mapper/NAME, or LVM's /dev/VG/LV (VG-LV with dashes
    doubled) when that path is a block device (so /dev/shm/disk.img stays a file). None otherwise.
    The path is never opened: the name is then checked against the opened device by open_named."""
    parts = os.path.normpath(path).split("/")
    if len(parts) != 4 or parts[:2] != ["", "dev"] or not parts[3]:
        return None
    if parts[2] == "mapper":
        return parts[3]
    try:
        if not stat.S_ISBLK(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    return lvm_dm_name(parts[2], parts[3])


def dm_holders(major: int, minor: int) -> list[str]:
    """Names of the dm devices whose tables use this device (from /sys/.../holders). A device
    listed here is claimed exclusively by dm: handing it to a guest writable would bypass the
    mapping (and a snapshot's origin must never change underneath it)."""
    names: list[str] = []
    for holder in sysfs.holders(major, minor):
        try:
            with open(f"/sys/block/{holder}/dm/name") as f:
                names.append(f.read().strip())
        except OSError:
            continue  # not dm (md, bcache) or gone meanwhile
    return names


# --- devices we create ----------------------------------------------------------------------------


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # Field 22 (starttime); the command name in parentheses may contain spaces, so split after ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def make_owned_uuid(tag: str = "") -> str:
    """XENBLOCKCTL-<pid>-<starttime>-<random>[-tag]: the creator's pid and start time let a sweep
    leave alone a device whose creator is still alive (possibly inside its create->arm window)."""
    pid = os.getpid()
    parts = [OWNED_UUID_PREFIX.rstrip("-"), str(pid), _proc_start_time(pid) or "0", secrets.token_hex(8)]
    if tag:
        parts.append(tag)
    return validate_uuid("-".join(parts))


def creator_alive(uuid: str) -> bool:
    """Is the process that made this XENBLOCKCTL- uuid (pid + start time) still running?"""
    parts = uuid[len(OWNED_UUID_PREFIX) :].split("-")
    try:
        pid = int(parts[0])
    except (ValueError, IndexError):
        return False
    start = _proc_start_time(pid)
    return start is not None and len(parts) > 1 and start == parts[1]


def create_owned(
    ctl: DmControl,
    name: str,
    targets: Iterable[Target],
    *,
    read_only: bool = False,
    tag: str = "",
) -> DmDevice:
    """Create a dm device that removes itself when its last holder closes it.

    Order: create (our uuid) -> load -> open the dev and confirm identity -> arm deferred remove ->
    resume -> re-read the identity (size is 0 until the table is live). The caller holds the
    returned fd until the consumer has opened the device; closing it early removes the device."""
    targets = list(targets)
    uuid = make_owned_uuid(tag)
    created = ctl.create(name, uuid)
    opened: DmDevice | None = None
    armed = False
    try:
        ctl.load(targets, uuid=uuid, read_only=read_only)
        expected = DeviceStatus(name, uuid, created.dev, 0, 0, 0, 0)  # only name, uuid, dev are compared
        opened = open_confirmed(ctl, expected, writable=not read_only)
        if not ctl.remove(uuid=uuid, deferred=True).deferred_remove:
            raise DmError(f"dm device {name!r}: kernel did not arm deferred remove")
        armed = True
        status = ctl.resume(uuid=uuid)
        identity = identify(opened.fd)
        if identity.diskseq != opened.diskseq:
            raise DmIdentityError(f"dm device {name!r}: diskseq changed on resume")
        return DmDevice(BlockDevice(opened.block.fd, identity, opened.block.path), status)
    except BaseException:
        if opened is not None:
            opened.close()  # armed: this close removes the device
        if not armed:
            with contextlib.suppress(DmError):
                ctl.remove(uuid=uuid)
        raise


def sweep_owned(
    ctl: DmControl,
    *,
    prefix: str = OWNED_UUID_PREFIX,
    creator_alive: Callable[[str], bool] = creator_alive,
) -> list[str]:
    """Remove our devices that nobody holds and whose creator died (leaked inside the create->arm
    window). Returns the removed names. The remove itself is non-deferred, so a device somebody
    opens between our status read and the remove survives (EBUSY)."""
    removed: list[str] = []
    for entry in ctl.list_devices():
        uuid = entry.uuid
        try:
            if uuid is None:
                uuid = ctl.status(name=entry.name).uuid
            if not uuid.startswith(prefix) or creator_alive(uuid):
                continue
            st = ctl.status(uuid=uuid)
            if st.open_count > 0 or st.deferred_remove:
                continue
            ctl.remove(uuid=uuid)
        except (DmNotFound, DmBusy):
            continue
        removed.append(entry.name)
    return removed


def snapshot_targets(origin: int, cow: int, sectors: int, *, chunk_sectors: int = 8) -> list[Target]:
    """A non-persistent dm-snapshot of `origin` whose writes land in `cow` (both dev_t)."""
    if chunk_sectors <= 0 or chunk_sectors & (chunk_sectors - 1):
        raise ValueError("snapshot chunk size must be a power of two (sectors)")
    o = f"{os.major(origin)}:{os.minor(origin)}"
    c = f"{os.major(cow)}:{os.minor(cow)}"
    return [Target(0, sectors, "snapshot", f"{o} {c} N {chunk_sectors}")]


def create_volatile(
    ctl: DmControl, name: str, origin: BlockDevice, cow: BlockDevice, *, chunk_sectors: int = 8
) -> DmDevice:
    """A writable throwaway view of a read-only base: writes go to the COW device and vanish with
    the dm device on its last close. The base must be read-only: a write to the origin behind the
    snapshot's back would silently corrupt what the guest sees. The transient ('N') exception store
    keeps its table in kernel memory and uses the COW only for data, so a (sparse) COW as large as
    the base can never overflow; a smaller one invalidates the snapshot (I/O errors) when full."""
    if not origin.identity.read_only:
        raise DmError("the base of a volatile disk must be read-only")
    if cow.identity.read_only:
        raise DmError("the COW device of a volatile disk must be writable")
    if origin.identity.sectors == 0:
        raise DmError("the base of a volatile disk is empty")
    targets = snapshot_targets(
        origin.identity.devt, cow.identity.devt, origin.identity.sectors, chunk_sectors=chunk_sectors
    )
    return create_owned(ctl, name, targets, tag="snap")
