"""A minimal generic netlink client: resolve a family by name, send one command, read its answer.

Only what kernel NBD needs (kernel/nbd.py): NLM_F_REQUEST|NLM_F_ACK requests with flat or nested
attributes, the kernel's replies parsed into {type: payload}, and NLMSG_ERROR turned into OSError
with the kernel's errno. Layouts from <linux/netlink.h> and <linux/genetlink.h>; the numbers are
checked against those headers by tests/kernel/test_genetlink.py.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = ~((1 << 15) | (1 << 14)) & 0xFFFF

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
GENLMSGHDR = struct.Struct("=BBH")  # cmd, version, reserved
NLATTR = struct.Struct("=HH")  # length, type
#: the largest reply we accept: NBD's answers are a few dozen bytes
MAX_REPLY = 65536
REPLY_TIMEOUT = 5.0


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = NLATTR.pack(NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=Q", value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def nested(kind: int, *inner: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(inner))


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """{type: payload} of a run of attributes (nested ones stay raw: parse them again)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, pos)
        if length < NLATTR.size or pos + length > len(data):
            raise OSError(0, f"malformed netlink attribute at {pos}")
        out[kind & NLA_TYPE_MASK] = data[pos + NLATTR.size : pos + length]
        pos += _align(length)
    return out


class GenlSocket:
    """One generic netlink socket bound to one family."""

    def __init__(self, family: str) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        self._sock.settimeout(REPLY_TIMEOUT)
        self._seq = 0
        try:
            self._sock.bind((0, 0))
            reply = self._request(
                GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, attr_str(CTRL_ATTR_FAMILY_NAME, family)
            )
            family_id = reply.get(CTRL_ATTR_FAMILY_ID)
            if family_id is None or len(family_id) != 2:
                raise OSError(0, f"generic netlink family {family!r}: no id in the reply")
            self.family_id: int = struct.unpack("=H", family_id)[0]
        except BaseException:
            self._sock.close()
            raise

    def command(self, cmd: int, version: int, *attrs: bytes) -> dict[int, bytes]:
        """Send `cmd` to the family; the attributes of the kernel's reply ({} if only an ack)."""
        return self._request(self.family_id, cmd, version, b"".join(attrs))

    def _request(self, family_id: int, cmd: int, version: int, payload: bytes) -> dict[int, bytes]:
        self._seq += 1
        body = GENLMSGHDR.pack(cmd, version, 0) + payload
        self._sock.send(
            NLMSGHDR.pack(NLMSGHDR.size + len(body), family_id, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0)
            + body
        )
        answer: dict[int, bytes] = {}
        while True:
            data = self._sock.recv(MAX_REPLY)
            pos = 0
            while pos + NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
                if length < NLMSGHDR.size or pos + length > len(data):
                    raise OSError(0, "malformed netlink message")
                chunk = data[pos + NLMSGHDR.size : pos + length]
                pos += _align(length)
                if seq != self._seq:
                    continue  # an answer to an earlier request we gave up on
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", chunk)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return answer  # the ack: the request is complete
                if kind == NLMSG_DONE:
                    return answer
                answer.update(parse_attrs(chunk[GENLMSGHDR.size :]))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
