"""device-mapper ioctl ABI (linux/dm-ioctl.h, interface 4.x): numbers, flags and byte codecs.

Pure data: nothing here touches the kernel, so every codec is unit-testable and checked against
the C header by tests/unit/test_dm_headers.py. See kernel-devices.md §11 for measured behaviour.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from xenblockctl.kernel.ioctls import iowr

DM_IOCTL_TYPE = 0xFD
DM_VERSION_MAJOR = 4
#: The minor we *send*: the kernel refuses a request minor above its own (EINVAL), and nothing we use
#: is gated on the requested minor, so 0 works with every 4.x kernel.
DM_REQUEST_VERSION = (DM_VERSION_MAJOR, 0, 0)

DM_DIR = "mapper"
DM_CONTROL_NODE = "control"
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16

DM_NAME_LIST_FLAG_HAS_UUID = 1
DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2

#: struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags, event_nr,
#: padding, dev, name[128], uuid[129], data[7].
DM_IOCTL = struct.Struct("=3IIIIiIIIQ128s129s7s")
DM_IOCTL_SIZE = DM_IOCTL.size  # 312
#: offsetof(struct dm_ioctl, data): the smallest data_size the kernel accepts.
DM_IOCTL_DATA_OFFSET = 305
#: Where payloads start: sizeof(struct dm_ioctl), already 8-byte aligned.
DM_DATA_START = DM_IOCTL_SIZE

#: struct dm_target_spec: sector_start, length, status, next, target_type[16].
DM_TARGET_SPEC = struct.Struct("=QQiI16s")
#: struct dm_name_list head: dev, next (name follows at offset 12).
DM_NAME_LIST = struct.Struct("=QI")
DM_NAME_LIST_NAME_OFFSET = 12
#: struct dm_target_versions head: next, version[3] (name follows at 16).
DM_TARGET_VERSIONS = struct.Struct("=I3I")
#: struct dm_target_deps head: count, padding (u64 dev[] follows at 8).
DM_TARGET_DEPS = struct.Struct("=II")
#: struct dm_target_msg head: sector (message follows at 8).
DM_TARGET_MSG = struct.Struct("=Q")

_ALIGN = 8


class Cmd(enum.IntEnum):
    """DM_*_CMD numbers; the ioctl request is `request(cmd)`."""

    VERSION = 0
    REMOVE_ALL = 1
    LIST_DEVICES = 2
    DEV_CREATE = 3
    DEV_REMOVE = 4
    DEV_RENAME = 5
    DEV_SUSPEND = 6
    DEV_STATUS = 7
    DEV_WAIT = 8
    TABLE_LOAD = 9
    TABLE_CLEAR = 10
    TABLE_DEPS = 11
    TABLE_STATUS = 12
    LIST_VERSIONS = 13
    TARGET_MSG = 14
    DEV_SET_GEOMETRY = 15
    DEV_ARM_POLL = 16
    GET_TARGET_VERSION = 17


def request(cmd: Cmd) -> int:
    """_IOWR(DM_IOCTL, cmd, struct dm_ioctl): 0xC138FD00 | cmd on x86."""
    return iowr(DM_IOCTL_TYPE, int(cmd), DM_IOCTL_SIZE)


class Flag(enum.IntFlag):
    READONLY = 1 << 0
    SUSPEND = 1 << 1
    PERSISTENT_DEV = 1 << 3
    STATUS_TABLE = 1 << 4
    ACTIVE_PRESENT = 1 << 5
    INACTIVE_PRESENT = 1 << 6
    BUFFER_FULL = 1 << 8
    SKIP_BDGET = 1 << 9
    SKIP_LOCKFS = 1 << 10
    NOFLUSH = 1 << 11
    QUERY_INACTIVE_TABLE = 1 << 12
    UEVENT_GENERATED = 1 << 13
    UUID = 1 << 14
    SECURE_DATA = 1 << 15
    DATA_OUT = 1 << 16
    DEFERRED_REMOVE = 1 << 17
    INTERNAL_SUSPEND = 1 << 18
    IMA_MEASUREMENT = 1 << 19


def align8(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def _cstr(raw: bytes) -> str:
    """A NUL-terminated C string field; dm names are bytes, surrogateescape keeps odd ones intact."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _field(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) >= size:
        raise ValueError(f"{what} too long: {len(raw)} bytes, limit {size - 1}")
    return raw


