"""The xenstore wire format: `xsd_sockmsg` framing, message type numbers and error names.

Facts from Xen 4.17 `xen/include/public/io/xs_wire.h`: a 16-byte header of four native-endian u32
(type, req_id, tx_id, len) followed by `len` payload bytes, at most XENSTORE_PAYLOAD_MAX. Errors are
replies of type ERROR whose payload is the errno *name* and a NUL.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum
from typing import NamedTuple

#: Native byte order as on x86; every client (libxenstore, pyxs) packs the header this way.
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size
PAYLOAD_MAX = 4096
#: Path limits (xs_wire.h): relative paths / the part below /local/domain/<id>; absolute paths.
REL_PATH_MAX = 2048
ABS_PATH_MAX = 3072


class Op(IntEnum):
    """`enum xsd_sockmsg_type` of Xen 4.17 (20, XS_RESTRICT, was removed and stays invalid)."""

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


def op_name(value: int) -> str:
    """The C daemon's name for a type number (used in traces)."""
    try:
        return Op(value).name
    except ValueError:
        return "**UNKNOWN**"


#: `xsd_errors[]` in its canonical order; the first entry (EINVAL) is the fallback for any errno
#: that has no wire name, as `send_error()` does.
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
_NAME_BY_ERRNO: dict[int, str] = {getattr(errno, name): name for name in ERROR_NAMES}


def error_name(err: int) -> str:
    """The wire name for an errno value; unknown values map to EINVAL like the C daemon."""
    return _NAME_BY_ERRNO.get(err, "EINVAL")


class XsError(Exception):
    """A request failed: the reply is an ERROR message carrying this errno's name."""

    def __init__(self, err: int) -> None:
        super().__init__(error_name(err))
        self.errno = err


class Frame(NamedTuple):
    """One message in either direction."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes


def encode(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    return HEADER.pack(msg_type, req_id, tx_id, len(payload)) + payload


def error_payload(err: int) -> bytes:
    return error_name(err).encode() + b"\0"


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
        """Bytes received and not yet returned as a frame (non-zero when a client left
        mid-message)."""
        return len(self._buf) - self._start

    def push(self, data: bytes) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        buf, start = self._buf, self._start
        if len(buf) - start < HEADER_SIZE:
            return None
        msg_type, req_id, tx_id, length = HEADER.unpack_from(buf, start)
        if length > PAYLOAD_MAX:
            # Like the C daemon: an oversize length kills the connection, we never try to
            # resynchronise on a stream whose framing we no longer know.
            raise OversizeFrame(length)
        end = start + HEADER_SIZE + length
        if end > len(buf):
            return None
        frame = Frame(msg_type, req_id, tx_id, bytes(buf[start + HEADER_SIZE : end]))
        if end == len(buf):
            buf.clear()
            self._start = 0
        else:
            self._start = end
        return frame

    def feed(self, data: bytes) -> list[Frame]:
        self.push(data)
        frames: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def has_frame(self) -> bool:
        """Whether a complete frame (or an oversize header) is waiting."""
        if self.pending < HEADER_SIZE:
            return False
        length: int = HEADER.unpack_from(self._buf, self._start)[3]
        return length > PAYLOAD_MAX or self.pending >= HEADER_SIZE + length


def count_strings(payload: bytes) -> int:
    """Number of NULs, i.e. of NUL-terminated strings (`xs_count_strings`)."""
    return payload.count(b"\0")


def get_strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings at the start of the payload; trailing bytes without a NUL are
    ignored (`get_strings` in the C daemon)."""
    parts = payload.split(b"\0")
    return parts[:-1]


def onearg(payload: bytes) -> bytes | None:
    """The single argument of a one-string request, or None unless the payload is exactly one
    NUL-terminated string (`onearg`)."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return payload[:-1]


def c_atoi(text: bytes) -> int:
    """C `atoi`: optional blanks, optional sign, leading digits; anything else yields 0.

    The daemon parses domids this way, so `GET_DOMAIN_PATH abc` answers /local/domain/0; the
    result is wrapped to u32 as the C code stores it in an unsigned int.
    """
    s = text.lstrip(b" \t\n\v\f\r")
    sign = 1
    if s[:1] in (b"+", b"-"):
        sign = -1 if s[:1] == b"-" else 1
        s = s[1:]
    digits = 0
    value = 0
    for ch in s:
        if not 48 <= ch <= 57:
            break
        value = value * 10 + (ch - 48)
        digits += 1
    if not digits:
        return 0
    return (sign * value) & 0xFFFFFFFF
