"""Where xenstored lives, and a pyxs connection that can never strand a caller.

pyxs gives us framing (`Packet`, `PacketConnection`) and a reader thread (`Router`) that matches
replies to requests by id. Its weak spot (reference xenstore-for-tests.md §4.3 #3, #4): when the
daemon dies mid-request or sends a packet the router does not expect, the router thread dies and
every caller waits forever on a condition variable. A block script that hangs is SIGKILLed by
libxl after 40 s with its cleanup unrun, so here

- the socket carries a timeout, so a half-sent reply cannot park the router inside recv();
- the router subclass catches its own death and wakes every pending request and event waiter
  with `LOST`, so callers see a typed error at once instead of at their deadline;
- closing never joins a wedged thread without a bound.

The per-request deadline itself lives in the client (`wait_reply`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import stat
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from pyxs._internal import Packet
from pyxs.client import Router
from pyxs.connection import PacketConnection, XenBusConnection
from pyxs.exceptions import ConnectionError as PyXSConnectionError

from xenblockctl.xenstore.errors import XenstoreUnavailable

#: libxenstore's compiled-in rundir on Debian (XEN_RUN_STORED); /var/run is a symlink to /run.
DEFAULT_RUNDIR = "/run/xenstored"
#: The character device a domain without a local daemon talks through (Linux).
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")


class _Lost:
    """Marker delivered to waiters when the connection is gone."""

    def __repr__(self) -> str:
        return "LOST"


LOST: Final = _Lost()


class Endpoint(NamedTuple):
    """One place to try: a Unix socket of a xenstored, or the xenbus character device."""

    kind: str  # "socket" | "xenbus"
    path: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def default_endpoints(env: Mapping[str, str] | None = None) -> list[Endpoint]:
    """The order libxenstore's `xs_open(0)` uses (tools/libs/store/xs.c, xs_lib.c).

    One socket, chosen by precedence: `$XENSTORED_PATH`, else `$XENSTORED_RUNDIR/socket`, else
    `/run/xenstored/socket`; then the xenbus device. Like libxenstore we do not fall through to
    the default socket when `XENSTORED_PATH` names a dead one: a test pointed at its private
    daemon must never silently talk to the host's store.
    """
    env = os.environ if env is None else env
    sock = env.get("XENSTORED_PATH") or os.path.join(env.get("XENSTORED_RUNDIR") or DEFAULT_RUNDIR, "socket")
    endpoints = [Endpoint("socket", sock)]
    # /proc/xen/xenbus only on kernels without /dev/xen/xenbus (what pyxs and libxenstore do).
    xenbus = next((d for d in XENBUS_DEVICES if os.path.exists(d)), XENBUS_DEVICES[0])
    endpoints.append(Endpoint("xenbus", xenbus))
    return endpoints


def endpoint_for(path: str) -> Endpoint:
    """An explicit path: a character device means xenbus, anything else a Unix socket."""
    try:
        is_chr = stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        is_chr = False
    return Endpoint("xenbus" if is_chr else "socket", path)


def _connect_unix(path: str, timeout: float) -> socket.socket:
    """connect() bounded by `timeout`. A socket with a timeout is non-blocking underneath, and
    AF_UNIX connect() on a full listen backlog then fails at once with EAGAIN instead of waiting
    (C xenstored listens with a backlog of 1, so parallel hotplug scripts hit this). libxenstore
    blocks in connect(); we retry with a short backoff until the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() + delay > deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT, f"{path}: listen backlog still full after {timeout:g} s"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        except BaseException:
            sock.close()
            raise


class _SocketTransport:
    """pyxs's transport contract (fileno/recv/send/close) on a socket with a timeout, so a peer
    that stops mid-packet raises in recv()/sendall() instead of blocking the router forever."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = _connect_unix(path, timeout)

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


#: xs_wire.h struct xsd_sockmsg, native byte order (pyxs uses the same layout).
_HEADER = struct.Struct("=IIII")
#: xs_wire.h XENSTORE_PAYLOAD_MAX.
_PAYLOAD_MAX = 4096


class _AnyTypeReceiver:
    """pyxs's PacketConnection.recv() refuses message types missing from its 2016 table (e.g.
    DIRECTORY_PART, RESET_WATCHES replies), which kills the reader; it also trusts the length
    field. This recv() accepts any type and refuses only lengths beyond the protocol limit."""

    path: str
    transport: Any

    def recv(self) -> Any:
        if self.transport is None:
            raise PyXSConnectionError("not connected")
        try:
            op, rq_id, tx_id, size = _HEADER.unpack(self.transport.recv(_HEADER.size))
            if size > _PAYLOAD_MAX:
                raise PyXSConnectionError(f"{self.path}: reply of {size} bytes exceeds {_PAYLOAD_MAX}")
            payload = self.transport.recv(size) if size else b""
        except OSError as exc:
            raise PyXSConnectionError(f"error while reading from {self.path!r}: {exc}") from exc
        return tuple.__new__(Packet, (op, rq_id, tx_id, size, payload))


class SocketConnection(_AnyTypeReceiver, PacketConnection):  # type: ignore[misc]
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def create_transport(self) -> _SocketTransport:
        return _SocketTransport(self.path, self.timeout)


class XenbusConnection(_AnyTypeReceiver, XenBusConnection):  # type: ignore[misc]
    pass


class GuardedRouter(Router):  # type: ignore[misc]
    """pyxs's Router whose death wakes everyone waiting on it."""

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self.failure: BaseException | None = None
        self.stopped = threading.Event()
        #: event queues of our clients; each gets LOST when the router stops.
        self.event_queues: list[queue.Queue[Any]] = []
        self.thread.name = "xenstore-router"

    def __call__(self) -> None:
        try:
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


def wait_reply(rvar: Any, deadline: float) -> Any:
    """The reply (pyxs Packet), LOST, or None when `deadline` (time.monotonic) passed first."""
    with rvar.condition:
        while rvar.target is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            rvar.condition.wait(remaining)
        return rvar.target


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


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a connect failure: pyxs wraps the OSError in its ConnectionError (raised
    inside the except block, so the OSError is its context) and prints it as a tuple repr."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(exc: BaseException) -> str:
    code = _errno_of(exc)
    if code is None:
        return " ".join(str(exc).split())[:120]
    return f"{errno.errorcode.get(code, str(code))}: {os.strerror(code)}"


def connect_first(endpoints: list[Endpoint], timeout: float) -> tuple[GuardedRouter, Endpoint]:
    """Try each endpoint in order; the error names every place tried and why it failed (the errno
    name and text, once: when every place failed alike it is the error's own errno)."""
    failures: list[tuple[Endpoint, BaseException]] = []
    for endpoint in endpoints:
        try:
            return open_router(endpoint, timeout), endpoint
        except Exception as exc:
            failures.append((endpoint, exc))
    codes = {_errno_of(exc) for _, exc in failures}
    if len(codes) == 1 and None not in codes:
        places = " nor at ".join(str(endpoint) for endpoint, _ in failures)
        raise XenstoreUnavailable(f"cannot reach xenstored at {places}", errno=codes.pop())
    reasons = "; ".join(f"{endpoint}: {_reason(exc)}" for endpoint, exc in failures)
    raise XenstoreUnavailable(f"cannot reach xenstored ({reasons})")
