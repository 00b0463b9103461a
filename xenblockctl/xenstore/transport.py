"""The threaded link (`RouterLink`, see link.py): a pyxs reader thread that cannot strand a caller.

pyxs gives us its connection classes and a reader thread (`Router`) that matches replies to
requests by id and delivers watch events to queues, which is what lets the engine and the CLI
share one connection between threads; the framing is the shared codec (wire.py). Its weak spot
(reference xenstore-for-tests.md §4.3 #3, #4): when the daemon dies mid-request or sends a packet
the router does not expect, the router thread dies and every caller waits forever on a condition
variable. A block script that hangs is SIGKILLed by libxl after 40 s with its cleanup unrun, so here

- the socket carries a timeout, so a half-sent reply cannot park the router inside recv() (on a
  socket the router reads only what select() says is there, see `_serve_socket`, and a caller's
  wait has its own deadline);
- the router subclass catches its own death and wakes every pending request and event waiter
  with `LOST`, so callers see a typed error at once instead of at their deadline;
- closing never joins a wedged thread without a bound.

Over a socket the router reads in bursts and a batch goes out in one write (issue 20: pyxs's
select() and two reads per message, and a write per request, were most of the engine's xenstore
cost in dom0 under TCG). The per-request deadline comes from the client (`wait_reply`).
One-thread, one-shot callers (the block script) use the synchronous link instead (synchronous.py;
why: bench/README.md).
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import queue
import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from pyxs._internal import Event
from pyxs.client import Router
from pyxs.connection import PacketConnection, XenBusConnection
from pyxs.exceptions import ConnectionError as PyXSConnectionError
from pyxs.exceptions import UnexpectedPacket

from xenblockctl.xenstore.endpoints import Endpoint, connect_unix
from xenblockctl.xenstore.link import Link, LinkLost, LinkSendFailed, LinkTimeout, Request
from xenblockctl.xenstore.wire import (
    HEADER,
    PAYLOAD_MAX,
    WATCH_EVENT,
    Frame,
    FrameDecoder,
    OversizeFrame,
    encode,
    encode_many,
)


class _Lost:
    """Marker delivered to waiters when the connection is gone."""

    def __repr__(self) -> str:
        return "LOST"


LOST: Final = _Lost()
#: What the reader asks of the socket at once: a batch's replies in one recv (messages are at
#: most 16 + PAYLOAD_MAX bytes).
_RECV_SIZE: Final = 65536


class _Interrupt:
    """Marker interrupt() puts among the events: the wait it meets returns as if timed out."""

    def __repr__(self) -> str:
        return "INTERRUPT"


INTERRUPT: Final = _Interrupt()


class _SocketTransport:
    """pyxs's transport contract (fileno/recv/send/close) on a socket with a timeout, so a peer
    that stops mid-packet raises in recv()/sendall() instead of blocking the router forever."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = connect_unix(path, timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise OSError(errno.ECONNRESET, "xenstored closed the connection")
            got += n
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def kick(self) -> None:
        """Make a recv() blocked in another thread return (EOF) without closing the fd under it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Packet:
    """What pyxs's Router reads from a packet (`op`, `rq_id`, `payload`), from our codec instead of
    pyxs's private `_internal.Packet` (whose table of message types predates DIRECTORY_PART)."""

    __slots__ = ("op", "payload", "rq_id", "tx_id")

    def __init__(self, op: int, rq_id: int, tx_id: int, payload: bytes) -> None:
        self.op = op
        self.rq_id = rq_id
        self.tx_id = tx_id
        self.payload = payload


class _Codec:
    """The framing of pyxs's PacketConnection replaced by the shared codec: send() writes header
    and payload in one call (pyxs makes two); recv() accepts any message type (pyxs refuses types
    missing from its 2016 table, e.g. DIRECTORY_PART, which kills the reader) and refuses only
    lengths beyond the protocol limit (pyxs trusts the length field)."""

    path: str
    transport: Any

    def send(self, packet: _Packet) -> None:
        if self.transport is None:
            raise PyXSConnectionError("not connected")
        try:
            self.transport.send(encode(packet.op, packet.rq_id, packet.tx_id, packet.payload))
        except OSError as exc:
            raise PyXSConnectionError(f"error while writing to {self.path!r}: {exc}") from exc

    def send_encoded(self, data: bytes) -> None:
        """Messages already encoded (wire.encode_many), in one write."""
        if self.transport is None:
            raise PyXSConnectionError("not connected")
        try:
            self.transport.send(data)
        except OSError as exc:
            raise PyXSConnectionError(f"error while writing to {self.path!r}: {exc}") from exc

    def recv(self) -> _Packet:
        if self.transport is None:
            raise PyXSConnectionError("not connected")
        try:
            op, rq_id, tx_id, size = HEADER.unpack(self.transport.recv(HEADER.size))
            if size > PAYLOAD_MAX:
                raise PyXSConnectionError(f"{self.path}: reply of {size} bytes exceeds {PAYLOAD_MAX}")
            payload = self.transport.recv(size) if size else b""
        except OSError as exc:
            raise PyXSConnectionError(f"error while reading from {self.path!r}: {exc}") from exc
        return _Packet(op, rq_id, tx_id, payload)


