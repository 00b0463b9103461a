"""The identity a backend directory publishes for its device, and whether the kernel still agrees.

One module owns the spelling of every node that says *which device* a vbd is, so the writer
(`add`), the withdrawers (`remove`, a failed add), the consumer (the engine) and every reader
(sharing, inventory, gc, the udev hook, detach) agree on one grammar:

    physical-device       hex MAJOR:MINOR, lowercase, no leading zeros (blkback's `%x:%x`; what
                          the stock script's `stat -c %t:%T` prints)
    physical-device-luid  the kernel diskseq, lowercase hex, no leading zeros, never 0 (the name
                          proposed in the blkback review; only we write it)
    diskseq               the same number under the name the xen-blkback diskseq patch reads (it
                          accepts [1-9a-fA-F][0-9a-fA-F]{0,15}, skips its check when the node is
                          absent and fails the device on a mismatch); Qubes' C block script writes
                          it too, and only it
    physical-device-path  the device node we opened, for people (never used to identify)
    xenblockctl-owner     our private ownership record (OwnerRecord below)

`add` writes all five in one transaction and every withdrawal removes all five in one
transaction (PUBLISHED), so no reader ever sees one identity node without the others.

An NBD export the engine serves itself (no kernel device at all) is published differently:
`xenblockctl-owner` alone, holding an NbdOwnerRecord (kind=nbd: canonical URI, size, transmission
flags, the unix socket's dev/inode). No physical-device, luid, diskseq or physical-device-path:
there is no device number to name, kernel blkback must never act on it, and libxl's local attach
(pygrub) has no path to open. The engine takes the record as its cue and re-checks its own
handshake against it before `opened`=1 (backend/xenbus.py).

Strictness. What we write is the strict form; what we read back is checked against it:
  * `physical-device-luid` is ours: anything but the strict form is refused (uppercase, leading
    zeros, non-ASCII, longer than 16 digits). Nobody else writes it, so a variant means a writer we
    do not know, and such a device cannot be proven to be the one named.
  * `diskseq` is read with the patch's own grammar (uppercase accepted), so that every device the
    patched kernel blkback would serve, our engine serves too and our readers recognise, including
    those published by a script that writes only `diskseq` (Qubes').
  * when both are present they must name the same number; any disagreement is refused (the
    engine fails the device), as the patch fails a device whose diskseq differs from the disk.
  * when neither is present (the stock script), the identity is *unverified*: the engine refuses
    it unless configured not to (`require_luid`), readers say so instead of guessing.

This module is on the hotplug import path and imports nothing of the kernel layer: liveness is
judged from what the kernel layer observed (`DeviceNow`, which kernel.blockdev.BlockIdentity
satisfies), passed in by the caller."""

from __future__ import annotations

import posix

from xenblockctl.enums import Enum
from xenblockctl.errors import XenblockError
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore.numbers import is_hex
from xenblockctl.xenstore.vbd import BackendRecordError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Protocol, Self, TypeAlias

    from xenblockctl.xenstore.backends import BackendEntry
    from xenblockctl.xenstore.client import XenStore

PHYSICAL_DEVICE = "physical-device"
LUID = "physical-device-luid"
DISKSEQ = "diskseq"
DEVICE_PATH = "physical-device-path"
OWNER = "xenblockctl-owner"
#: The nodes that identify the device, read together (one transaction) by every verifier.
IDENTITY_NODES = (PHYSICAL_DEVICE, LUID, DISKSEQ)
#: Everything `add` publishes and every withdrawal removes, always in one transaction.
PUBLISHED = (LUID, DISKSEQ, PHYSICAL_DEVICE, DEVICE_PATH, OWNER)


class IdentityError(BackendRecordError):
    """A published identity node is malformed, or two of them disagree."""


def format_physical_device(major: int, minor: int) -> str:
    """What blkback parses and the stock script writes: lowercase hex, no leading zeros."""
    return f"{major:x}:{minor:x}"