@dataclass(frozen=True)
class DmIoctl:
    """struct dm_ioctl. `dev` is a dev_t as os.makedev builds it (huge_encode_dev for major < 4096)."""

    name: str = ""
    uuid: str = ""
    flags: int = 0
    dev: int = 0
    version: tuple[int, int, int] = DM_REQUEST_VERSION
    data_size: int = DM_IOCTL_SIZE
    data_start: int = DM_DATA_START
    target_count: int = 0
    open_count: int = 0
    event_nr: int = 0

    def pack(self) -> bytes:
        return DM_IOCTL.pack(
            *self.version,
            self.data_size,
            self.data_start,
            self.target_count,
            self.open_count,
            self.flags,
            self.event_nr,
            0,
            self.dev,
            _field(self.name, DM_NAME_LEN, "dm name"),
            _field(self.uuid, DM_UUID_LEN, "dm uuid"),
            b"",
        )

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> DmIoctl:
        v0, v1, v2, size, start, count, opens, flags, event, _pad, dev, name, uuid, _data = (
            DM_IOCTL.unpack_from(raw)
        )
        return cls(
            name=_cstr(name),
            uuid=_cstr(uuid),
            flags=flags,
            dev=dev,
            version=(v0, v1, v2),
            data_size=size,
            data_start=start,
            target_count=count,
            open_count=opens,
            event_nr=event,
        )


@dataclass(frozen=True)
class Target:
    """One table line: `<start> <length> <type> <params>` in 512-byte sectors."""

    start: int
    length: int
    type: str
    params: str
    status: int = field(default=0, compare=False)

    def line(self) -> str:
        return f"{self.start} {self.length} {self.type} {self.params}"


def _target_type(name: str) -> bytes:
    raw = name.encode("ascii")
    if not raw or len(raw) >= DM_MAX_TYPE_NAME or b"\0" in raw:
        raise ValueError(f"bad dm target type {name!r}")
    return raw


def pack_table(targets: Iterable[Target]) -> tuple[bytes, int]:
    """The DM_TABLE_LOAD payload (placed at data_start) and the target count.

    On input `next` is the distance from this spec to the next one; each spec starts 8-aligned
    (6.5+ rejects misaligned specs and params overlapping the next spec)."""
    chunks: list[bytes] = []
    count = 0
    for t in targets:
        params = t.params.encode("ascii")
        if b"\0" in params:
            raise ValueError("NUL in dm target parameters")
        if t.start < 0 or t.length <= 0:
            raise ValueError(f"bad dm target extent {t.start}+{t.length}")
        body = params + b"\0"
        size = align8(DM_TARGET_SPEC.size + len(body))
        spec = DM_TARGET_SPEC.pack(t.start, t.length, 0, size, _target_type(t.type))
        chunks.append((spec + body).ljust(size, b"\0"))
        count += 1
    return b"".join(chunks), count


def parse_table(payload: bytes, count: int, *, status_output: bool) -> list[Target]:
    """Read `count` specs. `status_output`: DM_TABLE_STATUS output, whose `next` is relative to the
    first spec (the payload start); DM_TABLE_LOAD input uses offsets relative to each spec."""
    targets: list[Target] = []
    pos = 0
    for i in range(count):
        if pos + DM_TARGET_SPEC.size > len(payload):
            raise ValueError(f"dm target {i} runs past the buffer")
        start, length, status, nxt, ttype = DM_TARGET_SPEC.unpack_from(payload, pos)
        params_at = pos + DM_TARGET_SPEC.size
        end = payload.find(b"\0", params_at)
        if end < 0:
            raise ValueError(f"dm target {i}: unterminated parameters")
        params = payload[params_at:end].decode("ascii", "replace")
        targets.append(Target(start, length, _cstr(ttype), params, status))
        if i + 1 < count:
            new_pos = nxt if status_output else pos + nxt
            if new_pos <= pos:
                raise ValueError(f"dm target {i}: next offset {nxt} does not advance")
            pos = new_pos
    return targets


@dataclass(frozen=True)
class NameListEntry:
    """One DM_LIST_DEVICES record. `uuid` is None when the kernel did not say (pre-4.46 or no
    DM_UUID_FLAG), "" when the device has none."""

    name: str
    dev: int
    event_nr: int | None = None
    uuid: str | None = None