class SocketConnection(_Codec, PacketConnection):  # type: ignore[misc]
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def create_transport(self) -> _SocketTransport:
        return _SocketTransport(self.path, self.timeout)


class XenbusConnection(_Codec, XenBusConnection):  # type: ignore[misc]
    pass


class GuardedRouter(Router):  # type: ignore[misc]
    """pyxs's Router whose death wakes everyone waiting on it."""

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self.failure: BaseException | None = None
        self.stopped = threading.Event()
        #: event queues of our clients; each gets LOST when the router stops.
        self.event_queues: list[queue.SimpleQueue[Any]] = []
        self.thread.name = "xenstore-router"

    def send_many(self, packets: Sequence[_Packet]) -> list[_Reply]:
        """Register a reply slot for each packet, then send them all in one write (pyxs's send()
        wrote each in its own). The slots go in first: xenstored may answer before send returns."""
        with self.send_lock:
            replies = []
            for packet in packets:
                self.rvars[packet.rq_id] = reply = _Reply()
                replies.append(reply)
            self.connection.send_encoded(encode_many([(p.op, p.rq_id, p.tx_id, p.payload) for p in packets]))
            return replies

    def send(self, packet: _Packet) -> _Reply:
        return self.send_many([packet])[0]

    def __call__(self) -> None:
        try:
            transport = self.connection.transport
            if isinstance(transport, _SocketTransport):
                try:
                    self._serve_socket(transport.sock)
                finally:  # what pyxs's loop does on its way out: a later send fails at once
                    self.connection.close()
                    self.r_terminator.close()
                    self.w_terminator.close()
            else:
                super().__call__()
        except BaseException as exc:
            self.failure = exc
        finally:
            self.stopped.set()
            with self.send_lock:
                pending = list(self.rvars.values())
                self.rvars.clear()
            for rvar in pending:
                rvar.set(LOST)
            for events in self.event_queues:
                events.put(LOST)

    def _serve_socket(self, sock: _socket.socket) -> None:
        """pyxs's loop, reading bursts: after each select() one recv() takes whatever xenstored
        has sent and every complete message in it is handed out. pyxs made a select() and two
        recv()s per message (header, then payload), and a batch's replies come back-to-back, so
        a 12-read batch cost the reader 36 system calls where it now costs ~2 (issue 20: in the
        pvgrub boot under TCG the reader's CPU per message was ~5 ms of dom0's, taken from the
        guest's and on the connect's critical chain). select() without a timeout, as pyxs: the
        socket's timeout bounds a recv() only, and an idle connection is not an error. A peer
        that stops mid-message leaves the bytes buffered; each caller's wait has its own
        deadline (wait_reply), and shutdown() wakes the select() through the terminator."""
        decoder = FrameDecoder()
        terminator = self.r_terminator
        watched = [sock, terminator]
        rvars = self.rvars
        monitors = self.monitors
        while True:
            readable, _w, _x = select.select(watched, [], [])
            if terminator in readable:
                return
            data = sock.recv(_RECV_SIZE)
            if not data:
                raise OSError(errno.ECONNRESET, "xenstored closed the connection")
            try:
                frames = decoder.feed(data)
            except OversizeFrame as exc:
                raise PyXSConnectionError(f"{self.connection.path}: {exc}") from None
            for frame in frames:
                if frame.type == WATCH_EVENT:
                    event = Event(*frame.payload.split(b"\0")[:-1])
                    for monitor in monitors[event.token]:
                        monitor.events.put(event)
                    continue
                reply = rvars.pop(frame.req_id, None)
                if reply is None:
                    raise UnexpectedPacket(frame)
                reply.set(frame)

    def describe_failure(self) -> str:
        if self.failure is None:
            return "connection closed"
        text = " ".join(str(self.failure).split()) or type(self.failure).__name__
        return f"{type(self.failure).__name__}: {text}"[:200]

    def shutdown(self, timeout: float) -> None:
        """Stop the router thread; bounded even when it is stuck inside a read."""
        if self.thread.is_alive():
            with contextlib.suppress(OSError):  # already closing on its own
                self.w_terminator.sendall(b"\0")
            self.thread.join(timeout)
        if self.thread.is_alive():
            transport = self.connection.transport
            if isinstance(transport, _SocketTransport):
                transport.kick()
                self.thread.join(timeout)
        if not self.thread.ident:
            # Never started: close what the constructor and connect() opened.
            self.connection.close()
            self.r_terminator.close()
            self.w_terminator.close()
        # A router stuck in os.read() on xenbus is a daemon thread and dies with the process.


