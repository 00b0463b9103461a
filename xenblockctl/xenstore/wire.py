"""The xenstore wire codec, the one copy: `xsd_sockmsg` framing, limits, type numbers, error names.

Shared by the client (`client`, `transport`, `synchronous`), the embedded daemon (`server/`), the
tests' raw client (`tests/support/xsraw.py`) and the benchmarks, so that the limits and numbers are
written down once. Facts from Xen 4.17 `xen/include/public/io/xs_wire.h`: a 16-byte header of four
native-endian u32 (type, req_id, tx_id, len) followed by `len` payload bytes, at most
XENSTORE_PAYLOAD_MAX. Errors are replies of type ERROR whose payload is the errno *name* and a NUL.

It is on the block script's start-up path, so it imports only `struct` and builds no classes
beyond two plain ones: the type numbers are module constants (an IntEnum costs ~0.3 ms to build;
the daemon, which wants names in its traces, builds its own `Op` from these).
"""

from __future__ import annotations

import _struct as struct  # what struct.py re-exports, without its file: tests/lint/test_hotplug_imports.py

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Iterable

#: xs_wire.h struct xsd_sockmsg in native byte order ("=": no padding), as libxenstore and pyxs
#: pack it; every Xen platform with a socket daemon is little-endian, so this is also "<IIII".
HEADER = struct.Struct("=IIII")
HEADER_SIZE = HEADER.size
#: XENSTORE_PAYLOAD_MAX: a request or reply body larger than this kills the connection.
PAYLOAD_MAX = 4096
#: XENSTORE_REL_PATH_MAX (relative paths, and the part below /local/domain/<id>) and
#: XENSTORE_ABS_PATH_MAX.
REL_PATH_MAX = 2048
ABS_PATH_MAX = 3072

# `enum xsd_sockmsg_type` of Xen 4.17 (20, XS_RESTRICT, was removed and stays invalid).
CONTROL = 0
DIRECTORY = 1
READ = 2
GET_PERMS = 3
WATCH = 4
UNWATCH = 5
TRANSACTION_START = 6
TRANSACTION_END = 7
INTRODUCE = 8
RELEASE = 9
GET_DOMAIN_PATH = 10
WRITE = 11
MKDIR = 12
RM = 13
SET_PERMS = 14
WATCH_EVENT = 15
ERROR = 16
IS_DOMAIN_INTRODUCED = 17
RESUME = 18
SET_TARGET = 19
RESET_WATCHES = 21
DIRECTORY_PART = 22

#: Type number -> the C daemon's name for it (the names above, as in its traces).
OP_NAMES: dict[int, str] = {
    value: name
    for name, value in globals().items()
    if name.isupper()
    and isinstance(value, int)
    and name not in ("HEADER_SIZE", "PAYLOAD_MAX")
    and not name.endswith("_PATH_MAX")
}

#: `xsd_errors[]` in its canonical order; the first entry (EINVAL) is the fallback for any errno
#: that has no wire name, as the C daemon's `send_error()` does.
ERROR_NAMES: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

NUL = b"\0"


def op_name(value: int) -> str:
    """The C daemon's name for a type number (used in traces)."""
    return OP_NAMES.get(value, "**UNKNOWN**")