def backends_publishing(store: XenStore, home: str, devt: int, *, skip: str = "") -> list[BackendEntry]:
    """The backends of `home` but `skip` whose physical-device names `devt`, in walk order (every
    backend's physical-device is read, streamed with the listings: backends.read_in_backends; the
    sharing check of a block-device add, and the udev hook's block events). A value names it
    exactly when it is format_physical_device's text for it: parse_physical_device is that
    function's strict inverse (lowercase, no leading zeros, so one spelling per number; anything
    else is malformed and names no device), so comparing the text decides what parsing every
    value would, without a record per backend that publishes something else
    (tests/unit/test_sharing_match.py)."""
    from xenblockctl.xenstore.backends import read_in_backends  # the walk: block devices only

    wanted = format_physical_device(posix.major(devt), posix.minor(devt))
    found = read_in_backends(store, home, PHYSICAL_DEVICE, skip=skip)
    return [entry for entry, text in found if text == wanted]


def parse_physical_device(text: str) -> tuple[int, int]:
    """Strict inverse of format_physical_device (ASCII, lowercase, no leading zeros, 32 bits each)."""
    major, colon, minor = text.partition(":")
    if not (colon and is_hex(major, most=8) and is_hex(minor, most=8)):
        raise IdentityError(f"physical-device {text[:40]!r} is not hex MAJOR:MINOR")
    return int(major, 16), int(minor, 16)


def format_diskseq(diskseq: int) -> str:
    """The value of both `physical-device-luid` and `diskseq`: lowercase hex, no leading zeros."""
    if not 0 < diskseq < 1 << 64:
        raise IdentityError(f"diskseq {diskseq} outside 1..2^64-1")
    return f"{diskseq:x}"


def parse_luid(text: str) -> int:
    """`physical-device-luid`, strictly as we write it."""
    if not is_hex(text, most=16, zero=False):
        raise IdentityError(f"physical-device-luid {text[:40]!r} is not a lowercase hex diskseq")
    return int(text, 16)


def parse_diskseq_node(text: str) -> int:
    """`diskseq`, with the patch's grammar (case-insensitive hex, no leading zero, at most 16)."""
    # the xen-blkback diskseq patch's grammar for the `diskseq` node
    if not is_hex(text, most=16, zero=False, lowercase=False):
        raise IdentityError(f"diskseq {text[:40]!r} is not a hex diskseq")
    return int(text, 16)


class Liveness(Enum):
    """Whether the device a backend published is still the one at its major:minor.

    The verdict compares diskseqs first: the kernel gives every media instance a new diskseq (each
    loop bind and unbind, each media change), so equal numbers prove it is the device we published
    — even when it is empty (a zero-length image file makes a bound loop device of size 0; it is
    still that guest's disk). Only a *different* diskseq on a device of size 0 is EMPTY: the number
    now names an unbound loop device or a drive without media, i.e. the published device is gone and
    nothing replaced it with data (usually a loop device that auto-cleared when its holder let go).
    That is told apart from REPLACED (another device with content), which an admin must treat as
    the wrong-disk race."""

    LIVE = "live"  # the device at major:minor has the published diskseq
    GONE = "gone"  # no block device at major:minor any more
    EMPTY = "empty"  # another, empty device is there now (see above)
    REPLACED = "replaced"  # another device with content is there now
    UNVERIFIED = "unverified"  # no diskseq published (stock script), or the kernel could not be asked

    @property
    def holds(self) -> bool:
        """Whether the published device may still be in use: only what is proven gone is not."""
        return self in (Liveness.LIVE, Liveness.UNVERIFIED)


if TYPE_CHECKING:  # a type only (annotations here are never evaluated)

    class DeviceNow(Protocol):
        """What the kernel layer observed at a major:minor (kernel.blockdev.BlockIdentity is one)."""

        @property
        def diskseq(self) -> int: ...

        @property
        def size_bytes(self) -> int: ...

    #: kernel.blockdev.observe: the device now at a devt, None if there is none (raises when it
    #: cannot look).
    Observer = Callable[[int], DeviceNow | None]


def judge(published: int | None, now: DeviceNow | None) -> Liveness:
    """The one verdict: `published` diskseq (None: none was published) against what is there now."""
    if now is None:
        return Liveness.GONE
    if published is None:
        return Liveness.UNVERIFIED
    if now.diskseq == published:
        return Liveness.LIVE
    return Liveness.EMPTY if now.size_bytes == 0 else Liveness.REPLACED


