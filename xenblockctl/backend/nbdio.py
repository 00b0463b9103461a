"""The engine serving an NBD export itself: a pipelined NBD connection in place of a device fd.

`NbdTarget` is what the data plane and the xenbus state machine read of a target (size, block
sizes, read-only, discard) for an export, plus the connection rules that outlive one ring:
- the export's identity as first verified (size and transmission flags): a reconnect is accepted
  only to an export with the same size and flags, else the device stays failed;
- acknowledged writes not yet covered by a completed NBD_CMD_FLUSH: if the connection is lost
  while there are any, the server may have lost them, so the guest's next flush is answered with an
  error (once), never with success. That is the durability a guest gets: a write is durable when a
  flush that followed its acknowledgement succeeded, exactly as on a disk with a volatile cache.

`NbdExecutor` has the interface of `io.Executor` (run_now / submit / drain / close / in_flight), so
a data plane runs on it unchanged. Requests are pipelined by cookie on one connection (several
connections would be allowed only with CAN_MULTI_CONN, and one is enough for a ring): the ring
thread sends, one reader thread receives replies straight into the guest's pages and completes
requests. A blkif request longer than the server's maximum payload is split; it completes when all
its parts have, with the first error.

Mapped honestly:
- READ/WRITE -> NBD_CMD_READ/WRITE; FLUSH -> NBD_CMD_FLUSH, and feature-flush-cache is advertised
  only if the server sent SEND_FLUSH; a FLUSH carrying data writes it and then flushes.
- barriers are not advertised: blkif's barrier orders against every request, which NBD cannot
  express, and Linux blkfront uses flush instead.
- discard -> NBD_CMD_TRIM only if the server sent SEND_TRIM (never "secure").
- a lost or stalled connection (no reply within `request_timeout` while requests are in flight)
  fails every in-flight request with an error, and new ones until a reconnect succeeds: never a
  silent success. Reconnects are tried at most every `reconnect_interval` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xenblockctl.backend import blkif
from xenblockctl.backend.io import DiscardMode, InFlight
from xenblockctl.backend.requests import BARRIER, DISCARD, FLUSH, READ, DeviceLimits, IoPlan
from xenblockctl.nbd import proto, uri
from xenblockctl.nbd.client import ExportInfo, NbdClient, handshake, open_socket, recv_exact, socket_identity
from xenblockctl.nbd.errors import NbdError
from xenblockctl.nbd.uri import NbdUri
from xenblockctl.xenstore.identity import NbdOwnerRecord

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0
RECONNECT_INTERVAL = 1.0
CONNECT_TIMEOUT = 5.0
#: how often the reader looks at the clock while waiting for replies
_TICK = 0.25

Completion = Callable[[int], None]


@dataclass
class NbdTarget:
    """An export the engine serves, as verified at open. Shared by every data plane of the device."""

    uri: NbdUri
    info: ExportInfo
    writable: bool
    request_timeout: float = REQUEST_TIMEOUT
    reconnect_interval: float = RECONNECT_INTERVAL
    #: a connection was lost with acknowledged, unflushed writes: the next flush must fail
    lost_writes: bool = False
    #: set when a reconnect found another export: the device stays failed
    refused: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: the one connection every queue of the device shares, and how many queues hold it
    _shared: NbdExecutor | None = field(default=None, repr=False)
    _users: int = field(default=0, repr=False)

    # -- what the xenbus state machine advertises ------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self.info.size

    @property
    def sectors(self) -> int:
        return self.info.size // blkif.SECTOR_SIZE

    @property
    def logical_block_size(self) -> int:
        return blkif.SECTOR_SIZE

    @property
    def physical_block_size(self) -> int:
        return min(max(self.info.preferred_block, blkif.SECTOR_SIZE), blkif.PAGE_SIZE)

    @property
    def read_only(self) -> bool:
        return self.info.read_only or not self.writable

    @property
    def discard(self) -> DiscardMode:
        if self.read_only or not self.info.has(proto.TFLAG_SEND_TRIM):
            return DiscardMode.NONE
        return DiscardMode.NBD_TRIM

    @property
    def discard_granularity(self) -> int:
        return max(self.info.min_block, blkif.SECTOR_SIZE)

    discard_secure = False

    def limits(
        self,
        *,
        flush: bool = True,
        barrier: bool = True,
        discard: bool = True,
        max_indirect_segments: int = blkif.DEFAULT_MAX_INDIRECT_SEGMENTS,
    ) -> DeviceLimits:
        del barrier  # never for NBD: see the module docstring
        return DeviceLimits(
            sectors=self.sectors,
            logical_block_size=self.logical_block_size,
            read_only=self.read_only,
            flush=flush and self.info.has(proto.TFLAG_SEND_FLUSH),
            barrier=False,
            discard=discard and self.discard is not DiscardMode.NONE,
            discard_secure=False,
            max_indirect_segments=max_indirect_segments,
        )

    def executor(self, *, workers: int = 0, name: str = "xbc-nbd") -> NbdExecutor:
        """The device's one pipelined connection, shared by all its queues (multi-queue). One
        connection because a guest's flush must cover the writes completed on every queue, and
        NBD promises that across connections only with CAN_MULTI_CONN; one is enough to keep a
        server busy. Each caller's close() lets go; the last one closes the connection."""
        del workers  # one connection, pipelined: no worker pool
        with self.lock:
            if self._shared is None:
                self._shared = NbdExecutor(self, name=name)
            self._users += 1
            return self._shared

    def _let_go(self, executor: NbdExecutor) -> bool:
        """True if `executor`'s last user let go (the caller closes the connection)."""
        with self.lock:
            if self._shared is not executor:
                return True  # not shared through executor() (tests make their own)
            self._users -= 1
            if self._users > 0:
                return False
            self._shared = None
            return True

    def connect(self) -> socket.socket:
        """A new connection in transmission to the same export, or NbdError: `nbd-export-changed`
        (and the target refused for good) when size or flags differ from what was verified."""
        sock = open_socket(self.uri, CONNECT_TIMEOUT)
        try:
            info = handshake(sock, self.uri, CONNECT_TIMEOUT)
            if (info.size, info.flags) != (self.info.size, self.info.flags):
                why = (
                    f"the export changed: size {info.size} flags {info.flags:#x}, verified at open as"
                    f" size {self.info.size} flags {self.info.flags:#x}"
                )
                with self.lock:
                    self.refused = why
                raise NbdError(why, code="nbd-export-changed")
        except BaseException:
            sock.close()
            raise
        return sock


