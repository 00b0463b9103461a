"""The xenstore layout of a vbd: backend and frontend paths, XenbusState (walking every backend:
xenstore/backends.py).

libxl hands the block script only `XENBUS_PATH=backend/<type>/<domid>/<devid>`, relative to the
backend domain's home (reference xen-block-protocol.md §1.3); everything else is read from the
backend directory (§1.2, §2.2). Parsing that path strictly is the script's first line of defence:
a path with `..`, a foreign type or a non-canonical number is refused before we touch anything.
"""

from __future__ import annotations

from xenblockctl.enums import IntEnum
from xenblockctl.errors import XenblockError
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore.numbers import is_decimal, uint_or_none

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Protocol

    from xenblockctl.xenstore.vdev import Vdev

#: Backend kinds that run a block script (libxl_linux.c libxl__get_hotplug_script_info).
BACKEND_KINDS = ("vbd", "vbd3")
#: domid_t values from DOMID_FIRST_RESERVED (0x7FF0) up are DOMID_SELF, DOMID_IO, ...: never a guest.
DOMID_FIRST_RESERVED = 0x7FF0
#: Device numbers from here up are reserved (xen-vbd-interface(7)): vdev.RESERVED, spelled here so
#: that every add and remove does not import the vdev name codec (~0.1 ms) for one bound check;
#: tests/xenstore/test_vbd_vdev.py pins the two equal.
DEVID_END = 2 << 28

_KIND_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _fields(text: str, shape: tuple[str | None, ...]) -> list[str] | None:
    """The `/`-separated fields of `text` where `shape` has None, if the literal fields equal the
    shape's and the others are canonical decimals (`0|[1-9][0-9]*`), except that a "kind" field is
    `[a-z0-9]+`. Plain string checks, not `re`: the block script's start-up path parses one path."""
    parts = text.split("/")
    if len(parts) != len(shape):
        return None
    out = []
    for part, want in zip(parts, shape, strict=True):
        if want == "kind":
            if not part or not _KIND_CHARS.issuperset(part):
                return None
            out.append(part)
        elif want is None:
            if not is_decimal(part):
                return None
            out.append(part)
        elif part != want:
            return None
    return out


# backend/<kind>/<domid>/<devid>, /local/domain/<backend domid>/backend/<kind>/<domid>/<devid>,
# /local/domain/<domid>/device/<kind>/<devid>
_RELATIVE = ("backend", "kind", None, None)
_ABSOLUTE = ("", "local", "domain", None, "backend", "kind", None, None)
_FRONTEND = ("", "local", "domain", None, "device", "kind", None)


class VbdPathError(XenblockError):
    """A XENBUS_PATH or frontend path that is not the layout libxl writes."""

    code = "xenbus-path-invalid"


class BackendRecordError(XenblockError):
    """A backend node holds a value that is not in its documented format."""

    code = "backend-record-invalid"


