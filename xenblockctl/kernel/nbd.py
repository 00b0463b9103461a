"""Kernel NBD devices over generic netlink: what lets kernel blkback serve an NBD export.

The block script does the NBD handshake in userspace (nbd/client.py), then hands the connected
socket to the kernel with NBD_CMD_CONNECT and these client flags:
- DESTROY_ON_DISCONNECT: the device is deleted when its connection ends,
- DISCONNECT_ON_CLOSE: the connection ends at the last close of the device,
so the device goes away by itself after its last user, as a loop device with AUTOCLEAR does (the
delete-on-close rule of every target). One window stays: a device nobody has opened yet does not
clear by itself (remote-storage.md §3), so the caller opens it at once and disconnects explicitly
on every failure before that open.

The backend identifier names us (`xenblockctl:<backend path>`): the kernel shows it as
/sys/block/nbdN/backend and requires it for RECONFIGURE from another process, so nobody else can
change our device's flags, and `gc` can tell our devices from anyone's. No /dev/nbdN is scanned
and no NBD ioctl is used: with `nbds_max=0` each connect creates a new device, whose diskseq is
fresh (a pre-created /dev/nbdN keeps its load-time diskseq across connections: never trust it).

Numbers from <linux/nbd-netlink.h> and <linux/nbd.h>, checked by tests/kernel/test_genetlink.py.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import NamedTuple

from xenblockctl.kernel.errors import DeviceError
from xenblockctl.kernel.genetlink import GenlSocket, attr_str, attr_u32, attr_u64, nested, parse_attrs

FAMILY = "nbd"
VERSION = 1
CMD_CONNECT = 1
CMD_DISCONNECT = 2
CMD_RECONFIGURE = 3
CMD_STATUS = 5
ATTR_INDEX = 1
ATTR_SIZE_BYTES = 2
ATTR_BLOCK_SIZE_BYTES = 3
ATTR_TIMEOUT = 4
ATTR_SERVER_FLAGS = 5
ATTR_CLIENT_FLAGS = 6
ATTR_SOCKETS = 7
ATTR_DEAD_CONN_TIMEOUT = 8
ATTR_DEVICE_LIST = 9
ATTR_BACKEND_IDENTIFIER = 10
SOCK_ITEM = 1
SOCK_FD = 1
DEVICE_ITEM = 1
DEVICE_INDEX = 1
DEVICE_CONNECTED = 2
CFLAG_DESTROY_ON_DISCONNECT = 1 << 0
CFLAG_DISCONNECT_ON_CLOSE = 1 << 1
#: the NBD block major (include/uapi/linux/major.h NBD_MAJOR)
NBD_MAJOR = 43

DELETE_ON_CLOSE = CFLAG_DESTROY_ON_DISCONNECT | CFLAG_DISCONNECT_ON_CLOSE


class NbdDeviceError(DeviceError):
    code = "nbd-device"


def _command(what: str, cmd: int, *attrs: bytes) -> dict[int, bytes]:
    """One command to the kernel's NBD family; NbdDeviceError naming `what` if it fails."""
    try:
        genl = GenlSocket(FAMILY)
    except OSError as exc:
        raise NbdDeviceError(
            "kernel NBD is not available (is the nbd module loaded? `modprobe nbd nbds_max=0`)",
            errno=exc.errno or None,
        ) from exc
    with genl:
        try:
            return genl.command(cmd, VERSION, *attrs)
        except OSError as exc:
            raise NbdDeviceError(f"{what} failed", errno=exc.errno or None) from exc


def connect(
    sock_fd: int,
    size_bytes: int,
    server_flags: int,
    identifier: str,
    *,
    block_size: int = 512,
    timeout: int = 0,
    dead_conn_timeout: int = 0,
) -> int:
    """A new /dev/nbdN serving the NBD connection `sock_fd` (already in transmission): its index.

    Delete-on-close flags are always set; the caller must open the device at once (or
    `disconnect` it) since an unopened device does not clear by itself."""
    attrs = [
        attr_u64(ATTR_SIZE_BYTES, size_bytes),
        attr_u64(ATTR_BLOCK_SIZE_BYTES, block_size),
        attr_u64(ATTR_SERVER_FLAGS, server_flags),
        attr_u64(ATTR_CLIENT_FLAGS, DELETE_ON_CLOSE),
        nested(ATTR_SOCKETS, nested(SOCK_ITEM, attr_u32(SOCK_FD, sock_fd))),
        attr_str(ATTR_BACKEND_IDENTIFIER, identifier),
    ]
    if timeout:
        attrs.append(attr_u64(ATTR_TIMEOUT, timeout))
    if dead_conn_timeout:
        attrs.append(attr_u64(ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout))
    reply = _command("NBD_CMD_CONNECT", CMD_CONNECT, *attrs)
    index = reply.get(ATTR_INDEX)
    if index is None or len(index) != 4:
        raise NbdDeviceError("NBD_CMD_CONNECT answered without a device index")
    return int(struct.unpack("=I", index)[0])


