"""The no-Xen transport: grants are pages of the frontend's memfd, event channels are eventfd pairs.

The engine process runs a small "hypervisor" registry on a unix SOCK_SEQPACKET socket. A frontend
(any process) registers:

- its grant table: one memfd, grant ref N = page N. The memfd must carry F_SEAL_SHRINK, or a
  frontend could truncate it under our mapping and kill the engine with SIGBUS;
- each unbound event channel port: two eventfds (frontend->backend, backend->frontend).

Messages are one JSON object per datagram with the fds attached (SCM_RIGHTS); the reply is
`{"ok": true}` or `{"ok": false, "error": "..."}`. The xenstore handshake is unchanged: the frontend
still publishes `ring-ref*` and `event-channel`, and the engine maps/binds them through this transport.
Registrations vanish when the frontend's connection closes (its "domain died"); mappings already
made stay valid because they hold the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.transport.base import (
    EventChannel,
    GrantError,
    GrantMapping,
    MmapGrantMapping,
    PersistentGrants,
    Transport,
    TransportError,
    merge_extents,
)
from xenblockctl.backend.transport.fixedmap import Reservation

_EVENT = struct.pack("=Q", 1)
_MAX_FDS = 4

# --- mapping grants contiguously ------------------------------------------------------------------
# Xen's gntdev maps any list of grants into one contiguous range; a multi-page ring needs that. A
# fixedmap.Reservation (an anonymous range owned by a Python mmap object) gets each page replaced in
# place by the granted memfd page.


class _GrantTable:
    """A registered frontend memfd, mapped once in full. Page N of the file is grant ref N."""

    def __init__(self, domid: int, fd: int) -> None:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            raise TransportError("grant table memfd must be sealed with F_SEAL_SHRINK", code="transport")
        size = os.fstat(fd).st_size
        if size < PAGE_SIZE or size % PAGE_SIZE:
            raise TransportError(f"grant table size {size} is not a positive page multiple", code="transport")
        self.domid = domid
        self.fd = os.dup(fd)  # kept for MAP_FIXED remaps (contiguous mappings)
        self.pages = size // PAGE_SIZE
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The whole table stays mapped for as long as anything refers to it: the seal means it can
        # never shrink under us, so every request's pages are slices of these two views and mapping
        # a request costs no syscall and no per-page object (the local form of persistent grants).
        self.view = memoryview(self.map)
        self.ro_view = self.view.toreadonly()

    def check(self, refs: Sequence[int]) -> None:
        if not refs:
            raise GrantError("no grant refs to map")
        if min(refs) < 0 or max(refs) >= self.pages:  # one C-level pass each, even for 4096 refs
            bad = next(ref for ref in refs if not 0 <= ref < self.pages)
            raise GrantError(f"grant ref {bad} not granted by domain {self.domid}")

    def close(self) -> None:
        # Views handed out keep the mmap alive (it is closed by refcount when they go); only our fd
        # and our own view are dropped here.
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


def _table_iovecs(
    table: _GrantTable, view: memoryview, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None
) -> list[memoryview]:
    """GrantMapping.iovecs for pages `refs` of a whole-table view, every ref checked first."""
    if not refs:
        raise GrantError("no grant refs to map")
    first = refs[0]
    n = len(refs)
    # Consecutive refs (what a frontend hands out from a fresh pool) are consecutive pages of the
    # memfd, hence of the one table mapping: one buffer, and the two ends bound every ref.
    last = first + n - 1
    if refs[-1] == last and (n <= 2 or tuple(refs) == tuple(range(first, last + 1))):
        if first < 0 or last >= table.pages:
            table.check(refs)  # raises, naming the first ref outside the table
        if extents is None:
            return [view[first * PAGE_SIZE : (first + n) * PAGE_SIZE]]
    else:
        table.check(refs)
    starts = [ref * PAGE_SIZE for ref in refs]
    if extents is None:
        extents = ((0, PAGE_SIZE),) * n
    return merge_extents(view, starts, extents)


class _SlicedMapping(GrantMapping):
    """Pages as slices of the whole-table mapping: no syscall, no per-page view until asked for."""

    def __init__(self, table: _GrantTable, refs: tuple[int, ...], writable: bool) -> None:
        self.refs = refs
        self.writable = writable
        self._table = table
        self._view: memoryview | None = table.view if writable else table.ro_view
        self.on_unmap: Callable[[], None] | None = None

    def _table_view(self) -> memoryview:
        if self._view is None:
            raise GrantError("mapping already unmapped")
        return self._view

    def page(self, index: int) -> memoryview:
        start = self.refs[index] * PAGE_SIZE
        return self._table_view()[start : start + PAGE_SIZE]

    @property
    def buffer(self) -> memoryview:
        if len(self.refs) != 1:
            raise GrantError("non-contiguous mapping has no single buffer; map with contiguous=True")
        return self.page(0)

    def page_location(self, index: int) -> tuple[memoryview, int]:
        # the whole table's view: one-page mappings of neighbouring refs merge into one iovec
        return self._table_view(), self.refs[index] * PAGE_SIZE

    def iovecs(self, extents: Sequence[tuple[int, int]] | None = None) -> list[memoryview]:
        return _table_iovecs(self._table, self._table_view(), self.refs, extents)

    def unmap(self) -> None:
        # Views already handed out keep pointing into the table (still mapped, still the frontend's
        # memory); the mapping itself refuses further use.
        if self._view is not None and self.on_unmap is not None:
            self.on_unmap()
        self._view = None


class _TableGrants(PersistentGrants):
    """A data plane's hold on a registered table. If the frontend registers a new table meanwhile,
    this keeps serving the old one: still its memory, still mapped, so still safe."""

    def __init__(self, table: _GrantTable) -> None:
        self._table: _GrantTable | None = table

    def iovecs(
        self, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, *, writable: bool
    ) -> list[memoryview]:
        table = self._table
        if table is None:
            raise GrantError("persistent grants already closed")
        return _table_iovecs(table, table.view if writable else table.ro_view, refs, extents)

    def close(self) -> None:
        self._table = None


class _ContiguousMapping(MmapGrantMapping):
    """A reserved range with each page replaced by the granted memfd page (MAP_FIXED)."""

    def __init__(self, table: _GrantTable, refs: tuple[int, ...], writable: bool) -> None:
        self.refs = refs
        self.writable = writable
        if table.fd < 0:
            raise GrantError("grant table closed")
        try:
            reservation = Reservation(len(refs))
        except OSError as exc:  # ENOMEM at the VMA limit: the cache's resource handling applies
            raise GrantError.from_oserror(exc, "cannot reserve room for grant pages") from exc
        try:
            for i, ref in enumerate(refs):
                reservation.place(i, table.fd, ref * PAGE_SIZE, 1, writable=writable)
        except OSError as exc:
            reservation.close()
            raise GrantError.from_oserror(exc, "mmap(MAP_FIXED) of grant page failed") from exc
        except BaseException:
            reservation.close()
            raise
        self._map: mmap.mmap | None = reservation.map
        assert self._map is not None  # placed without losing the range
        view = memoryview(self._map)
        self._view: memoryview | None = view if writable else view.toreadonly()
        self.on_unmap: Callable[[], None] | None = None

    def _after_munmap(self) -> None:
        if self.on_unmap is not None:
            self.on_unmap()


# --- event channels -------------------------------------------------------------------------------
def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class LocalEventChannel(EventChannel):
    """One end of an eventfd pair: we read `recv_fd`, the peer reads `send_fd`."""

    def __init__(self, local_port: int, recv_fd: int, send_fd: int) -> None:
        self.local_port = local_port
        self._recv = recv_fd
        self._send = send_fd
        self._lock = threading.Lock()
        self._poller = select.poll()  # one per channel: wait() runs once per batch of responses
        self._poller.register(recv_fd, select.POLLIN)

    def fileno(self) -> int:
        return self._recv

    def notify(self) -> None:
        with self._lock:
            if self._send < 0:
                raise TransportError("event channel closed", code="transport")
            os.write(self._send, _EVENT)

    def ack(self) -> bool:
        try:
            os.read(self._recv, 8)
        except BlockingIOError:
            return False
        return True

    def wait(self, timeout: float | None) -> bool:
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not self._poller.poll(ms):
            return False
        return self.ack()

    def close(self) -> None:
        with self._lock:
            for fd in (self._recv, self._send):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._recv = self._send = -1


@dataclass
class _Registration:
    tables: dict[int, _GrantTable] = field(default_factory=dict)
    ports: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)


class LocalTransport(Transport):
    """The engine side: serves the registry socket and maps/binds what frontends registered."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._tables: dict[int, _GrantTable] = {}
        self._ports: dict[tuple[int, int], tuple[int, int]] = {}  # (domid, port) -> (to_back, to_front)
        self._next_local_port = 1
        self._conns: dict[socket.socket, _Registration] = {}
        # What map_grants() has mapped and not yet unmapped, in pages, and how many map_grants()
        # calls there were: tests count these to prove caches start empty and end unmapped.
        self.mapped_pages = 0
        self.map_calls = 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        self._listener.listen(16)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="xbc-local-transport", daemon=True)
        self._thread.start()

    # -- Transport -------------------------------------------------------------------------------
    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        refs = tuple(refs)
        if not refs:
            raise GrantError("no grant refs to map")
        with self._lock:
            table = self._tables.get(domid)
        if table is None:
            raise GrantError(f"domain {domid} has no grant table registered")
        table.check(refs)
        mapping: _ContiguousMapping | _SlicedMapping
        if contiguous and len(refs) > 1:
            mapping = _ContiguousMapping(table, refs, writable)
        else:
            mapping = _SlicedMapping(table, refs, writable)
        pages = len(refs)

        def unmapped() -> None:
            with self._lock:
                self.mapped_pages -= pages

        mapping.on_unmap = unmapped
        with self._lock:
            self.mapped_pages += pages
            self.map_calls += 1
        return mapping

    def map_persistent(self, domid: int) -> PersistentGrants | None:
        with self._lock:
            table = self._tables.get(domid)
        if table is None:
            raise GrantError(f"domain {domid} has no grant table registered")
        return _TableGrants(table)

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        with self._lock:
            fds = self._ports.get((domid, remote_port))
            if fds is None:
                raise TransportError(
                    f"domain {domid} has no unbound event channel port {remote_port}", code="evtchn-bind"
                )
            local = self._next_local_port
            self._next_local_port += 1
            to_back, to_front = fds
            return LocalEventChannel(local, os.dup(to_back), os.dup(to_front))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for conn in list(self._conns):
            self._drop(conn)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    # -- registry server -------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closed:
            rlist: list[socket.socket | int] = [self._listener, self._wake_r, *self._conns]
            try:
                ready, _, _ = select.select(rlist, [], [])
            except OSError:
                return
            for obj in ready:
                if obj == self._wake_r:
                    return
                if obj is self._listener:
                    try:
                        conn, _ = self._listener.accept()
                    except OSError:
                        continue
                    self._conns[conn] = _Registration()
                elif isinstance(obj, socket.socket):
                    self._handle(obj)

    def _handle(self, conn: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, 65536, _MAX_FDS)
        except OSError:
            self._drop(conn)
            return
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop(conn)
            return
        try:
            self._apply(conn, data, fds)
            reply: dict[str, object] = {"ok": True}
        except (ValueError, KeyError, TypeError, OSError, TransportError) as exc:
            reply = {"ok": False, "error": str(exc)}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError):
            conn.send(json.dumps(reply).encode())

    def _apply(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise ValueError("message must be a JSON object")
        domid = int(msg["domid"])
        reg = self._conns[conn]
        op = msg.get("op")
        if op == "transport":
            if len(fds) != 1:
                raise ValueError("grant-table needs exactly one fd")
            table = _GrantTable(domid, fds[0])
            with self._lock:
                old = self._tables.get(domid)
                self._tables[domid] = table
            if old is not None:
                old.close()
            reg.tables[domid] = table
        elif op == "evtchn":
            if len(fds) != 2:
                raise ValueError("evtchn needs two fds (to backend, to frontend)")
            port = int(msg["port"])
            pair = (os.dup(fds[0]), os.dup(fds[1]))
            with self._lock:
                old_pair = self._ports.get((domid, port))
                self._ports[(domid, port)] = pair
            if old_pair is not None:
                for fd in old_pair:
                    os.close(fd)
            reg.ports[(domid, port)] = pair
        else:
            raise ValueError(f"unknown op {op!r}")

    def _drop(self, conn: socket.socket) -> None:
        reg = self._conns.pop(conn, None)
        conn.close()
        if reg is None:
            return
        with self._lock:
            for domid, table in reg.tables.items():
                if self._tables.get(domid) is table:
                    del self._tables[domid]
                table.close()
            for key, pair in reg.ports.items():
                if self._ports.get(key) == pair:
                    del self._ports[key]
                for fd in pair:
                    with contextlib.suppress(OSError):
                        os.close(fd)


# --- frontend side --------------------------------------------------------------------------------
class LocalDomainClient:
    """A frontend "domain": registers its grant memfd and event channel ports with the engine."""

    def __init__(self, socket_path: str, domid: int) -> None:
        self.domid = domid
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(socket_path)
        except OSError as exc:
            self._sock.close()
            raise TransportError.from_oserror(exc, f"cannot reach local transport at {socket_path}") from exc
        self._next_port = 1

    def _call(self, msg: dict[str, object], fds: list[int]) -> None:
        socket.send_fds(self._sock, [json.dumps(msg).encode()], fds)
        reply = json.loads(self._sock.recv(65536) or b"{}")
        if not reply.get("ok"):
            raise TransportError(f"local transport refused {msg.get('op')}: {reply.get('error')}")

    def register_grant_table(self, fd: int) -> None:
        self._call({"op": "transport", "domid": self.domid}, [fd])

    def alloc_unbound_port(self) -> LocalEventChannel:
        """Allocate a port (what the frontend writes to `event-channel`) and register it."""
        port = self._next_port
        self._next_port += 1
        to_back, to_front = _eventfd(), _eventfd()
        try:
            self._call({"op": "evtchn", "domid": self.domid, "port": port}, [to_back, to_front])
        except BaseException:
            os.close(to_back)
            os.close(to_front)
            raise
        return LocalEventChannel(port, to_front, to_back)

    def close(self) -> None:
        self._sock.close()


def map_memfd_pages(fd: int, refs: Sequence[int], *, writable: bool = True) -> GrantMapping:
    """Map pages `refs` of a sealed memfd into one contiguous range (the frontend's own ring view)."""
    table = _GrantTable(-1, fd)
    try:
        table.check(refs)
        return _ContiguousMapping(table, tuple(refs), writable)
    finally:
        table.close()


def create_grant_memfd(pages: int, name: str = "xbc-grants") -> int:
    """A sealed (no shrinking) memfd of `pages` pages, ready to register as a grant table."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, pages * PAGE_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EINVAL:
            raise TransportError("memfd sealing unsupported", code="transport", errno=exc.errno) from exc
        raise
    return fd
