"""The daemon's side of the wire: the shared codec (`xenblockctl.xenstore.wire`: framing, limits,
type numbers, error names) plus what only a server needs: the type numbers as an enum, errno ->
error reply, and the C daemon's argument parsing (`get_strings`, `onearg`, `atoi`).
"""

from __future__ import annotations

import errno
from enum import IntEnum

from xenblockctl.xenstore import wire
from xenblockctl.xenstore.wire import (
    ABS_PATH_MAX,
    ERROR_NAMES,
    HEADER,
    HEADER_SIZE,
    PAYLOAD_MAX,
    REL_PATH_MAX,
    Frame,
    FrameDecoder,
    OversizeFrame,
    encode,
    op_name,
)

__all__ = [
    "ABS_PATH_MAX",
    "ERROR_NAMES",
    "HEADER",
    "HEADER_SIZE",
    "PAYLOAD_MAX",
    "REL_PATH_MAX",
    "Frame",
    "FrameDecoder",
    "Op",
    "OversizeFrame",
    "XsError",
    "c_atoi",
    "count_strings",
    "encode",
    "error_name",
    "error_payload",
    "get_strings",
    "onearg",
    "op_name",
]


class Op(IntEnum):
    """The type numbers of the shared codec (`xenblockctl.xenstore.wire`) as an enum, for the
    daemon's dispatch table and traces."""

    CONTROL = wire.CONTROL
    DIRECTORY = wire.DIRECTORY
    READ = wire.READ
    GET_PERMS = wire.GET_PERMS
    WATCH = wire.WATCH
    UNWATCH = wire.UNWATCH
    TRANSACTION_START = wire.TRANSACTION_START
    TRANSACTION_END = wire.TRANSACTION_END
    INTRODUCE = wire.INTRODUCE
    RELEASE = wire.RELEASE
    GET_DOMAIN_PATH = wire.GET_DOMAIN_PATH
    WRITE = wire.WRITE
    MKDIR = wire.MKDIR
    RM = wire.RM
    SET_PERMS = wire.SET_PERMS
    WATCH_EVENT = wire.WATCH_EVENT
    ERROR = wire.ERROR
    IS_DOMAIN_INTRODUCED = wire.IS_DOMAIN_INTRODUCED
    RESUME = wire.RESUME
    SET_TARGET = wire.SET_TARGET
    RESET_WATCHES = wire.RESET_WATCHES
    DIRECTORY_PART = wire.DIRECTORY_PART


_NAME_BY_ERRNO: dict[int, str] = {getattr(errno, name): name for name in ERROR_NAMES}


def error_name(err: int) -> str:
    """The wire name for an errno value; unknown values map to EINVAL like the C daemon."""
    return _NAME_BY_ERRNO.get(err, "EINVAL")


class XsError(Exception):
    """A request failed: the reply is an ERROR message carrying this errno's name."""

    def __init__(self, err: int) -> None:
        super().__init__(error_name(err))
        self.errno = err


def error_payload(err: int) -> bytes:
    return error_name(err).encode() + b"\0"


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
