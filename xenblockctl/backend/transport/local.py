"""The no-Xen transport: grants are pages of frontend memfds, event channels are eventfd pairs.

The engine process runs a small "hypervisor" registry on a unix SOCK_SEQPACKET socket (mode 0600:
root only). Each connection is one frontend acting for one domain (its first message names the
domain; every later one must name the same). As in Xen, a domain has ONE grant-ref space and ONE
event-channel port space, however many disks it has:

- `grant-table` registers a memfd as a piece of the domain's grant table. The registry places it
  at a free range of refs and replies with its `base`: page N of that memfd is grant ref base + N.
  The memfd must carry F_SEAL_SHRINK, or a frontend could truncate it under our mapping and kill
  the engine with SIGBUS. `regrant` swaps the memfd behind a piece this connection registered
  (same size): the same refs now name other memory, as a guest ending and re-granting them.
- `alloc-unbound` allocates an unbound event-channel port, unique in the domain (lowest free,
  from 1, as Xen's EVTCHNOP_alloc_unbound): the registry creates the eventfd pair and sends it
  with the reply.

So several disks of one domain can register in any order and each ring ref and port still names
exactly one disk's memory and eventfds.

Messages are one flat JSON object per datagram (at most MAX_MESSAGE bytes) with fds attached
(SCM_RIGHTS), and nothing else is accepted: every other shape, an unknown op, a float, a nested
value, a missing or extra key gets `{"ok": false, "code": ..., "error": ...}` and a log line,
and touches that connection alone. The reply to a good message is `{"ok": true, ...}`. The
registry is one thread on an epoll selector with non-blocking sends: a client that never reads
its replies stops being read (its queue is bounded) and stalls nobody else. Registrations vanish
when the connection closes (its "domain died"); mappings already made stay valid because they hold
the memory. The xenstore handshake is unchanged: the frontend still publishes `ring-ref*` and
`event-channel`, and the engine maps/binds them through this transport.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import select
import selectors
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.transport.base import (
    GNTST_BAD_COPY_ARG,
    GNTST_BAD_DOMAIN,
    GNTST_BAD_GNTREF,
    GNTST_BAD_VIRT_ADDR,
    GNTST_OKAY,
    WAIT_EVENTFD,
    Bounce,
    CopyItem,
    EventChannel,
    GrantError,
    GrantMapping,
    MmapGrantMapping,
    NativeCopier,
    NativeWaiter,
    PersistentGrants,
    Transport,
    TransportError,
    copy_segments,
    merge_extents,
)
from xenblockctl.backend.transport.fixedmap import Reservation
from xenblockctl.backend.transport.xen import COPY_SEGMENT_SIZE, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF
from xenblockctl.journal import Journal

_EVENT = struct.pack("=Q", 1)

#: LocalTransport(data_pages=...): see its docstring
_DATA_PAGES = ("table", "copy", "map")

# --- registry limits (each one refused with a coded reply and a log line) ---------------------------
#: largest request datagram; the largest valid one is under 80 bytes
MAX_MESSAGE = 512
#: fds one request may carry (a grant table: 1); more are refused
_MAX_FDS = 2
#: open registry connections (one per frontend ring in practice)
MAX_CONNECTIONS = 4096
#: grant table pieces and event channel ports per domain (Xen's 2-level ABI: 4096 ports)
MAX_SEGMENTS_PER_DOMAIN = 4096
MAX_PORTS_PER_DOMAIN = 4096
#: pages of one grant table piece (address space only: the memory is the frontend's)
MAX_SEGMENT_PAGES = 1 << 20
#: grant refs are 32-bit
_GREF_LIMIT = 1 << 32
#: domids a frontend may act for (below DOMID_FIRST_RESERVED)
MAX_DOMID = 0x7FEF
#: how long a client waits for the registry before giving up
CLIENT_TIMEOUT = 10.0
#: a refused accept (EMFILE...) pauses the listener this long instead of spinning on it
_ACCEPT_PAUSE = 0.5
#: refusal log lines per second before they are counted instead (a flood must not flood the journal)
_LOG_RATE = 20


class RegistryMessageError(TransportError):
    """A registry request that is not one of the known shapes (size, JSON, keys, types, fds)."""

    code = "transport-message"


class RegistryLimitError(TransportError):
    """A registry request refused because a limit is reached (connections, pieces, ports, refs)."""

    code = "transport-limit"


# --- mapping grants contiguously ------------------------------------------------------------------
# Xen's gntdev maps any list of grants into one contiguous range; a multi-page ring needs that. A
# fixedmap.Reservation (an anonymous range owned by a Python mmap object) gets each page replaced in
# place by the granted memfd page.


class _GrantTable:
    """One registered memfd: grant refs [base, base + pages) of its domain, mapped once in full."""

    def __init__(self, domid: int, fd: int, base: int = 0) -> None:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise TransportError(
                f"grant table fd is not a sealable memfd ({os.strerror(exc.errno or 0)})", code="transport"
            ) from exc
        if not seals & fcntl.F_SEAL_SHRINK:
            raise TransportError("grant table memfd must be sealed with F_SEAL_SHRINK", code="transport")
        if size < PAGE_SIZE or size % PAGE_SIZE:
            raise TransportError(f"grant table size {size} is not a positive page multiple", code="transport")
        if size // PAGE_SIZE > MAX_SEGMENT_PAGES:
            raise RegistryLimitError(f"grant table of {size // PAGE_SIZE} pages exceeds {MAX_SEGMENT_PAGES}")
        self.domid = domid
        self.pages = size // PAGE_SIZE
        self.place(base)
        self.fd = os.dup(fd)  # kept for MAP_FIXED remaps (contiguous mappings)
        # The whole table is mapped into an anonymous reservation (MAP_FIXED) rather than with
        # mmap.mmap(fd): CPython dup()s the fd of every file mmap, and one fd per piece is enough.
        try:
            reservation = Reservation(self.pages)
            try:
                reservation.place(0, self.fd, 0, self.pages, writable=True)
            except BaseException:
                reservation.close()
                raise
        except OSError as exc:
            os.close(self.fd)
            raise GrantError.from_oserror(exc, "cannot map the grant table") from exc
        except BaseException:
            os.close(self.fd)
            raise
        assert reservation.map is not None  # placed without losing the range
        self.map = reservation.map
        # The whole table stays mapped for as long as anything refers to it: the seal means it can
        # never shrink under us, so every request's pages are slices of these two views and mapping
        # a request costs no syscall and no per-page object (the local form of persistent grants).
        self.view = memoryview(self.map)
        self.ro_view = self.view.toreadonly()

    def place(self, base: int) -> None:
        """Put this piece at grant refs [base, base + pages) of its domain."""
        self.base = base
        self.end = base + self.pages  # an attribute, not a property: read on every request

    def holds(self, refs: Sequence[int]) -> bool:
        return bool(refs) and min(refs) >= self.base and max(refs) < self.end

    def check(self, refs: Sequence[int]) -> None:
        if not refs:
            raise GrantError("no grant refs to map")
        if min(refs) < self.base or max(refs) >= self.end:  # one C-level pass each, even for 4096 refs
            bad = next(ref for ref in refs if not self.base <= ref < self.end)
            raise GrantError(f"grant ref {bad} not granted by domain {self.domid}")

    def close(self) -> None:
        # Views handed out keep the mmap alive (it is unmapped by refcount when they go); only our
        # fd is dropped here.
        with contextlib.suppress(OSError):
            if self.fd >= 0:
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
        if first < table.base or last >= table.end:
            table.check(refs)  # raises, naming the first ref outside the table
        if extents is None:
            lo = (first - table.base) * PAGE_SIZE
            return [view[lo : lo + n * PAGE_SIZE]]
    else:
        table.check(refs)
    starts = [(ref - table.base) * PAGE_SIZE for ref in refs]
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
        start = (self.refs[index] - self._table.base) * PAGE_SIZE
        return self._table_view()[start : start + PAGE_SIZE]

    @property
    def buffer(self) -> memoryview:
        if len(self.refs) != 1:
            raise GrantError("non-contiguous mapping has no single buffer; map with contiguous=True")
        return self.page(0)

    def page_location(self, index: int) -> tuple[memoryview, int]:
        # the whole table's view: one-page mappings of neighbouring refs merge into one iovec
        return self._table_view(), (self.refs[index] - self._table.base) * PAGE_SIZE

    def iovecs(self, extents: Sequence[tuple[int, int]] | None = None) -> list[memoryview]:
        return _table_iovecs(self._table, self._table_view(), self.refs, extents)

    def unmap(self) -> None:
        # Views already handed out keep pointing into the table (still mapped, still the frontend's
        # memory); the mapping itself refuses further use.
        if self._view is not None and self.on_unmap is not None:
            self.on_unmap()
        self._view = None


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
                reservation.place(i, table.fd, (ref - table.base) * PAGE_SIZE, 1, writable=writable)
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


class _Domain:
    """One domain's grant-ref space (its registered pieces, sorted by base) and its ports.

    Pieces are replaced copy-on-write: `layout` (bases, pieces) is one tuple swapped in one store
    under the transport lock, so the data planes resolve refs without taking a lock and never see
    the bases of one layout with the pieces of another."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.layout: tuple[tuple[int, ...], tuple[_GrantTable, ...]] = ((), ())
        self.ports: dict[int, tuple[int, int]] = {}  # port -> (to_back, to_front) eventfds

    @property
    def pieces(self) -> tuple[_GrantTable, ...]:
        return self.layout[1]

    def empty(self) -> bool:
        return not self.pieces and not self.ports

    def set_pieces(self, pieces: list[_GrantTable]) -> None:
        pieces.sort(key=lambda t: t.base)
        self.layout = (tuple(t.base for t in pieces), tuple(pieces))

    def free_base(self, pages: int) -> int:
        """The lowest ref with `pages` free refs from it (first fit, so a domain's first piece
        starts at ref 0, as a one-disk guest's table does)."""
        start = 0
        for table in self.pieces:
            if table.base - start >= pages:
                break
            start = max(start, table.end)
        if start + pages > _GREF_LIMIT:
            raise RegistryLimitError(f"domain {self.domid} has no {pages} free grant refs")
        return start

    def table_for(self, refs: Sequence[int]) -> _GrantTable:
        """The one piece holding every ref; GrantError naming a ref that is not granted."""
        bases, pieces = self.layout
        i = bisect.bisect_right(bases, refs[0]) - 1
        if i >= 0 and pieces[i].holds(refs):
            return pieces[i]
        for ref in refs:
            j = bisect.bisect_right(bases, ref) - 1
            if j < 0 or not pieces[j].base <= ref < pieces[j].end:
                raise GrantError(f"grant ref {ref} not granted by domain {self.domid}")
        raise GrantError(
            f"grant refs {refs[0]}..{refs[-1]} of domain {self.domid} span separately registered grant"
            " tables; the local transport maps one request from one table"
        )

    def iovecs(
        self, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, writable: bool
    ) -> list[memoryview]:
        # Per request on the data path: one piece (a one-disk domain) costs nothing over a lone
        # table; with several, a bisect on the first ref. _table_iovecs checks every ref itself.
        bases, pieces = self.layout
        if not refs or not pieces:
            raise GrantError(
                "no grant refs to map" if not refs else f"domain {self.domid} has no grant table"
            )
        i = 0 if len(pieces) == 1 else max(0, bisect.bisect_right(bases, refs[0]) - 1)
        table = pieces[i]
        try:
            return _table_iovecs(table, table.view if writable else table.ro_view, refs, extents)
        except GrantError:
            if len(pieces) == 1:
                raise
        return self._iovecs_across(refs, extents, writable)

    def _iovecs_across(
        self, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, writable: bool
    ) -> list[memoryview]:
        # A request whose pages come from several pieces (legal in Xen: one grant table): one run
        # of iovecs per piece, every ref checked.
        out: list[memoryview] = []
        i = 0
        while i < len(refs):
            table = self.table_for(refs[i : i + 1])
            j = i + 1
            while j < len(refs) and table.base <= refs[j] < table.end:
                j += 1
            view = table.view if writable else table.ro_view
            out += _table_iovecs(table, view, refs[i:j], None if extents is None else extents[i:j])
            i = j
        return out

    def grant_copy(self, items: Sequence[CopyItem], to_guest: bool) -> list[int]:
        """What gntdev's grant copy does, with this domain's pieces as its grant table: each
        segment alone, a bad one (ref not granted, range outside its page) gets its GNTST_*
        status and moves nothing. Segments that continue each other on both sides (consecutive
        refs of one piece, as a frontend's fresh pool gives) move as one slice."""
        bases, pieces = self.layout  # one layout for the whole call, as the data path reads it
        statuses: list[int] = []
        # the pending run: table, its byte range, our bounce, our offset
        run: tuple[_GrantTable, int, int, Bounce, int] | None = None
        table: _GrantTable | None = None
        for refs, extents, bounce in items:
            n = len(refs)
            if extents is None and n > 1 and refs[-1] == refs[0] + n - 1:
                # whole consecutive pages of one piece (a fresh pool): one slice, both ends checked
                first = refs[0]
                i = bisect.bisect_right(bases, first) - 1
                if i >= 0 and first + n <= pieces[i].end and tuple(refs) == tuple(range(first, first + n)):
                    if run is not None:
                        _copy_run(run, to_guest)
                        run = None
                    lo = (first - pieces[i].base) * PAGE_SIZE
                    _copy_run((pieces[i], lo, lo + n * PAGE_SIZE, bounce, 0), to_guest)
                    statuses += [GNTST_OKAY] * n
                    continue
            for ref, offset, length, at in copy_segments(refs, extents):
                if offset < 0 or length <= 0 or offset + length > PAGE_SIZE:
                    statuses.append(GNTST_BAD_COPY_ARG)
                    continue
                if table is None or not table.base <= ref < table.end:
                    i = bisect.bisect_right(bases, ref) - 1
                    if i < 0 or ref >= pieces[i].end:
                        statuses.append(GNTST_BAD_GNTREF)
                        continue
                    table = pieces[i]
                lo = (ref - table.base) * PAGE_SIZE + offset
                statuses.append(GNTST_OKAY)
                if run is not None:
                    r_table, r_lo, r_hi, r_bounce, r_at = run
                    if r_table is table and r_hi == lo and r_bounce is bounce and r_at + r_hi - r_lo == at:
                        run = (table, r_lo, lo + length, bounce, r_at)
                        continue
                    _copy_run(run, to_guest)
                run = (table, lo, lo + length, bounce, at)
        if run is not None:
            _copy_run(run, to_guest)
        return statuses

    def copy_segments_at(self, segments: memoryview, bounce: Bounce) -> None:
        """What gntdev's ioctl does with an array of struct gntdev_grant_copy_segment whose local
        side lies in `bounce` (the native pass's, backend/_grantcopy.c): each segment alone, its
        status written into it; one outside the bounce buffer or this domain's pieces, or not
        inside its page, moves nothing."""
        bases, pieces = self.layout
        for at in range(0, len(segments) - COPY_SEGMENT_SIZE + 1, COPY_SEGMENT_SIZE):
            source, dest, length, flags = _SEGMENT.unpack_from(segments, at)
            to_guest = flags == GNTCOPY_DEST_GREF
            ours, foreign = (source, dest) if to_guest else (dest, source)
            ref, offset, domid = foreign & 0xFFFFFFFF, foreign >> 32 & 0xFFFF, foreign >> 48
            where = ours - bounce.address
            status = GNTST_OKAY
            if flags not in (GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF) or domid != self.domid:
                status = GNTST_BAD_DOMAIN
            elif length == 0 or offset + length > PAGE_SIZE:
                status = GNTST_BAD_COPY_ARG
            elif where < 0 or where + length > bounce.nbytes:
                status = GNTST_BAD_VIRT_ADDR
            else:
                i = bisect.bisect_right(bases, ref) - 1
                if i < 0 or ref >= pieces[i].end:
                    status = GNTST_BAD_GNTREF
                else:
                    lo = (ref - pieces[i].base) * PAGE_SIZE + offset
                    _copy_run((pieces[i], lo, lo + length, bounce, where), to_guest)
            _STATUS.pack_into(segments, at + _STATUS_AT, status)