def encode(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One whole message: header and payload in one buffer, so it goes out in one send()."""
    return HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload


def encode_many(requests: Iterable[tuple[int, int, int, bytes]]) -> bytes:
    """Several whole messages `(type, req_id, tx_id, payload)` in one buffer, for one send()."""
    pack = HEADER.pack
    return b"".join(
        [pack(op, req_id, tx_id, len(payload)) + payload for op, req_id, tx_id, payload in requests]
    )


def error_reply_name(payload: bytes) -> str:
    """The errno name an ERROR reply carries (`ENOENT\\0` -> "ENOENT")."""
    return payload.rstrip(NUL).decode("ascii", "replace")


class Frame:
    """One message in either direction (a plain slotted class: no NamedTuple build at import)."""

    __slots__ = ("payload", "req_id", "tx_id", "type")

    def __init__(self, type: int, req_id: int, tx_id: int, payload: bytes) -> None:
        self.type = type
        self.req_id = req_id
        self.tx_id = tx_id
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.type, self.req_id, self.tx_id, self.payload) == (
            other.type,
            other.req_id,
            other.tx_id,
            other.payload,
        )

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self):  # type: ignore[no-untyped-def]
        # Unpacks like the tuple it used to be: `op, req_id, tx_id, payload = frame`.
        return iter((self.type, self.req_id, self.tx_id, self.payload))

    def __repr__(self) -> str:
        return f"Frame({op_name(self.type)}, req {self.req_id}, tx {self.tx_id}, {self.payload[:60]!r})"


class OversizeFrame(Exception):
    """A header announced more than PAYLOAD_MAX bytes: the stream cannot be trusted any more."""

    def __init__(self, length: int) -> None:
        super().__init__(f"payload length {length} exceeds {PAYLOAD_MAX}")
        self.length = length


class FrameDecoder:
    """Incremental decoder: feed it whatever recv() returned, get back the complete frames.

    A peer may split a message anywhere (even inside the header) or send several in one segment,
    so bytes are buffered until a whole frame is present. `push` + `next_frame` hand out one
    frame at a time, so that a server can stop handling a client's requests (and stop reading
    its socket) while the rest of what it sent waits here.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned as a frame (non-zero when a peer left
        mid-message)."""
        return len(self._buf) - self._start

    def push(self, data: bytes) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    def _decode(self, data: bytes, most: int) -> list[Frame]:
        """Up to `most` (-1: every) complete frames from `data` (the buffer, or a bytes copy of
        it) at the read position, in order, and the position moved past them; their payloads
        are slices of `data` (bytearrays from the buffer itself). OversizeFrame leaves the
        stream unread from that header on.

        One loop over the headers, not a function call and a (frame, end) tuple per frame: every
        reply of a batch, and of the 128-backend walk (~260), comes through here (work18,
        bench/README.md issue 18: 0.45 -> 0.29 us a frame in one process)."""
        frames: list[Frame] = []
        start = self._start
        size = len(data)
        unpack = HEADER.unpack_from
        try:
            while size - start >= HEADER_SIZE and len(frames) != most:
                msg_type, req_id, tx_id, length = unpack(data, start)
                if length > PAYLOAD_MAX:
                    # Like the C daemon: an oversize length kills the connection, we never try to
                    # resynchronise on a stream whose framing we no longer know.
                    raise OversizeFrame(length)
                end = start + HEADER_SIZE + length
                if end > size:
                    break
                frames.append(Frame(msg_type, req_id, tx_id, data[start + HEADER_SIZE : end]))
                start = end
        finally:
            self._consumed(start)
        return frames

    def _consumed(self, end: int) -> None:
        """The bytes before `end` are handed out."""
        if end == len(self._buf):
            self._buf.clear()
            self._start = 0
        else:
            self._start = end

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        # The buffer itself, not a copy of all of it (a server takes one frame at a time): its
        # payload slice is a bytearray, made bytes below.
        got = self._decode(self._buf, 1)  # type: ignore[arg-type]
        if not got:
            return None
        frame = got[0]
        frame.payload = bytes(frame.payload)
        return frame

    def frames(self) -> list[Frame]:
        """Every complete frame buffered, in order, in one pass: a batch's replies arrive many per
        recv (the synchronous client reads them that way, bench/README.md issue 18 round 5).
        OversizeFrame leaves the stream unread from that header on."""
        # The payloads sliced from one bytes copy of the buffer (a bytearray slice is a copy, and
        # bytes() of it another): a 128-backend walk decodes ~260 replies in a few reads
        # (bench/README.md, issue 18 round 8).
        if len(self._buf) - self._start < HEADER_SIZE:
            return []
        return self._decode(bytes(self._buf), -1)

    def feed(self, data: bytes) -> list[Frame]:
        self.push(data)
        return self.frames()

    def has_frame(self) -> bool:
        """Whether a complete frame (or an oversize header) is waiting."""
        if self.pending < HEADER_SIZE:
            return False
        length: int = HEADER.unpack_from(self._buf, self._start)[3]
        return length > PAYLOAD_MAX or self.pending >= HEADER_SIZE + length