def open_published(record: NbdOwnerRecord, params: str | None, *, writable: bool) -> NbdTarget:
    """The export an owner record (kind=nbd) names, verified by our own handshake: the engine's
    counterpart of comparing BLKGETDISKSEQ with the published luid. There is no diskseq on the
    wire, so what the block script published is compared instead: the canonical URI (and that it
    is the backend's `params`), the size, the transmission flags, the mode, and for a unix socket
    the socket file's (st_dev, st_ino, st_ctime_ns), read before connecting and again after the
    handshake.
    Any difference is NbdError `nbd-export-mismatch` (the engine refuses the device); an
    unreachable or refusing server is the client's own coded NbdError."""
    export = uri.parse(record.uri)
    if export.canonical() != record.uri:
        raise _mismatch(f"the owner record's URI {record.uri!r} is not in canonical form")
    wanted = uri.parse(params).canonical() if params is not None and uri.looks_like_nbd(params) else None
    if wanted != record.uri:
        raise _mismatch(f"the owner record names {record.uri}, the backend's params {str(params)[:200]!r}")
    if record.mode != ("w" if writable else "r"):
        raise _mismatch(f"the owner record was published for mode {record.mode}, the backend's mode differs")
    before = socket_identity(export)
    with NbdClient.connect(export, CONNECT_TIMEOUT) as conn:
        info = conn.info
    after = socket_identity(export)
    differences = []
    if info.size != record.size:
        differences.append(f"size {info.size}, published {record.size}")
    if info.flags != record.flags:
        differences.append(f"flags {info.flags:#x}, published {record.flags:#x}")
    if before != after:
        differences.append("the socket was replaced during the handshake")
    elif after != record.socket:
        differences.append(f"socket file {_ino(after)}, published {_ino(record.socket)}")
    if writable and info.read_only:
        differences.append("the export is read-only now, the disk is writable")
    if differences:
        raise _mismatch(
            f"not the export the block script published ({'; '.join(differences)}): the export at"
            f" {record.uri} was replaced; refusing to give the guest the wrong disk"
        )
    return NbdTarget(export, info, writable)


def _mismatch(why: str) -> NbdError:
    return NbdError(why, code="nbd-export-mismatch")


def _ino(ident: tuple[int, int, int] | None) -> str:
    """dev:inode:ctime of a socket file, as the record spells it."""
    return "none" if ident is None else ":".join(f"{n:x}" for n in ident)


#: one NBD request to send: (command, command flags, offset, length, buffers)
_Piece = tuple[int, int, int, int, list[memoryview]]