class PublishedIdentity(NamedTuple):
    """physical-device and the diskseq published with it (None: unverifiable, stock script)."""

    major: int
    minor: int
    diskseq: int | None

    @property
    def devt(self) -> int:
        return posix.makedev(self.major, self.minor)

    @property
    def physical_device(self) -> str:
        return format_physical_device(self.major, self.minor)

    def nodes(self) -> dict[str, str]:
        """The identity nodes `add` writes (in the same transaction as the owner record)."""
        if self.diskseq is None:
            raise IdentityError("an identity without a diskseq is never published by us")
        seq = format_diskseq(self.diskseq)
        return {PHYSICAL_DEVICE: self.physical_device, LUID: seq, DISKSEQ: seq}

    @classmethod
    def from_nodes(cls, nodes: Mapping[str, str | None]) -> PublishedIdentity | None:
        """The identity in `nodes` (node name -> value, absent = missing or None); None when no
        physical-device is published. IdentityError when a node is malformed or luid and diskseq
        disagree (see the module docstring for the grammar of each)."""
        physical = nodes.get(PHYSICAL_DEVICE)
        if physical is None:
            return None
        major, minor = parse_physical_device(physical)
        luid_text, seq_text = nodes.get(LUID), nodes.get(DISKSEQ)
        luid = None if luid_text is None else parse_luid(luid_text)
        seq = None if seq_text is None else parse_diskseq_node(seq_text)
        if luid is not None and seq is not None and luid != seq:
            raise IdentityError(
                f"physical-device-luid {luid_text} and diskseq {seq_text} disagree: refusing to guess which"
                " device was meant"
            )
        return cls(major, minor, luid if luid is not None else seq)

    @classmethod
    def named(cls, nodes: Mapping[str, str | None]) -> PublishedIdentity | None:
        """Only the device physical-device names (diskseq None: unverified), for readers that must
        still count a backend whose diskseq nodes are malformed or disagree (a claim, a device gc
        must not touch); None when physical-device is absent or malformed."""
        physical = nodes.get(PHYSICAL_DEVICE)
        try:
            return None if physical is None else cls(*parse_physical_device(physical), None)
        except IdentityError:
            return None

    @classmethod
    def claimed(cls, nodes: Mapping[str, str | None]) -> PublishedIdentity | None:
        """What a backend's published nodes claim, for readers that must never under-count a user
        (sharing, gc, remove's pass by tag): from_nodes; where a luid or diskseq is malformed or
        they disagree, they cannot prove the claim stale, so it counts for whatever
        physical-device names (named: diskseq None). None when physical-device is absent or
        malformed (it names no device)."""
        try:
            return cls.from_nodes(nodes)
        except IdentityError:
            return cls.named(nodes)

    def liveness(self, observe: Observer) -> Liveness:
        return liveness_of(self.devt, self.diskseq, observe)


def liveness_of(devt: int, diskseq: int | None, observe: Observer) -> Liveness:
    """judge() on what `observe` (kernel.blockdev.observe) sees at `devt`; UNVERIFIED when the
    kernel cannot be asked (no permission to make a device node, an unexpected ioctl error)."""
    try:
        now = observe(devt)
    except XenblockError:
        return Liveness.UNVERIFIED
    return judge(diskseq, now)


# --- the owner record -----------------------------------------------------------------------------

OWNER_VERSION = "v1"
#: A loop tag's characters (1..63 of them): `[A-Za-z0-9:._-]`.
_TAG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:._-")
#: kernel.loop.TAG_PREFIX and kernel.dm.OWNED_UUID_PREFIX, repeated: this layer cannot import the
#: kernel's (and parsing a record on the hotplug path must not load dm). tests/unit pins them equal.
LOOP_TAG_PREFIX = "xenblockctl:"
DM_UUID_PREFIX = "XENBLOCKCTL-"
#: printable ASCII without space: the NBD record's uri, and (less `/`) the dm uuid
_PRINTABLE_NO_SPACE = frozenset(chr(c) for c in range(ord("!"), ord("~") + 1))
#: After the prefix, 1..116 of `[!-.0-~]`: printable ASCII without space and `/`.
_DM_UUID_CHARS = _PRINTABLE_NO_SPACE - {"/"}
OWNER_KINDS = ("loop", "device", "dm")
#: The kind of an NbdOwnerRecord: an export the engine serves, no kernel device.
NBD_KIND = "nbd"
#: What an NBD record's uri may be (nbd/uri.py's canonical() spelling is printable ASCII without
#: spaces; this layer cannot import that parser, the engine re-parses it).
_NBD_URI_SCHEMES = ("nbd://", "nbd+unix://")
_NBD_URI_MAX = 16384


