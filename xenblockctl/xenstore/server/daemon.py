"""The embedded xenstored's event loop: unix sockets, non-blocking I/O, clean shutdown.

One thread, one `selectors` loop. Every client socket is non-blocking with its own output queue
(connection.py): a client that does not read its replies only grows its own queue; past
`READ_PAUSE_BYTES` the daemon stops handling its requests until it catches up, and past
`MAX_OUTPUT_BYTES` (it is not reading at all while others' changes fire its watches) it is
disconnected. Requests are taken one at a time and the socket is read only once everything
received has been handled, so a client's input buffer holds at most one `recv` (RECV_SIZE) plus a
partial message. Unprivileged clients also wait while their quotas say so (20 unread replies, the
hard memory limit: quota.py), as the C daemon stops reading a domain's ring; other clients are not
affected. After connections close, freed memory is returned to the system (`release_free_memory`).
A client sending a header with an oversize length is disconnected (as the C daemon
does); a client leaving mid-message or mid-transaction just goes away, its transactions discarded.

SIGTERM and SIGINT stop the loop through a wakeup socket; `close()` removes the socket files this
daemon created (and only those: a file replaced meanwhile by another daemon is left alone).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.server.connection import Connection
from xenblockctl.xenstore.server.core import Tracer, Xenstored
from xenblockctl.xenstore.server.quota import Quota
from xenblockctl.xenstore.server.wire import FrameDecoder, OversizeFrame

log = logging.getLogger(__name__)

READ_PAUSE_BYTES = 1 << 20
MAX_OUTPUT_BYTES = 64 << 20
RECV_SIZE = 64 * 1024
#: sun_path is 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107


#: How long a listener stays unwatched after accept() ran out of file descriptors.
PAUSE_SECONDS = 1.0
#: Soft RLIMIT_NOFILE wanted (one descriptor per client), as far as the hard limit allows.
WANT_FILES = 65536
#: At most this often, return freed heap memory to the system after connections closed.
TRIM_SECONDS = 1.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    import ctypes

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc `malloc_trim`).

    What a closed connection held (transactions' staged nodes, watches, queued output) is freed
    when it closes, but glibc keeps freed heap pages mapped and CPython's small-object arenas
    live on that heap, so without this the daemon's RSS stays at its high-water mark."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANT_FILES if hard == resource.RLIM_INFINITY else min(WANT_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


#: <linux/prctl.h>: deliver a signal to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def tie_to_parent() -> None:
    """Get SIGTERM when the parent dies, so a killed test runner cannot orphan the daemon (its
    fixture finaliser never runs then). Linux only; checks for a parent that died already."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise XenstoredError(f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}", errno=err)
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