def parse_name_list(payload: bytes) -> list[NameListEntry]:
    """Parse dm_name_list records. Alignment of the optional trailer is relative to the payload
    start (the kernel aligns absolute pointers in a buffer whose payload is 8-aligned).

    Old kernels end the record right after the name; newer ones (4.46+) put event_nr, flags and
    optionally the uuid after it. The trailer exists iff it fits before the next record."""
    entries: list[NameListEntry] = []
    if len(payload) < DM_NAME_LIST.size:
        return entries
    pos = 0
    while True:
        dev, nxt = DM_NAME_LIST.unpack_from(payload, pos)
        if dev == 0:
            return entries  # the kernel writes dev = 0 to say "no devices"; no real dm dev_t is 0
        name_at = pos + DM_NAME_LIST_NAME_OFFSET
        name_end = payload.find(b"\0", name_at)
        if name_end < 0:
            raise ValueError("dm_name_list: unterminated name")
        name = payload[name_at:name_end].decode("utf-8", "surrogateescape")
        record_end = pos + nxt if nxt else len(payload)
        event_nr: int | None = None
        uuid: str | None = None
        trailer = align8(name_end + 1)
        if trailer + 8 <= record_end:
            event_nr, list_flags = struct.unpack_from("=II", payload, trailer)
            if list_flags & DM_NAME_LIST_FLAG_HAS_UUID:
                uuid_at = align8(trailer + 8)
                uuid_end = payload.find(b"\0", uuid_at)
                if uuid_end < 0:
                    raise ValueError("dm_name_list: unterminated uuid")
                uuid = payload[uuid_at:uuid_end].decode("utf-8", "surrogateescape")
            elif list_flags & DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID:
                uuid = ""
        entries.append(NameListEntry(name, dev, event_nr, uuid))
        if nxt == 0:
            return entries
        pos += nxt
        if pos + DM_NAME_LIST.size > len(payload):
            raise ValueError("dm_name_list: next points past the buffer")


@dataclass(frozen=True)
class TargetVersion:
    name: str
    version: tuple[int, int, int]


def parse_target_versions(payload: bytes) -> list[TargetVersion]:
    """DM_LIST_VERSIONS / DM_GET_TARGET_VERSION output: `next` is relative to each record."""
    out: list[TargetVersion] = []
    pos = 0
    while pos + DM_TARGET_VERSIONS.size <= len(payload):
        nxt, a, b, c = DM_TARGET_VERSIONS.unpack_from(payload, pos)
        name_at = pos + DM_TARGET_VERSIONS.size
        end = payload.find(b"\0", name_at)
        if end < 0:
            raise ValueError("dm_target_versions: unterminated name")
        out.append(TargetVersion(payload[name_at:end].decode("ascii", "replace"), (a, b, c)))
        if nxt == 0:
            break
        pos += nxt
    return out


def parse_deps(payload: bytes) -> list[int]:
    """DM_TABLE_DEPS output: the dev_t of every device the table uses."""
    count, _pad = DM_TARGET_DEPS.unpack_from(payload)
    return list(struct.unpack_from(f"={count}Q", payload, DM_TARGET_DEPS.size))


def pack_target_msg(sector: int, message: str) -> bytes:
    return DM_TARGET_MSG.pack(sector) + message.encode("ascii") + b"\0"


# --- names and uuids ------------------------------------------------------------------------------

#: Printable ASCII without space or slash. The kernel only forbids '/' and (6.5+) the names below,
#: but a name we print into xenstore, logs and hotplug-error lines must stay a single clean token.
_NAME_RE = re.compile(r"[!-.0-~]+")
_RESERVED_NAMES = frozenset({DM_CONTROL_NODE, ".", ".."})


def validate_name(name: str) -> str:
    """A dm device name we accept, or ValueError saying why not."""
    if not name:
        raise ValueError("empty dm name")
    if "/" in name:
        raise ValueError(f"dm name {name!r} contains '/'")
    if name in _RESERVED_NAMES:
        raise ValueError(f"dm name {name!r} is reserved")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"dm name {name!r} has characters other than printable ASCII")
    if len(name) >= DM_NAME_LEN:
        raise ValueError(f"dm name longer than {DM_NAME_LEN - 1} bytes")
    return name


def validate_uuid(uuid: str) -> str:
    if not uuid:
        raise ValueError("empty dm uuid")
    if not _NAME_RE.fullmatch(uuid):
        raise ValueError(f"dm uuid {uuid!r} has characters other than printable ASCII")
    if len(uuid) >= DM_UUID_LEN:
        raise ValueError(f"dm uuid longer than {DM_UUID_LEN - 1} bytes")
    return uuid


def lvm_dm_name(vg: str, lv: str) -> str:
    """The dm name LVM gives /dev/VG/LV: dashes inside each part doubled, joined by one dash."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"