def disconnect(index: int) -> None:
    """End /dev/nbd`index`'s connection (with DESTROY_ON_DISCONNECT the device goes too)."""
    _command(f"NBD_CMD_DISCONNECT of nbd{index}", CMD_DISCONNECT, attr_u32(ATTR_INDEX, index))


def reconfigure(index: int, client_flags: int, identifier: str) -> None:
    """Change /dev/nbd`index`'s client flags (e.g. drop DISCONNECT_ON_CLOSE once another holder has
    it open); the kernel refuses unless `identifier` is the one it was connected with."""
    _command(
        f"NBD_CMD_RECONFIGURE of nbd{index}",
        CMD_RECONFIGURE,
        attr_u32(ATTR_INDEX, index),
        attr_u64(ATTR_CLIENT_FLAGS, client_flags),
        attr_str(ATTR_BACKEND_IDENTIFIER, identifier),
    )


def connected(index: int) -> bool | None:
    """Whether /dev/nbd`index` is connected (None: no such device)."""
    try:
        reply = _command(f"NBD_CMD_STATUS of nbd{index}", CMD_STATUS, attr_u32(ATTR_INDEX, index))
    except NbdDeviceError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):  # no such device
            return None
        raise
    devices = reply.get(ATTR_DEVICE_LIST)
    if devices is None:
        return None
    for item in parse_attrs(devices).values():
        fields = parse_attrs(item)
        if struct.unpack("=I", fields[DEVICE_INDEX])[0] == index:
            return bool(fields.get(DEVICE_CONNECTED, b"\0")[0])
    return None


def backend_of(index: int, sysfs: Path = Path("/sys/block")) -> str | None:
    """The backend identifier the kernel shows for nbd`index` (None if absent)."""
    try:
        return (sysfs / f"nbd{index}" / "backend").read_text().strip()
    except OSError:
        return None


class NbdDevice(NamedTuple):
    """An NBD device as sysfs shows it: what `remove` and `gc` judge and prove before a disconnect."""

    number: int  # N of /dev/nbdN (the netlink INDEX)
    identifier: str  # its backend identifier ("" when it has none)
    major: int
    minor: int
    diskseq: int

    @property
    def path(self) -> str:
        return f"/dev/nbd{self.number}"

    @property
    def devt(self) -> int:
        return os.makedev(self.major, self.minor)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # gone meanwhile (DESTROY_ON_DISCONNECT)
        return None


def describe(index: int, sysfs: Path = Path("/sys/block")) -> NbdDevice | None:
    """nbd`index` as sysfs shows it now (None if it is gone or unreadable)."""
    base = sysfs / f"nbd{index}"
    dev, seq = _read(base / "dev"), _read(base / "diskseq")
    if dev is None or seq is None:
        return None
    try:  # the kernel's own decimal output (as loop.bound_loops reads sysfs)
        major, minor = (int(x) for x in dev.split(":", 1))
        diskseq = int(seq)
    except ValueError:
        return None
    return NbdDevice(index, backend_of(index, sysfs) or "", major, minor, diskseq)


def devices_named(prefix: str, sysfs: Path = Path("/sys/block")) -> list[NbdDevice]:
    """The NBD devices whose backend identifier starts with `prefix`. This lists what exists to find
    our own leftovers; it never picks a device to connect (connect always creates a new one)."""
    try:
        names = os.listdir(sysfs)
    except OSError:
        return []
    found: list[NbdDevice] = []
    for name in names:
        if not name.startswith("nbd"):
            continue
        try:
            number = int(name.removeprefix("nbd"))
        except ValueError:
            continue
        device = describe(number, sysfs)
        if device is not None and device.identifier.startswith(prefix):
            found.append(device)
    return sorted(found)


def disconnect_with_proof(device: NbdDevice, sysfs: Path = Path("/sys/block")) -> str:
    """Disconnect `device` only if its /dev/nbdN is still that device (same backend identifier and
    diskseq: with nbds_max=0 an index is re-used by the next connect). DESTROY_ON_DISCONNECT then
    deletes it. Returns "disconnected", "already-gone" or "changed" (refused, nothing done)."""
    now = describe(device.number, sysfs)
    if now is None:
        return "already-gone"
    if (now.identifier, now.diskseq, now.devt) != (device.identifier, device.diskseq, device.devt):
        return "changed"
    try:
        disconnect(device.number)
    except NbdDeviceError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV) or describe(device.number, sysfs) is None:
            return "already-gone"
        raise
    return "disconnected"