#: struct gntdev_grant_copy_segment: source, dest (u64 each: an address or ref|offset<<32|domid<<48),
#: len, flags, then the status (s16) at byte 20
_SEGMENT = struct.Struct("=QQHH")
_STATUS = struct.Struct("=h")
_STATUS_AT = 20


def _copy_run(run: tuple[_GrantTable, int, int, Bounce, int], to_guest: bool) -> None:
    table, lo, hi, bounce, at = run
    if to_guest:
        table.view[lo:hi] = bounce.view[at : at + hi - lo]
    else:
        bounce.view[at : at + hi - lo] = table.view[lo:hi]


class _DomainGrants(PersistentGrants):
    """A data plane's hold on its domain's grant refs: every piece the domain has registered, as
    it is at each request (a re-granted ref names its new memory). Views handed out keep their
    memory mapped; after close() nothing more is handed out."""

    def __init__(self, domain: _Domain) -> None:
        self._domain: _Domain | None = domain

    def iovecs(
        self, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, *, writable: bool
    ) -> list[memoryview]:
        domain = self._domain
        if domain is None:
            raise GrantError("persistent grants already closed")
        return domain.iovecs(refs, extents, writable)

    def close(self) -> None:
        self._domain = None


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

    @property
    def send_fd(self) -> int:
        """The peer's end: what notify() writes (a native loop that notifies by itself writes it)."""
        return self._send

    def notify(self) -> None:
        with self._lock:
            if self._send < 0:
                raise TransportError("event channel closed", code="transport")
            # A full counter (the peer never reads) means an event is pending already: coalesced.
            with contextlib.suppress(BlockingIOError):
                os.write(self._send, _EVENT)

    def ack(self) -> bool:
        try:
            os.read(self._recv, 8)
        except BlockingIOError:
            return False
        return True

    def start_blocking(self) -> bool:
        """An eventfd has no mask and one counter: the fd goes blocking (its description is the
        registry's too; the registry never reads it, and every backend reads it only when poll()
        says it is readable or through take()), and interrupt() adds to the counter."""
        with self._lock:
            if self._recv < 0:
                return False
            os.set_blocking(self._recv, True)
            return True

    def take(self) -> bool:
        # no lock: this blocks, and the fd is closed only after the thread that takes has ended.
        # An interrupt() cannot be told from an event here: True either way (a spurious wake-up
        # costs the ring thread one look at the ring; it checks its stop flag first).
        os.read(self._recv, 8)
        return True

    def native_waiter(self) -> NativeWaiter | None:
        # as take() and notify(), on the fds themselves (closed only after the ring thread ended)
        if self._recv < 0 or self._send < 0 or os.get_blocking(self._recv) is False:
            return None
        return WAIT_EVENTFD, self._recv, self.local_port, self._send, 0

    def unmask(self) -> None:
        return  # an eventfd has no mask: the read that consumed the event is all the ack there is

    def interrupt(self) -> None:
        with self._lock:
            if self._recv >= 0:
                os.write(self._recv, _EVENT)

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