def _is_nbd_uri(uri: str) -> bool:
    """`nbd://` or `nbd+unix://` and 1..16384 printable ASCII characters without spaces after it."""
    for scheme in _NBD_URI_SCHEMES:
        if uri.startswith(scheme):
            rest = uri[len(scheme) :]
            return 0 < len(rest) <= _NBD_URI_MAX and _PRINTABLE_NO_SPACE.issuperset(rest)
    return False


class OwnerRecordError(XenblockError):
    code = "owner-record-invalid"


def _hex(text: str) -> int:
    if not is_hex(text, most=16):
        raise ValueError(text)
    return int(text, 16)


class OwnerRecord(NamedTuple):
    """Our private ownership record, node `xenblockctl-owner`: what `add` created, so that `remove`
    needs nothing else and never touches a device it cannot prove is ours. Format (space-separated
    key=value, version first; numbers lowercase hex without leading zeros like the public nodes):

        v1 kind=loop dev=7:3 seq=1db mode=w autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712
        v1 kind=dm dev=fe:2 seq=1dd mode=w autoclear=1 backing=fe00:20c0f6 uuid=XENBLOCKCTL-812-4711-...

    `kind` is `loop` (we created the loop device), `device` (an existing block device we only
    opened: remove never detaches it) or `dm` (a dm device we created, e.g. a `snapshot:` disk, with
    deferred remove armed: `autoclear=1` means its last close removes it; `uuid` proves it is ours
    and `backing` names the read-only base image). Parsing is strict: anything unexpected means we
    cannot prove ownership, so readers touch nothing (the safe reading of a newer version too)."""

    kind: str  # "loop" | "device" | "dm"
    major: int
    minor: int
    diskseq: int
    mode: str  # "r" | "w"
    autoclear: bool = False
    backing: tuple[int, int] | None = None  # (st_dev, st_ino) of a loop's backing file
    tag: str | None = None
    uuid: str | None = None  # kind=dm: the device's dm uuid (ours: XENBLOCKCTL- prefix)

    @property
    def devt(self) -> int:
        return posix.makedev(self.major, self.minor)

    @property
    def identity(self) -> PublishedIdentity:
        return PublishedIdentity(self.major, self.minor, self.diskseq)

    def with_autoclear(self, on: bool) -> Self:
        return self._replace(autoclear=on)

    def format(self) -> str:
        parts = [
            OWNER_VERSION,
            f"kind={self.kind}",
            f"dev={self.major:x}:{self.minor:x}",
            f"seq={self.diskseq:x}",
            f"mode={self.mode}",
            f"autoclear={int(self.autoclear)}",
        ]
        if self.backing is not None:
            parts.append(f"backing={self.backing[0]:x}:{self.backing[1]:x}")
        if self.tag is not None:
            parts.append(f"tag={self.tag}")
        if self.uuid is not None:
            parts.append(f"uuid={self.uuid}")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> Self:
        fields = _fields(text)
        if fields.get("kind") == NBD_KIND:
            raise OwnerRecordError("a kind=nbd record names no device (read it with parse_owner)")
        try:
            kind = fields["kind"]
            major, minor = (_hex(x) for x in fields["dev"].split(":", 1))
            diskseq = _hex(fields["seq"])
            mode = fields["mode"]
            autoclear = {"0": False, "1": True}[fields["autoclear"]]
        except (KeyError, ValueError) as exc:
            raise OwnerRecordError(f"malformed owner record {text[:80]!r}") from exc
        if kind not in OWNER_KINDS or mode not in ("r", "w") or diskseq == 0:
            raise OwnerRecordError(f"malformed owner record {text[:80]!r}")
        backing = None
        if "backing" in fields:
            try:
                dev, ino = (_hex(x) for x in fields["backing"].split(":", 1))
            except ValueError as exc:
                raise OwnerRecordError(f"malformed backing in {text[:80]!r}") from exc
            backing = (dev, ino)
        tag = fields.get("tag")
        if tag is not None and (
            not 0 < len(tag) <= 63 or not _TAG_CHARS.issuperset(tag) or not tag.startswith(LOOP_TAG_PREFIX)
        ):
            raise OwnerRecordError(f"malformed tag in {text[:80]!r}")
        if kind == "loop" and (tag is None or backing is None):
            raise OwnerRecordError("a loop owner record needs tag and backing")
        uuid = fields.get("uuid")
        if (kind == "dm") != (uuid is not None):
            raise OwnerRecordError(f"uuid belongs to kind=dm records only, and they need one: {text[:80]!r}")
        if uuid is not None and not (
            uuid.startswith(DM_UUID_PREFIX)
            and 0 < len(uuid) - len(DM_UUID_PREFIX) <= 116
            and _DM_UUID_CHARS.issuperset(uuid[len(DM_UUID_PREFIX) :])
        ):
            raise OwnerRecordError(f"malformed dm uuid in {text[:80]!r}")
        if kind == "dm" and tag is not None:
            raise OwnerRecordError(f"a dm owner record has no loop tag: {text[:80]!r}")
        return cls(kind, major, minor, diskseq, mode, autoclear, backing, tag, uuid)