class _Reply:
    """One request's reply slot: set once by the reader thread (the reply, or LOST), waited for
    by the caller. A plain lock held until set, instead of pyxs's RVar (a Condition: a Python
    RLock, a waiter deque and a fresh lock for every wait and notify): the wake-up is one C
    release and one C acquire (issue 20)."""

    __slots__ = ("_unset", "target")

    def __init__(self) -> None:
        self.target: Any = None
        self._unset = threading.Lock()
        self._unset.acquire()

    def set(self, target: Any) -> None:
        if self.target is None:
            self.target = target
            self._unset.release()

    def wait(self, timeout: float) -> bool:
        return self._unset.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))


def wait_reply(reply: _Reply, deadline: float) -> Any:
    """The reply (a Frame, or a _Packet on xenbus), LOST, or None when `deadline`
    (time.monotonic) passed first."""
    if reply.target is None:
        reply.wait(deadline - time.monotonic())
    return reply.target


def open_router(endpoint: Endpoint, timeout: float) -> GuardedRouter:
    """Connect and start the reader thread; raises OSError / pyxs errors to the caller."""
    if endpoint.kind == "socket":
        connection: Any = SocketConnection(endpoint.path, timeout)
    else:
        connection = XenbusConnection(endpoint.path)
    router = GuardedRouter(connection)
    try:
        router.start()
    except BaseException:
        router.shutdown(timeout)
        raise
    return router


class RouterLink(Link):
    """The threaded link (see xenstore/link.py): pyxs's reader thread, guarded. Any number of
    threads may exchange requests and wait for events at once."""

    def __init__(self, router: GuardedRouter, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._router = router
        #: A SimpleQueue: its put() is reentrant (C, no Python-level lock), so interrupt() may run
        #: in a signal handler that interrupted this very thread inside next_event().
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        router.event_queues.append(self._events)
        self._sink = _EventSink(self._events)
        #: Over the kernel's xenbus device, one request in flight at a time (libxenstore's way).
        #: Linux's /dev/xen/xenbus queues a request with its body still pointing into the file's
        #: one message buffer and returns from write() before the request reaches the ring, so
        #: the next write() overwrites it: pipelined requests go out with the later ones' paths
        #: and values (seen on 6.1 in the real-Xen lane, scenario 14). Sockets pipeline freely.
        self._lockstep = threading.Lock() if endpoint.kind == "xenbus" else None

    def exchange(self, requests: Sequence[Request], deadline: float) -> list[Frame]:
        if self._lockstep is None:
            return self._exchange(requests, 0, deadline)
        with self._lockstep:
            replies: list[Frame] = []
            for index, request in enumerate(requests):
                replies += self._exchange([request], index, deadline)
            return replies

    def _exchange(self, requests: Sequence[Request], first: int, deadline: float) -> list[Frame]:
        router = self._router
        try:
            pending = router.send_many(
                [_Packet(op, rq_id, tx_id, payload) for op, rq_id, tx_id, payload in requests]
            )
        except Exception as exc:  # pyxs ConnectionError, socket timeout from sendall
            raise LinkSendFailed(first, " ".join(str(exc).split())[:120]) from exc
        replies: list[Frame] = []
        for index, slot in enumerate(pending, first):
            reply = wait_reply(slot, deadline)
            if reply is None:
                raise LinkTimeout(index)
            if reply is LOST:
                raise LinkLost(index, router.describe_failure())
            if not isinstance(reply, Frame):  # the xenbus device's reader: pyxs's loop
                reply = Frame(reply.op, reply.rq_id, reply.tx_id, bytes(reply.payload))
            replies.append(reply)
        return replies

    def next_event(self, timeout: float) -> tuple[bytes, bytes] | None:
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is LOST:
            self._events.put(LOST)  # keep reporting it to later waits
            raise LinkLost(0, self._router.describe_failure())
        if item is INTERRUPT:
            return None
        path, token = item
        return bytes(path), bytes(token)

    def interrupt(self) -> None:
        self._events.put(INTERRUPT)

    def subscribe(self, token: str) -> None:
        self._router.subscribe(token.encode("ascii"), self._sink)

    def unsubscribe(self, token: str) -> None:
        with contextlib.suppress(ValueError):  # never subscribed (a failed watch)
            self._router.unsubscribe(token.encode("ascii"), self._sink)

    @property
    def closed(self) -> bool:
        return self._router.stopped.is_set()

    def describe_failure(self) -> str:
        return self._router.describe_failure()

    def close(self, timeout: float) -> None:
        self._router.shutdown(timeout)


class _EventSink:
    """What pyxs's Router delivers watch events to: anything with an `events` queue."""

    def __init__(self, events: queue.SimpleQueue[Any]) -> None:
        self.events = events


def open_link(endpoint: Endpoint, timeout: float) -> RouterLink:
    """Connect and start the reader thread; raises OSError / pyxs errors to the caller."""
    return RouterLink(open_router(endpoint, timeout), endpoint)
