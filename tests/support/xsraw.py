"""A raw xenstore wire client for tests: sends exactly the bytes a test asks for.

Our XenStore client validates before sending, so it cannot produce the malformed or oversize
requests the conformance suite needs to compare the daemons' answers to. Framing per xs_wire.h:
16-byte native-endian header `type, req_id, tx_id, len`, then `len` payload bytes."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

HEADER = struct.Struct("<IIII")

# xs_wire.h enum xsd_sockmsg_type
CONTROL, DIRECTORY, READ, GET_PERMS, WATCH, UNWATCH = 0, 1, 2, 3, 4, 5
TRANSACTION_START, TRANSACTION_END, INTRODUCE, RELEASE, GET_DOMAIN_PATH = 6, 7, 8, 9, 10
WRITE, MKDIR, RM, SET_PERMS, WATCH_EVENT, ERROR = 11, 12, 13, 14, 15, 16
IS_DOMAIN_INTRODUCED, RESUME, SET_TARGET, RESET_WATCHES, DIRECTORY_PART = 17, 18, 19, 21, 22


@dataclass(frozen=True)
class Reply:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    @property
    def error(self) -> str | None:
        """The errno name of an ERROR reply (e.g. "ENOENT"), else None."""
        return self.payload.rstrip(b"\0").decode() if self.type == ERROR else None

    @property
    def ok(self) -> bool:
        return self.type != ERROR and self.payload == b"OK\0"


class RawConnection:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.events: list[tuple[str, str]] = []
        self._req = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, type_: int, payload: bytes, tx_id: int = 0, req_id: int | None = None) -> int:
        if req_id is None:
            self._req += 1
            req_id = self._req
        self.sock.sendall(HEADER.pack(type_, req_id, tx_id, len(payload)) + payload)
        return req_id

    def _recv_exact(self, size: int) -> bytes:
        buf = b""
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise ConnectionResetError("peer closed the connection")
            buf += chunk
        return buf

    def recv(self) -> Reply:
        type_, req_id, tx_id, length = HEADER.unpack(self._recv_exact(HEADER.size))
        return Reply(type_, req_id, tx_id, self._recv_exact(length) if length else b"")

    def request(self, type_: int, payload: bytes, tx_id: int = 0) -> Reply:
        """Send and return the reply, collecting watch events that arrive in between."""
        req_id = self.send(type_, payload, tx_id)
        while True:
            reply = self.recv()
            if reply.type == WATCH_EVENT:
                path, token = reply.payload.split(b"\0")[:2]
                self.events.append((path.decode(), token.decode()))
                continue
            assert reply.req_id == req_id, f"reply {reply} does not answer request {req_id}"
            return reply

    def is_closed_by_peer(self, wait: float = 2.0) -> bool:
        """True when the daemon closed (or reset) the connection within `wait` seconds."""
        deadline = time.monotonic() + wait
        self.sock.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                try:
                    if self.sock.recv(4096) == b"":
                        return True
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    return True
            return False
        finally:
            self.sock.settimeout(5.0)


def arg(*parts: str | bytes) -> bytes:
    """NUL-terminate each part: arg("/a", "tok") == b"/a\\0tok\\0"."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)