class XenbusState(IntEnum):
    """`state` node values (xen/include/public/io/xenbus.h enum xenbus_state)."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8

    @classmethod
    def parse(cls, text: str) -> XenbusState:
        value = uint_or_none(text, maximum=max(cls._value2member_map_))
        if value is None:
            raise BackendRecordError(f"state {text[:20]!r} is not a XenbusState (0-8)")
        return cls(value)

    @classmethod
    def of(cls, text: str | None) -> XenbusState | None:
        """The state a `state` node holds; None when it is absent or not a state."""
        value = None if text is None else uint_or_none(text, maximum=max(cls._value2member_map_))
        return None if value is None else cls(value)

    @property
    def closing(self) -> bool:
        """Closing or Closed: a backend in either is being torn down; nothing is published to it."""
        return self in (XenbusState.Closing, XenbusState.Closed)

    def __str__(self) -> str:
        return str(self.value)


def _domid(text: str, what: str) -> int:
    value = int(text)
    if value >= DOMID_FIRST_RESERVED:
        raise VbdPathError(f"{what} {value} is a reserved domid (>= {DOMID_FIRST_RESERVED:#x})")
    return value


def _devid(text: str) -> int:
    value = int(text)
    if not 0 < value < DEVID_END:
        raise VbdPathError(f"devid {value} outside 1..{DEVID_END - 1}")
    return value


class _BackendPathFields(NamedTuple):
    kind: str
    domid: int
    devid: int
    backend_domid: int | None = None


class BackendPath(_BackendPathFields):
    """`backend/<kind>/<domid>/<devid>` of a vbd; `backend_domid` is known only when parsed from
    the absolute form (or given), since libxl's XENBUS_PATH is relative to the backend's home.

    Records here are NamedTuples, not dataclasses: the module is on the hotplug import path."""

    __slots__ = ()

    def __new__(cls, kind: str, domid: int, devid: int, backend_domid: int | None = None) -> BackendPath:
        if kind not in BACKEND_KINDS:
            raise VbdPathError(f"backend kind {kind!r} is not one of {', '.join(BACKEND_KINDS)}")
        for what, value in (("frontend domid", domid), ("backend domid", backend_domid)):
            if value is not None and not 0 <= value < DOMID_FIRST_RESERVED:
                raise VbdPathError(f"{what} {value} outside 0..{DOMID_FIRST_RESERVED - 1}")
        if not 0 < devid < DEVID_END:
            raise VbdPathError(f"devid {devid} outside 1..{DEVID_END - 1}")
        return super().__new__(cls, kind, domid, devid, backend_domid)

    @classmethod
    def parse(cls, text: str) -> BackendPath:
        """Relative (`backend/vbd/5/51712`, what libxl exports) or absolute
        (`/local/domain/0/backend/vbd/5/51712`). Numbers must be canonical decimals."""
        if not isinstance(text, str):
            raise VbdPathError(f"backend path must be str, not {type(text).__name__}")
        fields = _fields(text, _RELATIVE)
        if fields is not None:
            kind, domid, devid = fields
            return cls(_kind(kind), _domid(domid, "frontend domid"), _devid(devid))
        fields = _fields(text, _ABSOLUTE)
        if fields is not None:
            bedom, kind, domid, devid = fields
            return cls(
                _kind(kind), _domid(domid, "frontend domid"), _devid(devid), _domid(bedom, "backend domid")
            )
        raise VbdPathError(f"{text[:120]!r} is not backend/<vbd|vbd3>/<domid>/<devid>")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BackendPath:
        """From libxl's hotplug environment: XENBUS_PATH, cross-checked with XENBUS_TYPE."""
        raw = env.get("XENBUS_PATH")
        if not raw:
            raise VbdPathError("XENBUS_PATH is not set (not run by libxl?)")
        path = cls.parse(raw)
        declared = env.get("XENBUS_TYPE")
        if declared and declared != path.kind:
            raise VbdPathError(f"XENBUS_TYPE={declared} disagrees with XENBUS_PATH={raw}")
        return path

    @property
    def relative(self) -> str:
        return f"backend/{self.kind}/{self.domid}/{self.devid}"

    def absolute(self, backend_domid: int | None = None) -> str:
        bedom = self.backend_domid if backend_domid is None else backend_domid
        if bedom is None:
            raise VbdPathError(f"{self.relative}: backend domid unknown; pass it or use XenStore.absolute()")
        return f"/local/domain/{bedom}/{self.relative}"

    def with_backend(self, backend_domid: int) -> BackendPath:
        return BackendPath(self.kind, self.domid, self.devid, backend_domid)

    @property
    def vdev(self) -> Vdev | None:
        """The device the devid encodes, or None for a number outside xen-vbd-interface(7)."""
        from xenblockctl.xenstore.vdev import Vdev, VdevError  # not on the hotplug path

        try:
            return Vdev.from_number(self.devid)
        except VdevError:
            return None

    def default_frontend(self) -> FrontendPath:
        """Where libxl puts the frontend (kind `vbd` for both vbd and vbd3 backends). The
        backend's `frontend` node is authoritative; this is for cross-checking it."""
        return FrontendPath(self.domid, self.devid)

    @property
    def libxl_path(self) -> str:
        """libxl's private copy of the backend keys (`/libxl/<domid>/device/vbd/<devid>`)."""
        return f"/libxl/{self.domid}/device/vbd/{self.devid}"

    def __str__(self) -> str:
        return self.relative if self.backend_domid is None else self.absolute()


def _kind(kind: str) -> str:
    if kind not in BACKEND_KINDS:
        raise VbdPathError(f"backend kind {kind!r} is not one of {', '.join(BACKEND_KINDS)}")
    return kind


class FrontendPath(NamedTuple):
    """`/local/domain/<domid>/device/vbd/<devid>`."""

    domid: int
    devid: int
    kind: str = "vbd"

    @classmethod
    def parse(cls, text: str) -> FrontendPath:
        fields = _fields(text, _FRONTEND) if isinstance(text, str) else None
        if fields is None:
            raise VbdPathError(f"{str(text)[:120]!r} is not /local/domain/<domid>/device/vbd/<devid>")
        domid, kind, devid = fields
        if kind != "vbd":
            raise VbdPathError(f"frontend kind {kind!r} is not vbd")
        return cls(_domid(domid, "frontend domid"), _devid(devid))

    @property
    def path(self) -> str:
        return f"/local/domain/{self.domid}/device/{self.kind}/{self.devid}"

    def __str__(self) -> str:
        return self.path


#: The bundled engine's count of error responses per cause for this vbd, in its backend directory
#: (written at a bounded rate; `xenblockctl show` prints it). Value: `cause=N` for each cause in
#: ERROR_CAUSES order, space separated.
ERROR_RESPONSES_NODE = "xenblockctl-error-responses"
#: grant-map: a page the request names could not be mapped; io: the device returned an error;
#: invalid: the request was malformed (refused before any I/O); unsupported: an operation we do
#: not offer (answered EOPNOTSUPP)
ERROR_CAUSES = ("grant-map", "io", "invalid", "unsupported")


def format_error_responses(counts: Mapping[str, int]) -> str:
    return " ".join(f"{cause}={counts.get(cause, 0)}" for cause in ERROR_CAUSES)


def parse_error_responses(text: str | None) -> dict[str, int] | None:
    """The node's counts, or None if absent or not what the engine writes."""
    if text is None:
        return None
    counts: dict[str, int] = {}
    for item in text.split(" "):
        cause, _, number_text = item.partition("=")
        number = uint_or_none(number_text, maximum=(1 << 64) - 1)
        if cause not in ERROR_CAUSES or cause in counts or number is None:
            return None
        counts[cause] = number
    return counts if len(counts) == len(ERROR_CAUSES) else None


if TYPE_CHECKING:  # types only (annotations here are never evaluated)

    class _Store(Protocol):
        def absolute(self, path: str) -> str: ...


def backend_dir(store: _Store, path: BackendPath) -> str:
    """The absolute directory: from the path itself when it knows its backend domain, else
    against the store's home (our own domain: the script runs in the backend domain)."""
    return path.absolute() if path.backend_domid is not None else store.absolute(path.relative)