@dataclass
class _Request:
    """One blkif request: its parts in flight, the first error, and who to tell."""

    plan: IoPlan
    done: Completion
    parts: int
    status: int = blkif.RSP_OKAY
    #: sent once every part so far succeeded (a FLUSH with data and no FUA: the flush that makes
    #: the write durable must follow the write's reply, as NBD may reorder requests in flight)
    then: list[_Piece] = field(default_factory=list)
    #: slices of the guest's page views we made (a split): released before the data plane's own
    slices: list[memoryview] = field(default_factory=list)


@dataclass
class _Part:
    request: _Request
    command: int
    bufs: list[memoryview]  # READ: where the reply's data goes
    length: int
    sent: float
    covers: int = 0  # FLUSH: the count of acknowledged writes when it was sent


class NbdExecutor:
    """Runs a data plane's plans on one pipelined NBD connection (see the module docstring)."""

    def __init__(self, target: NbdTarget, *, name: str = "xbc-nbd") -> None:
        self.target = target
        self.name = name
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._parts: dict[int, _Part] = {}
        self._tracked = InFlight(name)
        self._cookie = 0
        self._sock: socket.socket | None = None
        self._last_attempt = float("-inf")
        self._reader: threading.Thread | None = None
        #: held while (re)connecting, so that queues sharing this connection wait for one attempt
        #: instead of failing their request because another queue's attempt is in progress
        self._connecting = threading.Lock()
        #: writes acknowledged on this connection, and how many of them a completed flush covers
        self._acked = 0
        self._flushed = 0

    # -- the Executor interface ------------------------------------------------------------------
    def run_now(self, plan: IoPlan, bufs: list[memoryview]) -> int | None:
        del plan, bufs
        return None  # everything is pipelined through submit

    @property
    def in_flight(self) -> int:
        return self._tracked.count

    def submit(self, plan: IoPlan, bufs: list[memoryview], done: Completion) -> None:
        self._tracked.enter()
        try:
            status = self._send(plan, bufs, done)
        except BaseException:
            status = blkif.RSP_ERROR
            log.exception("%s: sending %s failed", self.name, plan.kind.value)
        if status is not None:
            self._tracked.leave(done, status)

    def drain(self, timeout: float | None = None) -> bool:
        return self._tracked.drain(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """One queue lets go: drain (every queue's requests: they share the connection) and, for
        the last queue, close the connection."""
        if not self.target._let_go(self):
            return self._tracked.drain(timeout)
        if not self._tracked.close(timeout):
            return False
        with self._cond:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError), self._send_lock:
                sock.settimeout(1.0)
                sock.sendall(proto.pack_request(proto.CMD_DISC, 0, 0, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5)
        return True

    # -- sending ---------------------------------------------------------------------------------
    def _complete(self, request: _Request) -> None:
        for view in request.slices:
            view.release()
        self._tracked.leave(request.done, request.status)

    def _connected(self) -> socket.socket | None:
        """The live connection, reconnecting at most every reconnect_interval (ring threads)."""
        with self._cond:
            if self._sock is not None:
                return self._sock
        with self._connecting:
            return self._connect_locked()

    def _connect_locked(self) -> socket.socket | None:
        target = self.target
        with self._cond:
            if self._sock is not None:
                return self._sock
            if target.refused is not None:
                return None
            now = time.monotonic()
            if now - self._last_attempt < target.reconnect_interval:
                return None
            self._last_attempt = now
        try:
            sock = target.connect()
        except NbdError as exc:
            log.error("%s: cannot (re)connect to %s: %s", self.name, target.uri.canonical(), exc.one_line())
            return None
        sock.settimeout(_TICK)
        with self._cond:
            self._sock = sock
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock,), name=f"{self.name}-rx", daemon=True
        )
        self._reader.start()
        return sock

    def _send(self, plan: IoPlan, bufs: list[memoryview], done: Completion) -> int | None:
        """Send `plan`'s NBD requests; a status if it is answered at once (an error or a no-op)."""
        target = self.target
        kind = plan.kind
        if kind is BARRIER:
            log.error("%s: refusing a barrier: not advertised for an NBD export", self.name)
            return blkif.RSP_EOPNOTSUPP
        if kind is DISCARD and target.discard is DiscardMode.NONE:
            return blkif.RSP_EOPNOTSUPP
        if kind is FLUSH and not target.info.has(proto.TFLAG_SEND_FLUSH):
            return blkif.RSP_EOPNOTSUPP
        if kind is FLUSH and not bufs:
            with target.lock:
                lost, target.lost_writes = target.lost_writes, False
            if lost:
                log.error(
                    "%s: failing a flush: writes acknowledged before the NBD connection was lost were"
                    " never flushed, so their durability is unknown",
                    self.name,
                )
                return blkif.RSP_ERROR
        sock = self._connected()
        if sock is None:
            why = target.refused or "no connection to the NBD server"
            log.warning(
                "%s: %s of %d bytes at %d failed: %s", self.name, kind.value, plan.length, plan.offset, why
            )
            return blkif.RSP_ERROR
        pieces = self._pieces(plan, bufs)
        then: list[_Piece] = []
        if kind is FLUSH and bufs and not target.info.has(proto.TFLAG_SEND_FUA):
            then = [pieces.pop()]  # the trailing flush waits for the write's reply
        originals = {id(b) for b in bufs}
        slices = [b for piece in pieces for b in piece[4] if id(b) not in originals]
        # parts + 1: the sender's own hold. A reply can arrive (and complete the request, releasing
        # the guest's pages) while sendmsg() still holds those pages: the request completes only
        # when every part is answered AND the sender let go.
        request = _Request(plan, done, len(pieces) + 1, then=then, slices=slices)
        self._send_pieces(sock, request, pieces)
        return None

    def _send_pieces(self, sock: socket.socket, request: _Request, pieces: list[_Piece]) -> None:
        """Send `pieces` of `request` (whose `parts` counts them plus one hold for this call)."""
        try:
            self._send_locked(sock, request, pieces)
        finally:
            self._part_done(request)

    def _send_locked(self, sock: socket.socket, request: _Request, pieces: list[_Piece]) -> None:
        with self._send_lock:
            for sent, (command, flags, offset, length, part_bufs) in enumerate(pieces):
                with self._cond:
                    self._cookie += 1
                    cookie = self._cookie
                    self._parts[cookie] = _Part(
                        request, command, part_bufs, length, time.monotonic(), covers=self._acked
                    )
                header = proto.pack_request(command, cookie, offset, length, flags)
                try:
                    if command == proto.CMD_WRITE:
                        _sendmsg_all(sock, [memoryview(header), *part_bufs])
                    else:
                        sock.sendall(header)
                except OSError as exc:
                    self._lost(sock, f"send failed: {exc}")
                    with self._cond:  # the pieces never sent will never be answered
                        request.status = blkif.RSP_ERROR
                        request.parts -= len(pieces) - sent - 1
                    return

    def _pieces(self, plan: IoPlan, bufs: list[memoryview]) -> list[_Piece]:
        """The NBD requests of `plan`, writes and reads split at the server's maximum payload. A
        FLUSH with data (REQ_PREFLUSH|REQ_FUA) is a flush covering the writes completed before it,
        then its write with FUA, or without FUA its write and a flush after it (`then`)."""
        kind = plan.kind
        if kind is DISCARD:
            return [(proto.CMD_TRIM, 0, plan.offset, plan.length, [])]
        info = self.target.info
        out: list[_Piece] = []
        if kind is FLUSH:
            out.append((proto.CMD_FLUSH, 0, 0, 0, []))
            if not bufs:
                return out
        command = proto.CMD_READ if kind is READ else proto.CMD_WRITE
        flags = proto.CMD_FLAG_FUA if kind is FLUSH and info.has(proto.TFLAG_SEND_FUA) else 0
        limit = max(info.max_payload // blkif.SECTOR_SIZE * blkif.SECTOR_SIZE, blkif.SECTOR_SIZE)
        offset = plan.offset
        for chunk in _split(bufs, limit):
            n = sum(b.nbytes for b in chunk)
            out.append((command, flags, offset, n, chunk))
            offset += n
        if kind is FLUSH and not flags:
            out.append((proto.CMD_FLUSH, 0, 0, 0, []))
        return out

    # -- receiving -------------------------------------------------------------------------------
    def _read_loop(self, sock: socket.socket) -> None:
        header = bytearray(proto.SIMPLE_REPLY.size)
        try:
            while True:
                if not recv_exact(sock, memoryview(header), self._stalled):
                    self._lost(sock, "connection closed by the server")
                    return
                magic, error, cookie = proto.SIMPLE_REPLY.unpack(header)
                if magic != proto.SIMPLE_REPLY_MAGIC:
                    self._lost(sock, f"bad reply magic {magic:#x}")
                    return
                with self._cond:
                    part = self._parts.pop(cookie, None)
                if part is None:
                    self._lost(sock, f"reply for unknown cookie {cookie}")
                    return
                if part.command == proto.CMD_READ and not error:
                    for buf in part.bufs:
                        if not recv_exact(sock, buf, self._stalled):
                            self._lost(sock, "connection closed in the middle of read data", part)
                            return
                self._finish(part, error)
        except _Stalled as exc:
            self._lost(sock, str(exc))
        except OSError as exc:
            self._lost(sock, f"receive failed: {exc}")

    def _stalled(self) -> None:
        """Called on every receive tick: raise _Stalled if the oldest request waits too long."""
        timeout = self.target.request_timeout
        with self._cond:
            if self._tracked.closed and not self._parts:
                raise _Stalled("closed")
            oldest = min((p.sent for p in self._parts.values()), default=None)
        if oldest is not None and time.monotonic() - oldest > timeout:
            raise _Stalled(f"no reply within {timeout:g} s")

    def _finish(self, part: _Part, error: int) -> None:
        request = part.request
        if error:
            name = proto.ERROR_NAMES.get(error, f"error {error}")
            plan = request.plan
            log.warning(
                "%s: NBD %s of %d bytes at %d failed: %s",
                self.name,
                plan.kind.value,
                part.length,
                plan.offset,
                name,
            )
            request.status = blkif.RSP_EOPNOTSUPP if error == proto.ENOTSUP else blkif.RSP_ERROR
        with self._cond:
            if not error and part.command == proto.CMD_WRITE:
                self._acked += 1
            elif not error and part.command == proto.CMD_FLUSH:
                self._flushed = max(self._flushed, part.covers)
        self._part_done(request)

    def _part_done(self, request: _Request) -> None:
        """One part of `request` answered (or the sender's hold let go): complete it after the
        last, or first send what waits for the others (`then`)."""
        with self._cond:
            request.parts -= 1
            if request.parts:
                return
            then, sock = request.then, self._sock
            request.then = []
            if then and request.status == blkif.RSP_OKAY and sock is not None:
                request.parts = len(then) + 1
            else:
                then = []
        if then and sock is not None:
            self._send_pieces(sock, request, then)
            return
        self._complete(request)

    def _lost(self, sock: socket.socket, why: str, current: _Part | None = None) -> None:
        """The connection is gone: fail everything in flight on it, remember unflushed writes."""
        with self._cond:
            if self._sock is sock:
                self._sock = None
            parts = list(self._parts.values())
            self._parts.clear()
            unflushed = self._acked - self._flushed
            self._acked = self._flushed = 0
            closing = self._tracked.closed
        if current is not None:
            parts.append(current)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if closing and not parts:
            return
        writes_in_flight = any(p.command == proto.CMD_WRITE for p in parts)
        if unflushed or writes_in_flight:
            with self.target.lock:
                self.target.lost_writes = True
        log.error(
            "%s: NBD connection to %s lost (%s): %d request(s) in flight fail%s",
            self.name,
            self.target.uri.canonical(),
            why,
            len({id(p.request) for p in parts}),
            "; the next flush fails too (acknowledged writes were not flushed)" if unflushed else "",
        )
        for part in parts:
            part.request.status = blkif.RSP_ERROR
            part.request.then = []
            self._part_done(part.request)


class _Stalled(Exception):
    pass


def _split(bufs: list[memoryview], limit: int) -> list[list[memoryview]]:
    """`bufs` cut into runs of at most `limit` bytes (a buffer is sliced where a run ends)."""
    runs: list[list[memoryview]] = [[]]
    room = limit
    for whole in bufs:
        buf = whole
        while buf.nbytes > room:
            runs[-1].append(buf[:room])
            buf = buf[room:]
            runs.append([])
            room = limit
        if buf.nbytes:
            runs[-1].append(buf)
            room -= buf.nbytes
        if room == 0:
            runs.append([])
            room = limit
    return [run for run in runs if run]


def _sendmsg_all(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Send all of `bufs`, releasing every slice it takes of them (see nbd.client.recv_exact)."""
    taken: list[memoryview] = []
    try:
        while bufs:
            try:
                n = sock.sendmsg(bufs)
            except TimeoutError:
                continue  # the tick timeout applies to receives; a send just waits for room
            while bufs and n >= bufs[0].nbytes:
                n -= bufs[0].nbytes
                bufs = bufs[1:]
            if n:
                rest = bufs[0][n:]
                taken.append(rest)
                bufs = [rest, *bufs[1:]]
    finally:
        for view in taken:
            view.release()