class XenstoredError(XenblockError):
    code = "xenstored"


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening socket whose connections act as `domid` (0: privileged, like the real socket)."""

    path: str
    domid: int


class _Client:
    __slots__ = ("conn", "decoder", "events", "sock")

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.decoder = FrameDecoder()
        self.events = 0


def _bind(path: str) -> tuple[socket.socket, int]:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise XenstoredError(
            f"socket path longer than {SUN_PATH_MAX} bytes: {path}", code="xenstored-socket-path"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise XenstoredError(f"{path} exists and is not a socket", code="xenstored-socket-path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket of a daemon that died
        else:
            raise XenstoredError(f"another daemon listens on {path}", code="xenstored-socket-busy")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The C daemon's socket is 0600: only root (or the daemon's user) talks to xenstore.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise XenstoredError.from_oserror(
            exc, f"cannot listen on {path}", code="xenstored-socket-path"
        ) from exc
    return sock, os.stat(path).st_ino


class Daemon:
    def __init__(
        self,
        listeners: list[Listener],
        *,
        quota: Quota | None = None,
        trace: Tracer | None = None,
    ) -> None:
        self.core = Xenstored(quota, trace)
        self.listeners = listeners
        self._selector = selectors.DefaultSelector()
        self._bound: list[tuple[socket.socket, str, int]] = []
        self._clients: dict[int, _Client] = {}
        self._stop = False
        self._paused: list[tuple[socket.socket, Listener]] = []
        self._paused_at = 0.0
        self._trim_pending = False
        self._trimmed_at = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup_fd = -1

    # Life cycle -------------------------------------------------------------------------------

    def open(self) -> None:
        """Bind every socket (the daemon is ready once this returns)."""
        _raise_fd_limit()
        try:
            for listener in self.listeners:
                sock, ino = _bind(listener.path)
                self._bound.append((sock, listener.path, ino))
                self._selector.register(sock, selectors.EVENT_READ, listener)
        except BaseException:
            self.close()
            raise
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT end `run()` cleanly (main thread only)."""
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def stop(self) -> None:
        """Ask `run()` to return (from another thread or a signal handler)."""
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client, "daemon stopping")
        for sock, path, ino in self._bound:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == ino:
                    os.unlink(path)
        self._bound.clear()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        if self._old_handlers:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        self._old_handlers.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # Loop -------------------------------------------------------------------------------------

    def _resume_listeners(self) -> None:
        for lsock, listener in self._paused:
            self._selector.register(lsock, selectors.EVENT_READ, listener)
        self._paused.clear()

    def run(self) -> None:
        while not self._stop:
            timeout = None
            if self._paused:
                timeout = max(0.0, self._paused_at + PAUSE_SECONDS - time.monotonic())
            if self._trim_pending:
                wait = max(0.0, self._trimmed_at + TRIM_SECONDS - time.monotonic())
                timeout = wait if timeout is None else min(timeout, wait)
            events = self._selector.select(timeout)
            if self._paused and time.monotonic() >= self._paused_at + PAUSE_SECONDS:
                self._resume_listeners()
            for key, mask in events:
                data = key.data
                if data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif isinstance(data, Listener):
                    self._accept(key.fileobj, data)  # type: ignore[arg-type]
                else:
                    client: _Client = data
                    if client.conn.conn_id not in self._clients:
                        continue  # dropped earlier in this round
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._pump(client)
                        if mask & selectors.EVENT_READ and client.conn.conn_id in self._clients:
                            self._read(client)
                    except Exception:
                        # A bug must cost one connection, never the daemon.
                        log.exception("connection %d failed", client.conn.conn_id)
                        self._drop(client, "internal error")
            self._flush_all()
            while self.core.doomed:
                doomed = self._clients.get(self.core.doomed.pop())
                if doomed is not None:
                    self._drop(doomed, "CONTROL drop-watching")
            if self._trim_pending and time.monotonic() >= self._trimmed_at + TRIM_SECONDS:
                self._trim_pending = False
                self._trimmed_at = time.monotonic()
                release_free_memory()

    def _accept(self, lsock: socket.socket, listener: Listener) -> None:
        for _ in range(64):
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors: keep serving the clients we have. The pending
                # connection keeps the listener readable, so stop watching it until a client
                # leaves (or a second passes) instead of spinning on accept().
                log.warning("accept on %s failed: %s", listener.path, exc)
                self._selector.unregister(lsock)
                self._paused.append((lsock, listener))
                self._paused_at = time.monotonic()
                return
            if not self.core.may_connect(listener.domid):
                log.warning(
                    "connection to %s refused: domain %d already has %d connections (quota)",
                    listener.path,
                    listener.domid,
                    self.core.quota.connections,
                )
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self.core.connect(listener.domid))
            self._clients[client.conn.conn_id] = client
            self._set_interest(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"recv: {exc}")
            return
        if not data:
            reason = "closed mid-message" if client.decoder.pending else "closed"
            self._drop(client, reason)
            return
        client.decoder.push(data)
        self._pump(client)

    def _may_handle(self, client: _Client) -> bool:
        """Whether to take the client's next request now: not while its replies pile up
        unread, nor (unprivileged) while its quotas say wait."""
        conn = client.conn
        return conn.queued_bytes < READ_PAUSE_BYTES and self.core.accepts_requests(conn)

    def _serve(self, client: _Client) -> bool:
        """Handle buffered requests while allowed; False when the client was dropped."""
        while self._may_handle(client):
            try:
                frame = client.decoder.next_frame()
            except OversizeFrame as exc:
                self._drop(client, str(exc))
                return False
            if frame is None:
                break
            self.core.handle(client.conn, frame)
        return True

    def _pump(self, client: _Client) -> None:
        """Send what the socket takes and handle what may be handled, until neither moves;
        then watch the socket for what the client is waiting on."""
        while True:
            if not self._send(client):
                return
            if not (client.decoder.has_frame() and self._may_handle(client)):
                break
            if not self._serve(client):
                return
        if client.conn.queued_bytes > MAX_OUTPUT_BYTES:
            self._drop(client, "not reading its replies and events")
            return
        self._set_interest(client)

    def _flush_all(self) -> None:
        for client in list(self._clients.values()):
            if client.conn.conn_id not in self._clients:
                continue  # dropped by an earlier one in this round
            if client.events & selectors.EVENT_WRITE or not (
                client.conn.has_output() or client.decoder.has_frame()
            ):
                # Its socket is full (retrying now would only copy its queue again; the
                # selector reports when it drains), or it has nothing to do; a stalled client
                # may be allowed to go on now (another one freed quota).
                self._set_interest(client)
                continue
            self._pump(client)

    def _send(self, client: _Client) -> bool:
        """Write queued output without blocking; False when the client was dropped."""
        conn = client.conn
        while conn.has_output():
            chunk = conn.output_chunk()
            try:
                sent = client.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("send to connection %d: %s", conn.conn_id, exc)
                self._drop(client, f"send: {exc}")
                return False
            conn.consume_output(sent)
            if sent < len(chunk):
                break
        return True

    def _wanted(self, client: _Client) -> int:
        conn = client.conn
        # Bounded input: read more only once everything received has been handled.
        events = 0
        if not client.decoder.has_frame() and self._may_handle(client):
            events = selectors.EVENT_READ
        if conn.has_output():
            events |= selectors.EVENT_WRITE
        return events

    def _set_interest(self, client: _Client) -> None:
        wanted = self._wanted(client)
        if wanted == client.events:
            return
        if client.events == 0:
            self._selector.register(client.sock, wanted, client)
        elif wanted == 0:
            self._selector.unregister(client.sock)
        else:
            self._selector.modify(client.sock, wanted, client)
        client.events = wanted

    def _drop(self, client: _Client, reason: str) -> None:
        if self._clients.pop(client.conn.conn_id, None) is None:
            return
        if client.events:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        client.sock.close()
        if self._paused:
            self._resume_listeners()  # a descriptor just became free
        if self.core.trace:
            self.core.trace(f"DROP connection {client.conn.conn_id}: {reason}")
        self.core.disconnect(client.conn)
        self._trim_pending = True