def _fields(text: str) -> dict[str, str]:
    words = text.split(" ")
    if not words or words[0] != OWNER_VERSION:
        raise OwnerRecordError(f"unknown owner record version in {text[:60]!r}")
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key in fields:
            raise OwnerRecordError(f"malformed owner record {text[:80]!r}")
        fields[key] = value
    return fields


class NbdOwnerRecord(NamedTuple):
    """The owner record of an NBD export the engine serves itself (kind=nbd). It names no kernel
    device: there is no diskseq on the wire, so the export is identified by what a handshake shows
    and the socket's file (remote-storage.md §5), and the engine refuses to serve anything else:

        v1 kind=nbd mode=w size=1000000 flags=d6d socket=fe00:20c0f6:187e0c1a2b3c4d5e uri=nbd+unix:///disk?socket=/run/x.sock

    `size` (bytes) and `flags` (the transmission flags of NBD_INFO_EXPORT) in lowercase hex;
    `socket` the (st_dev, st_ino, st_ctime_ns) of a unix socket's file (the inode number alone is
    re-used at once for a socket re-created at the same path), absent for TCP; `uri` the canonical
    URI (nbd/uri.py), last. Nothing kernel-side exists, so `remove` and `gc` have nothing to free."""

    uri: str
    size: int
    flags: int
    mode: str  # "r" | "w"
    socket: tuple[int, int, int] | None = None

    @property
    def kind(self) -> str:
        return NBD_KIND

    def format(self) -> str:
        parts = [
            OWNER_VERSION,
            f"kind={NBD_KIND}",
            f"mode={self.mode}",
            f"size={self.size:x}",
            f"flags={self.flags:x}",
        ]
        if self.socket is not None:
            parts.append("socket=" + ":".join(f"{n:x}" for n in self.socket))
        parts.append(f"uri={self.uri}")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> Self:
        fields = _fields(text)
        if fields.get("kind") != NBD_KIND:
            raise OwnerRecordError(f"not a kind=nbd owner record: {text[:80]!r}")
        if set(fields) - {"kind", "mode", "size", "flags", "socket", "uri"}:
            raise OwnerRecordError(f"unknown field in {text[:80]!r}")
        try:
            mode, uri = fields["mode"], fields["uri"]
            size, flags = _hex(fields["size"]), _hex(fields["flags"])
            sock = None
            if "socket" in fields:
                dev, ino, ctime = (_hex(x) for x in fields["socket"].split(":"))
                sock = (dev, ino, ctime)
        except (KeyError, ValueError) as exc:
            raise OwnerRecordError(f"malformed owner record {text[:80]!r}") from exc
        if mode not in ("r", "w") or size == 0 or flags >= 1 << 16 or not _is_nbd_uri(uri):
            raise OwnerRecordError(f"malformed owner record {text[:80]!r}")
        if (sock is not None) != uri.startswith("nbd+unix://"):
            raise OwnerRecordError(
                f"socket= belongs to nbd+unix:// records only, and they need one: {text[:80]!r}"
            )
        return cls(uri, size, flags, mode, sock)


#: Any owner record: a kernel device we published (OwnerRecord) or an NBD export (NbdOwnerRecord).
AnyOwnerRecord: TypeAlias = OwnerRecord | NbdOwnerRecord


def parse_owner(text: str) -> AnyOwnerRecord:
    """The record in `text`, of whichever kind; OwnerRecordError when it proves nothing."""
    if _fields(text).get("kind") == NBD_KIND:
        return NbdOwnerRecord.parse(text)
    return OwnerRecord.parse(text)
