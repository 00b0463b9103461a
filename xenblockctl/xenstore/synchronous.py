"""A synchronous link to xenstored: one socket (or the xenbus device), no thread.

For one-shot, one-thread callers: the block script (`XenStore.connect(synchronous=True)`). The
calling thread writes a whole batch with one send() (header and payload of every request in one
buffer) and reads the replies itself; a watch event that arrives in between is set aside for
`next_event`. Compared with the threaded link (pyxs's reader thread) an add makes ~5× fewer
syscalls and imports neither `socket` nor `threading`, `queue` or pyxs's `platform`
(bench/README.md, blockscript_add). It must not be shared between threads.

Failure behaviour is the threaded link's: every wait is bounded by the caller's deadline, a peer
that closes, sends a reply nobody asked for or an oversize header makes the link `LOST` for good
(the client then raises XenstoreDisconnected), and close() never blocks.
"""

from __future__ import annotations

import errno
import os
import select
import time

from xenblockctl.xenstore.endpoints import Endpoint, connect_unix
from xenblockctl.xenstore.link import Link, LinkLost, LinkSendFailed, LinkTimeout, Request
from xenblockctl.xenstore.wire import NUL, WATCH_EVENT, Frame, FrameDecoder, OversizeFrame, encode

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Sequence

#: Bytes asked for per read: a batch's replies usually arrive together.
_READ_SIZE = 65536


class DirectLink(Link):
    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self._sock = None
        self._fd = -1
        if endpoint.kind == "socket":
            self._sock = connect_unix(endpoint.path, timeout)
            self._fd = self._sock.fileno()
        else:
            self._fd = os.open(endpoint.path, os.O_RDWR | os.O_CLOEXEC)
        self._pipeline = endpoint.kind == "socket"
        self._decoder = FrameDecoder()
        self._tokens: set[bytes] = set()
        self._events: list[tuple[bytes, bytes]] = []
        #: Replies that arrived for a request of the batch other than the one being awaited.
        self._early: dict[int, Frame] = {}
        self._failure: str | None = None

    # -- the Link contract ----------------------------------------------------------------------

    def exchange(self, requests: Sequence[Request], deadline: float) -> list[Frame]:
        self._check_alive(0)
        if self._pipeline:
            self._send(b"".join(encode(*request) for request in requests), 0)
            outstanding = {request[1] for request in requests}
            return [self._await(rq[1], index, deadline, outstanding) for index, rq in enumerate(requests)]
        replies = []
        for index, request in enumerate(requests):
            self._send(encode(*request), index)
            replies.append(self._await(request[1], index, deadline, {request[1]}))
        return replies

    def next_event(self, timeout: float) -> tuple[bytes, bytes] | None:
        if self._events:
            return self._events.pop(0)
        self._check_alive(0)
        deadline = time.monotonic() + timeout
        while not self._events:
            frame = self._next_frame(0, deadline)
            if frame is None:
                return None
            if frame.type != WATCH_EVENT:
                self._lose(0, f"unexpected reply {frame!r} while waiting for a watch event")
            self._event(frame)
        return self._events.pop(0)

    def subscribe(self, token: str) -> None:
        self._tokens.add(token.encode("ascii"))

    def unsubscribe(self, token: str) -> None:
        raw = token.encode("ascii")
        self._tokens.discard(raw)
        self._events = [event for event in self._events if event[1] != raw]

    @property
    def closed(self) -> bool:
        return self._fd < 0 or self._failure is not None

    def describe_failure(self) -> str:
        return self._failure or "connection closed"

    def close(self, timeout: float = 0.0) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(fd)

    # -- reading and writing ----------------------------------------------------------------------

    def _check_alive(self, index: int) -> None:
        if self._failure is not None:
            raise LinkLost(index, self._failure)
        if self._fd < 0:
            raise LinkLost(index, "connection closed")

    def _lose(self, index: int, reason: str) -> None:
        self._failure = " ".join(reason.split())[:200]
        raise LinkLost(index, self._failure)

    def _send(self, data: bytes, index: int) -> None:
        try:
            if self._sock is not None:
                self._sock.sendall(data)
            else:
                # xenbus takes one whole message per write (Linux collects partial writes too).
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._failure = f"send failed: {type(exc).__name__}: {exc}"[:200]
            raise LinkSendFailed(index, f"{type(exc).__name__}: {exc}") from exc

    def _await(self, req_id: int, index: int, deadline: float, outstanding: set[int]) -> Frame:
        early = self._early.pop(req_id, None)
        if early is not None:
            return early
        while True:
            frame = self._next_frame(index, deadline)
            if frame is None:
                raise LinkTimeout(index)
            if frame.type == WATCH_EVENT:
                self._event(frame)
            elif frame.req_id == req_id:
                return frame
            elif frame.req_id in outstanding and frame.req_id not in self._early:
                # xenstored answers a connection in order, but match by id like the threaded link.
                self._early[frame.req_id] = frame
            else:
                # Like pyxs's router (UnexpectedPacket): the stream cannot be trusted any more.
                self._lose(index, f"UnexpectedPacket: reply {frame!r} answers no request of ours")

    def _event(self, frame: Frame) -> None:
        parts = frame.payload.split(NUL)
        if len(parts) < 3:
            self._lose(0, f"malformed watch event {frame.payload[:60]!r}")
        if parts[1] in self._tokens:
            self._events.append((parts[0], parts[1]))

    def _next_frame(self, index: int, deadline: float) -> Frame | None:
        """The next whole frame, or None when `deadline` passes first."""
        while True:
            try:
                frame = self._decoder.next_frame()
            except OversizeFrame as exc:
                self._lose(index, f"OversizeFrame: {exc}")
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ready, _, _ = select.select([self._fd], [], [], remaining)
                if not ready:
                    continue
                if self._sock is not None:
                    data = self._sock.recv(_READ_SIZE)
                else:
                    data = os.read(self._fd, _READ_SIZE)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._lose(index, f"{type(exc).__name__}: {exc}")
            if not data:
                self._lose(index, "ConnectionError: xenstored closed the connection")
            self._decoder.push(data)


def open_link(endpoint: Endpoint, timeout: float) -> DirectLink:
    return DirectLink(endpoint, timeout)