# --- the registry's requests ------------------------------------------------------------------------
# One flat JSON object (no nested object or array): checked on the raw bytes before json.loads, so
# no nesting depth, however deep, reaches the parser.
_FLAT_OBJECT = re.compile(rb"\{[^{}\[\]]*\}")
#: op -> (exact keys, fds it carries)
_SHAPES: dict[str, tuple[frozenset[str], int]] = {
    "grant-table": (frozenset({"op", "domid"}), 1),
    "regrant": (frozenset({"op", "domid", "base"}), 1),
    "alloc-unbound": (frozenset({"op", "domid"}), 0),
}


def _no_float(text: str) -> object:
    raise RegistryMessageError(f"number {text[:20]!r} is not an integer")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise RegistryMessageError(f"key {key!r} given twice")
        out[key] = value
    return out


@dataclass(frozen=True)
class RegistryRequest:
    op: str
    domid: int
    base: int = -1


def parse_request(data: bytes, nfds: int) -> RegistryRequest:
    """The one request `data` (with `nfds` fds attached) encodes; RegistryMessageError otherwise."""
    if len(data) > MAX_MESSAGE:
        raise RegistryMessageError(f"message longer than {MAX_MESSAGE} bytes")
    if not _FLAT_OBJECT.fullmatch(data):
        raise RegistryMessageError("message is not one flat JSON object")
    try:
        msg = json.loads(
            data, parse_float=_no_float, parse_constant=_no_float, object_pairs_hook=_no_duplicates
        )
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise RegistryMessageError(f"message is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise RegistryMessageError("message is not one flat JSON object")
    op = msg.get("op")
    if not isinstance(op, str) or op not in _SHAPES:
        raise RegistryMessageError(f"unknown op {str(op)[:40]!r}")
    shape = _SHAPES[op]
    keys, want_fds = shape
    if set(msg) != keys:
        raise RegistryMessageError(f"{op} takes exactly the keys {sorted(keys)}")
    if nfds != want_fds:
        raise RegistryMessageError(f"{op} carries {want_fds} fd(s), not {nfds}")
    ints = {}
    for key, bound in (("domid", MAX_DOMID), ("base", _GREF_LIMIT - 1)):
        if key in msg:
            value = msg[key]
            if type(value) is not int or not 0 <= value <= bound:
                raise RegistryMessageError(f"{key} must be an integer 0..{bound}")
            ints[key] = value
    return RegistryRequest(op, ints["domid"], ints.get("base", -1))


@dataclass
class _Conn:
    sock: socket.socket
    domid: int | None = None
    pieces: dict[int, _GrantTable] = field(default_factory=dict)  # base -> piece
    ports: set[int] = field(default_factory=set)
    #: replies not yet sent (bytes, fds to attach); while any is queued the connection is not read
    outq: deque[tuple[bytes, list[int]]] = field(default_factory=deque)


@dataclass(frozen=True)
class RegistryStats:
    connections: int
    domains: int
    grant_pages: int  # registered (not mapped) pages over all domains
    ports: int
    refused: int  # requests answered with an error since start


class LocalTransport(Transport):
    """The engine side: serves the registry socket and maps/binds what frontends registered."""

    def __init__(
        self, socket_path: str, *, journal: Journal | None = None, data_pages: str = "table"
    ) -> None:
        """`data_pages` says how a frontend without persistent grants has its data pages served:
        "table" (default) hands out slices of its grant table, mapped once (the fastest; no Xen
        transport can); "copy" copies them with `grant_copy` and "map" maps each request's pages,
        the two ways the Xen transport has, so host tests and benchmarks run the data plane's
        gntdev paths."""
        if data_pages not in _DATA_PAGES:
            raise ValueError(f"data_pages must be one of {_DATA_PAGES}")
        self.data_pages = data_pages
        self.copies_grants = data_pages == "copy"
        self.socket_path = socket_path
        self.journal = journal or Journal("xenblockctl-engine")
        self._lock = threading.Lock()
        self._domains: dict[int, _Domain] = {}
        self._next_local_port = 1
        self._conns: dict[int, _Conn] = {}  # by fd
        # What map_grants() has mapped and not yet unmapped, in pages, and how many map_grants()
        # calls there were: tests count these to prove caches start empty and end unmapped.
        self.mapped_pages = 0
        self.map_calls = 0
        self.copy_calls = 0
        self.refused = 0
        #: set (with a loud log line) if the registry thread ever dies; no frontend can then register
        self.failure: str | None = None
        self._log_budget = float(_LOG_RATE)
        self._log_stamp = time.monotonic()
        self._log_suppressed = 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        # ours to unlink at close only while it is still this socket: an engine taking over
        # (`backend --takeover`) binds the same path while we still serve
        self._socket_inode = os.stat(socket_path).st_ino
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._listening = True
        self._paused_until = 0.0
        self._closed = False
        self._released = False
        #: connections handed over by a predecessor, for the registry thread to serve
        self._adopted: list[_Conn] = []
        #: true once a predecessor's registry was adopted: its frontends' rings are live (issue 21)
        self.rings_outlive_engine = False
        self._thread = threading.Thread(target=self._serve, name="xbc-local-transport", daemon=True)
        self._thread.start()

    # -- Transport -------------------------------------------------------------------------------
    def _domain(self, domid: int) -> _Domain:
        with self._lock:
            domain = self._domains.get(domid)
        if domain is None or not domain.pieces:
            raise GrantError(f"domain {domid} has no grant table registered")
        return domain

    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        refs = tuple(refs)
        if not refs:
            raise GrantError("no grant refs to map")
        table = self._domain(domid).table_for(refs)
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
        if self.data_pages != "table":
            return None
        return _DomainGrants(self._domain(domid))

    def grant_copy(self, domid: int, items: Sequence[CopyItem], *, to_guest: bool) -> list[int]:
        with self._lock:
            domain = self._domains.get(domid)
            self.copy_calls += 1
        if domain is None:
            return [GNTST_BAD_DOMAIN] * sum(len(refs) for refs, _extents, _bounce in items)
        return domain.grant_copy(items, to_guest)

    def native_copier(self, domid: int, bounce: Bounce) -> NativeCopier | None:
        if not self.copies_grants:
            return None

        def copier(segments: memoryview) -> None:
            with self._lock:
                domain = self._domains.get(domid)
                self.copy_calls += 1
            if domain is None:  # gone: every segment fails, as grant_copy's
                for at in range(0, len(segments), COPY_SEGMENT_SIZE):
                    _STATUS.pack_into(segments, at + _STATUS_AT, GNTST_BAD_DOMAIN)
                return
            domain.copy_segments_at(segments, bounce)

        return -1, copier

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        with self._lock:
            domain = self._domains.get(domid)
            fds = None if domain is None else domain.ports.get(remote_port)
            if fds is None:
                raise TransportError(
                    f"domain {domid} has no unbound event channel port {remote_port}", code="evtchn-bind"
                )
            local = self._next_local_port
            self._next_local_port += 1
            to_back, to_front = fds
            return LocalEventChannel(local, os.dup(to_back), os.dup(to_front))

    def export(self, domid: int, remote_port: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        """What a worker process needs to serve one of `domid`'s rings itself (backend/workers.py):
        the domain's grant-table pieces as (base, fd) and the port's eventfd pair, as they are now.
        The fds stay the registry's: send them (SCM_RIGHTS copies them), never close them."""
        with self._lock:
            domain = self._domains.get(domid)
            fds = None if domain is None else domain.ports.get(remote_port)
            if domain is None or fds is None or not domain.pieces:
                raise TransportError(
                    f"domain {domid} has no grant table or no port {remote_port} to export",
                    code="evtchn-bind",
                )
            return [(t.base, t.fd) for t in domain.pieces], fds

    def stats(self) -> RegistryStats:
        with self._lock:
            domains = list(self._domains.values())
            return RegistryStats(
                connections=len(self._conns),
                domains=len(domains),
                grant_pages=sum(t.pages for d in domains for t in d.pieces),
                ports=sum(len(d.ports) for d in domains),
                refused=self.refused,
            )

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        self._stop_registry()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._socket_inode:
                os.unlink(self.socket_path)

    def _stop_registry(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join(timeout=5)

    # -- hand-over to a successor engine (`backend --takeover`) ------------------------------------
    # The registry is this transport's "hypervisor": the successor gets it whole, every frontend's
    # connection, grant table piece and event-channel pair, so its rings stay valid and the new
    # engine re-attaches to them as it does on Xen. Only after our rings are stopped (drained).
    def export_state(self) -> tuple[dict[str, object], list[int]]:
        """Stop the registry and describe it: (meta, fds), the fds ours to close once sent."""
        self._stop_registry()
        fds: list[int] = []
        domains: list[dict[str, object]] = []
        with self._lock:
            for domain in self._domains.values():
                pieces = []
                for table in domain.pieces:
                    pieces.append({"base": table.base, "fd": len(fds)})
                    fds.append(os.dup(table.fd))
                ports = []
                for port, (to_back, to_front) in domain.ports.items():
                    ports.append({"port": port, "fd": len(fds)})
                    fds += [os.dup(to_back), os.dup(to_front)]
                domains.append({"domid": domain.domid, "pieces": pieces, "ports": ports})
            conns = []
            for conn in self._conns.values():
                if conn.outq:
                    continue  # a reply it never read: it goes, as if its domain died
                conns.append(
                    {
                        "fd": len(fds),
                        "domid": conn.domid,
                        "pieces": sorted(conn.pieces),
                        "ports": sorted(conn.ports),
                    }
                )
                fds.append(os.dup(conn.sock.fileno()))
        return {"domains": domains, "conns": conns}, fds

    def adopt_state(self, meta: dict[str, object], fds: list[int]) -> None:
        """Take over a predecessor's registry (export_state's meta and fds; they are ours now).
        Before the engine's first rescan: its rings map and bind through what is adopted here."""
        try:
            self._adopt(meta, fds)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.rings_outlive_engine = True
        self.journal.info(
            f"local transport: adopted the previous engine's registry ({len(self._domains)} domain(s),"
            f" {len(self._conns)} connection(s))"
        )

    def _adopt(self, meta: dict[str, object], fds: list[int]) -> None:
        domains = meta.get("domains")
        conns = meta.get("conns")
        if not isinstance(domains, list) or not isinstance(conns, list):
            raise TransportError("not a local transport hand-over", code="handover")
        tables: dict[tuple[int, int], _GrantTable] = {}
        with self._lock:
            for entry in domains:
                domid = int(entry["domid"])
                domain = self._domains.setdefault(domid, _Domain(domid))
                pieces = list(domain.pieces)
                for piece in entry["pieces"]:
                    table = _GrantTable(domid, fds[int(piece["fd"])], int(piece["base"]))
                    tables[(domid, table.base)] = table
                    pieces.append(table)
                domain.set_pieces(pieces)
                for port in entry["ports"]:
                    i = int(port["fd"])
                    domain.ports[int(port["port"])] = (os.dup(fds[i]), os.dup(fds[i + 1]))
        adopted = []
        for entry in conns:
            sock = socket.socket(fileno=os.dup(fds[int(entry["fd"])]))
            sock.setblocking(False)
            conn = _Conn(sock, None if entry["domid"] is None else int(entry["domid"]))
            if conn.domid is not None:
                conn.pieces = {int(b): tables[(conn.domid, int(b))] for b in entry["pieces"]}
                conn.ports = {int(p) for p in entry["ports"]}
            adopted.append(conn)
        with self._lock:
            self._adopted += adopted
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"a")  # the registry thread registers them

    # -- registry server -------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never silently: the engine would look healthy without it
            if self._closed:
                return
            self.failure = f"{type(exc).__name__}: {exc}"
            self.journal.error(
                f"local transport registry died ({self.failure}): no frontend can register or"
                " reconnect until the engine restarts; running rings are not affected",
                traceback="".join(traceback.format_exception(exc)),
            )
            # New clients get ECONNREFUSED at once instead of waiting for a reply that never comes.
            with contextlib.suppress(OSError):
                self._listener.close()

    def _loop(self) -> None:
        while not self._closed:
            timeout = None
            if not self._listening:
                timeout = max(0.0, self._paused_until - time.monotonic())
            for key, _events in self._selector.select(timeout):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    if self._closed:
                        return
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                    self._register_adopted()
                else:
                    self._dispatch(key.fd)
            if not self._listening and time.monotonic() >= self._paused_until:
                self._selector.register(self._listener, selectors.EVENT_READ)
                self._listening = True

    def _register_adopted(self) -> None:
        with self._lock:
            adopted, self._adopted = self._adopted, []
        for conn in adopted:
            self._conns[conn.sock.fileno()] = conn
            self._selector.register(conn.sock, selectors.EVENT_READ)

    def _dispatch(self, fd: int) -> None:
        # A method of its own so that no frame of the idle loop keeps a departed connection (and
        # so its grant tables) alive while the thread waits.
        conn = self._conns.get(fd)
        if conn is None:
            return
        # By what it waits for, not by the events: a hang-up reports both.
        if conn.outq:
            self._flush(conn)
        else:
            self._receive(conn)

    def _refusal(self, message: str, **fields: object) -> None:
        """Log a refusal, at most _LOG_RATE lines a second (the rest are counted and reported)."""
        now = time.monotonic()
        self._log_budget = min(float(_LOG_RATE), self._log_budget + (now - self._log_stamp) * _LOG_RATE)
        self._log_stamp = now
        if self._log_budget < 1:
            self._log_suppressed += 1
            return
        self._log_budget -= 1
        if self._log_suppressed:
            message += f" ({self._log_suppressed} more refusals not logged)"
            self._log_suppressed = 0
        self.journal.warning(message, **fields)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EMFILE/ENFILE/ENOBUFS: the pending connection stays queued; stop polling the
            # listener for a moment instead of spinning on it.
            self._refusal(f"local transport: cannot accept a frontend connection: {exc}")
            self._selector.unregister(self._listener)
            self._listening = False
            self._paused_until = time.monotonic() + _ACCEPT_PAUSE
            return
        if len(self._conns) >= MAX_CONNECTIONS:
            self._refusal(f"local transport: refused a connection: {MAX_CONNECTIONS} connections open")
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self._conns[sock.fileno()] = conn
        self._selector.register(sock, selectors.EVENT_READ)

    def _receive(self, conn: _Conn) -> None:
        try:
            data, ancdata, flags, _ = conn.sock.recvmsg(
                MAX_MESSAGE + 1, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds += got.tolist()
        if not data and not fds:
            self._drop(conn)  # EOF: the "domain" is gone
            return
        reply: dict[str, object]
        out_fds: list[int] = []
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise RegistryMessageError(f"message longer than {MAX_MESSAGE} bytes or with too many fds")
            request = parse_request(data, len(fds))
            reply, out_fds = self._apply(conn, request, fds)
        except TransportError as exc:
            self.refused += 1
            self._refusal(
                f"local transport: refused a request of domain {conn.domid}: {exc.code}: {exc}",
                request=data[:80].decode("ascii", "backslashreplace"),
            )
            reply = {"ok": False, "code": exc.code, "error": str(exc)}
        except Exception as exc:  # a bug: this request fails, never the registry or another client
            self.refused += 1
            self.journal.error(
                f"local transport: internal error on a request of domain {conn.domid}: "
                f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc)),
            )
            reply = {"ok": False, "code": "internal", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        conn.outq.append((json.dumps(reply).encode(), out_fds))
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.outq:
            data, fds = conn.outq[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                conn.sock.sendmsg([data], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            conn.outq.popleft()
            for fd in fds:
                os.close(fd)
        # A client that does not read its replies is not read either: at most one reply is held
        # for it, and it stalls nobody else.
        want = selectors.EVENT_WRITE if conn.outq else selectors.EVENT_READ
        if self._selector.get_key(conn.sock).events != want:
            self._selector.modify(conn.sock, want)

    def _apply(
        self, conn: _Conn, req: RegistryRequest, fds: list[int]
    ) -> tuple[dict[str, object], list[int]]:
        if conn.domid is None:
            conn.domid = req.domid
        elif conn.domid != req.domid:
            raise RegistryMessageError(f"this connection acts for domain {conn.domid}, not {req.domid}")
        with self._lock:
            domain = self._domains.get(req.domid)
        if domain is None:
            domain = _Domain(req.domid)
        if req.op == "grant-table":
            if len(domain.pieces) >= MAX_SEGMENTS_PER_DOMAIN:
                raise RegistryLimitError(f"domain {req.domid} has {MAX_SEGMENTS_PER_DOMAIN} grant tables")
            table = _GrantTable(req.domid, fds[0])
            try:
                with self._lock:
                    table.place(domain.free_base(table.pages))
                    domain.set_pieces([*domain.pieces, table])
                    self._domains[req.domid] = domain
            except BaseException:
                table.close()
                raise
            conn.pieces[table.base] = table
            return {"ok": True, "base": table.base}, []
        if req.op == "regrant":
            old = conn.pieces.get(req.base)
            if old is None:
                raise RegistryMessageError(f"no grant table at ref {req.base} registered on this connection")
            table = _GrantTable(req.domid, fds[0], req.base)
            if table.pages != old.pages:
                table.close()
                raise RegistryMessageError(f"regrant of {table.pages} pages over a table of {old.pages}")
            with self._lock:
                domain.set_pieces([t for t in domain.pieces if t is not old] + [table])
            conn.pieces[req.base] = table
            old.close()
            return {"ok": True, "base": req.base}, []
        # alloc-unbound
        with self._lock:
            used = domain.ports
            if len(used) >= MAX_PORTS_PER_DOMAIN:
                raise RegistryLimitError(f"domain {req.domid} has {MAX_PORTS_PER_DOMAIN} ports")
            port = next(p for p in range(1, MAX_PORTS_PER_DOMAIN + 2) if p not in used)
            pair = (_eventfd(), _eventfd())
            used[port] = pair
            self._domains[req.domid] = domain
        conn.ports.add(port)
        # the reply carries copies; ours stay in the port table for bind_interdomain
        return {"ok": True, "port": port}, [os.dup(pair[0]), os.dup(pair[1])]

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        for _data, fds in conn.outq:
            for fd in fds:
                os.close(fd)
        conn.outq.clear()
        if conn.domid is None:
            return
        with self._lock:
            domain = self._domains.get(conn.domid)
            if domain is not None:
                gone = set(map(id, conn.pieces.values()))
                domain.set_pieces([t for t in domain.pieces if id(t) not in gone])
                for port in conn.ports:
                    for fd in domain.ports.pop(port, ()):
                        with contextlib.suppress(OSError):
                            os.close(fd)
                if domain.empty():
                    del self._domains[conn.domid]
        for table in conn.pieces.values():
            table.close()


# --- frontend side --------------------------------------------------------------------------------
class LocalDomainClient:
    """A frontend acting for one domain: registers grant memfds and allocates event channel ports.

    Every call waits at most `timeout` seconds for the registry's reply (TransportError after)."""

    def __init__(self, socket_path: str, domid: int, *, timeout: float | None = None) -> None:
        self.domid = domid
        self.timeout = CLIENT_TIMEOUT if timeout is None else timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    self._sock.connect(socket_path)
                    break
                except BlockingIOError:  # listen backlog full: the registry is behind (or stuck)
                    if time.monotonic() > deadline:
                        raise TransportError(
                            f"local transport at {socket_path} did not accept within {self.timeout:g} s",
                            code="transport",
                        ) from None
                    time.sleep(0.01)
        except OSError as exc:
            self._sock.close()
            raise TransportError.from_oserror(exc, f"cannot reach local transport at {socket_path}") from exc
        except BaseException:
            self._sock.close()
            raise

    def _call(self, msg: dict[str, object], fds: Sequence[int]) -> tuple[dict[str, object], list[int]]:
        op = msg.get("op")
        try:
            socket.send_fds(self._sock, [json.dumps(msg).encode()], list(fds))
            data, ancdata, _flags, _addr = self._sock.recvmsg(
                4096, socket.CMSG_SPACE(2 * 4), socket.MSG_CMSG_CLOEXEC
            )
        except TimeoutError as exc:
            raise TransportError(
                f"local transport did not answer {op} within {self.timeout:g} s", code="transport"
            ) from exc
        except OSError as exc:
            raise TransportError.from_oserror(exc, f"local transport {op}") from exc
        got: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds_in = array.array("i")
                fds_in.frombytes(payload[: len(payload) - len(payload) % fds_in.itemsize])
                got += fds_in.tolist()
        if not data:
            for fd in got:
                os.close(fd)
            raise TransportError(f"local transport closed the connection instead of answering {op}")
        try:
            reply = json.loads(data)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            for fd in got:
                os.close(fd)
            raise TransportError(
                f"local transport sent a bad reply to {op}: {exc}", code="transport"
            ) from exc
        if reply.get("ok") is not True:
            for fd in got:
                os.close(fd)
            code = reply.get("code")
            error = TransportError(f"local transport refused {op}: {code}: {reply.get('error')}")
            if code in ("transport", "transport-message", "transport-limit", "grant-map", "evtchn-bind"):
                error.code = str(code)
            raise error
        return reply, got

    def _int(self, reply: dict[str, object], key: str, fds: list[int]) -> int:
        value = reply.get(key)
        if type(value) is not int:
            for fd in fds:
                os.close(fd)
            raise TransportError(f"local transport reply lacks an integer {key!r}", code="transport")
        return value

    def register_grant_table(self, fd: int) -> int:
        """Register a sealed memfd; returns its base: page N is grant ref base + N."""
        reply, got = self._call({"op": "grant-table", "domid": self.domid}, [fd])
        return self._int(reply, "base", got)

    def regrant(self, base: int, fd: int) -> None:
        """Put memfd `fd` (same size) behind the grant table registered at `base`."""
        self._call({"op": "regrant", "domid": self.domid, "base": base}, [fd])

    def alloc_unbound_port(self) -> LocalEventChannel:
        """Allocate a port (what the frontend writes to `event-channel`): the registry picks a port
        number unique in the domain and sends the eventfd pair."""
        reply, got = self._call({"op": "alloc-unbound", "domid": self.domid}, [])
        port = self._int(reply, "port", got)
        if len(got) != 2:
            for fd in got:
                os.close(fd)
            raise TransportError("local transport sent no eventfd pair with the port", code="transport")
        to_back, to_front = got
        return LocalEventChannel(port, to_front, to_back)

    def close(self) -> None:
        self._sock.close()


def map_memfd_pages(fd: int, pages: Sequence[int], *, writable: bool = True) -> GrantMapping:
    """Map `pages` (page numbers) of a sealed memfd into one contiguous range (the frontend's own
    ring view)."""
    table = _GrantTable(-1, fd)
    try:
        table.check(pages)
        return _ContiguousMapping(table, tuple(pages), writable)
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


class ImportedDomain(Transport):
    """One domain's grant tables and one of its ports, as LocalTransport.export() gave them to a
    worker process: maps and binds for that domain as LocalTransport does. Pieces registered or
    re-granted after the hand-off are not seen (the worker keeps the memory it was given): a limit
    of the no-Xen transport only; on Xen a worker maps through its own gntdev."""

    def __init__(
        self, domid: int, pieces: Sequence[tuple[int, int]], port: int, evtchn: tuple[int, int]
    ) -> None:
        self.domid = domid
        self.port = port
        self._domain = _Domain(domid)
        tables: list[_GrantTable] = []
        try:
            for base, fd in pieces:
                tables.append(_GrantTable(domid, fd, base))  # dups fd: the caller closes its own
            self._evtchn = (os.dup(evtchn[0]), os.dup(evtchn[1]))
        except BaseException:
            for table in tables:
                table.close()
            raise
        self._domain.set_pieces(tables)

    def _check(self, domid: int) -> None:
        if domid != self.domid:
            raise GrantError(f"this worker serves domain {self.domid}, not {domid}")

    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        self._check(domid)
        refs = tuple(refs)
        if not refs:
            raise GrantError("no grant refs to map")
        table = self._domain.table_for(refs)
        if contiguous and len(refs) > 1:
            return _ContiguousMapping(table, refs, writable)
        return _SlicedMapping(table, refs, writable)

    def map_persistent(self, domid: int) -> PersistentGrants | None:
        self._check(domid)
        return _DomainGrants(self._domain)

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        self._check(domid)
        if remote_port != self.port:
            raise TransportError(f"port {remote_port} was not handed to this worker", code="evtchn-bind")
        return LocalEventChannel(remote_port, os.dup(self._evtchn[0]), os.dup(self._evtchn[1]))

    def close(self) -> None:
        for table in self._domain.pieces:
            table.close()
        for fd in self._evtchn:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._evtchn = (-1, -1)
