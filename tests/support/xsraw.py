"""Raw xenstore wire clients for tests: they send exactly the bytes a test asks for.

Our XenStore client validates before sending, so it cannot produce the malformed or oversize
requests the conformance and daemon suites need. The framing, limits and type numbers are the
project's one codec (`xenblockctl.xenstore.wire`), re-exported here for the tests' imports; only
the sending of chosen bytes is the tests' own. `RawConnection` (conformance, both daemons) returns
`Reply`; `RawClient` (the embedded daemon's suites) returns `Msg` and keeps watch events aside."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass

from xenblockctl.xenstore.wire import (
    CONTROL,
    DIRECTORY,
    DIRECTORY_PART,
    ERROR,
    GET_DOMAIN_PATH,
    GET_PERMS,
    HEADER,
    INTRODUCE,
    IS_DOMAIN_INTRODUCED,
    MKDIR,
    PAYLOAD_MAX,
    READ,
    RELEASE,
    RESET_WATCHES,
    RESUME,
    RM,
    SET_PERMS,
    SET_TARGET,
    TRANSACTION_END,
    TRANSACTION_START,
    UNWATCH,
    WATCH,
    WATCH_EVENT,
    WRITE,
    FrameDecoder,
    encode,
)

__all__ = [
    "CONTROL",
    "DIRECTORY",
    "DIRECTORY_PART",
    "ERROR",
    "GET_DOMAIN_PATH",
    "GET_PERMS",
    "HEADER",
    "INTRODUCE",
    "IS_DOMAIN_INTRODUCED",
    "MKDIR",
    "PAYLOAD_MAX",
    "READ",
    "RELEASE",
    "RESET_WATCHES",
    "RESUME",
    "RM",
    "SET_PERMS",
    "SET_TARGET",
    "TRANSACTION_END",
    "TRANSACTION_START",
    "UNWATCH",
    "WATCH",
    "WATCH_EVENT",
    "WRITE",
    "Msg",
    "RawClient",
    "RawConnection",
    "Reply",
    "arg",
]


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
        self.sock.sendall(encode(type_, req_id, tx_id, payload))
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


@dataclass(frozen=True)
class Msg:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    @property
    def strings(self) -> list[bytes]:
        return self.payload.split(b"\0")[:-1]


class RawClient:
    """Send chosen bytes, read whole messages; watch events are set aside in `events`."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocking connect: waits for a full listen backlog (the C daemon's is 1) to drain.
        self.sock.connect(path)
        self.sock.settimeout(timeout)
        self._decoder = FrameDecoder()
        self._req_id = 0
        self.events: list[Msg] = []

    @classmethod
    def adopt(cls, sock: socket.socket) -> RawClient:
        """Wrap an already connected socket (e.g. one a test configured itself)."""
        client = cls.__new__(cls)
        client.sock, client._decoder, client._req_id, client.events = sock, FrameDecoder(), 0, []
        return client

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg_type: int, payload: bytes, tx_id: int = 0, req_id: int | None = None) -> int:
        if req_id is None:
            self._req_id += 1
            req_id = self._req_id
        self.send_raw(encode(msg_type, req_id, tx_id, payload))
        return req_id

    def recv_msg(self) -> Msg | None:
        """The next message, or None when the daemon closed the connection."""
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return Msg(frame.type, frame.req_id, frame.tx_id, frame.payload)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._decoder.push(chunk)

    def reply(self) -> Msg:
        """The next non-event message (events seen meanwhile go to `events`)."""
        while True:
            msg = self.recv_msg()
            if msg is None:
                raise ConnectionError("daemon closed the connection")
            if msg.type == WATCH_EVENT:
                self.events.append(msg)
                continue
            return msg

    def call(self, msg_type: int, *args: bytes, tx_id: int = 0, raw: bytes | None = None) -> Msg:
        """Send `args` NUL-terminated (or exactly `raw`) and return the reply."""
        payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
        req_id = self.send(msg_type, payload, tx_id)
        msg = self.reply()
        assert msg.req_id == req_id, (msg, req_id)
        return msg

    def next_event(self) -> Msg:
        if self.events:
            return self.events.pop(0)
        msg = self.recv_msg()
        if msg is None:
            raise ConnectionError("daemon closed the connection")
        assert msg.type == WATCH_EVENT, msg
        return msg

    def no_event_within(self, seconds: float) -> bool:
        if self.events or self._decoder.pending:
            return False
        ready, _, _ = select.select([self.sock], [], [], seconds)
        return not ready
