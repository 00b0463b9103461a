"""The shared ring (ring.h) over a writable buffer: the back ring we serve and the front ring we test with.

Everything the guest writes is hostile. The back ring reads `req_prod` once per check, refuses any
value that would put more than RING_SIZE requests outstanding (a jump forward or any move backward),
and from then on is *broken*: it hands out no more requests, so a malicious index can never cause an
endless loop or a slot outside the ring. Each request slot is copied out of shared memory exactly
once (`bytes(...)`) and only the copy is decoded (double-fetch rule).

Memory ordering. Python cannot emit fences, so this is what we rely on:
- Index fields are read and written through a `memoryview.cast("I")`: CPython copies a native `I`
  item with a 4-byte memcpy, which compilers emit as one aligned 32-bit load/store; on x86 that is
  single-copy atomic, so we never see a torn index (the `struct` module's standard-size formats read
  byte by byte and could tear: do not use them for indices).
- x86 is TSO: stores become visible in program order and loads are not reordered with older loads,
  so ring.h's wmb()/rmb() are compiler barriers only, and the interpreter is an opaque function
  call boundary. The one reordering x86 does is a later load passing an earlier store (the store
  buffer): exactly the mb() in "set req_event, then re-read req_prod" and "publish rsp_prod, then
  read rsp_event". For those we call `full_fence()`, which takes and releases an uncontended
  lock (fastlock.py: one that reads no clock): glibc's semaphore fast path is a LOCK-prefixed
  cmpxchg/xadd, a full barrier on x86.
- The buffer is an mmap (gntdev or the local memfd), so the CPU, not Python, owns its coherence.
Other architectures (arm64) are weaker than this; the engine is only built for x86 dom0s today.

Re-attach (issue 21). The ring lives in the frontend's memory, so it outlives the engine process: a
successor maps it again and must work out, from shared memory alone, which requests the dead engine
took but never answered. Two rules make that possible:
- Responses are published in ring order. A response goes into the slot at `rsp_prod_pvt`, which
  held a request: answered out of order, request k's slot could receive the answer to request m
  while k is still running, and a successor could then neither re-run k (its slot is gone) nor
  tell that m was answered. So an answer that finishes early is held until every request consumed
  before it is answered; then slot k always holds request k or response k, and "answered" is a
  prefix of the ring. (A slow request delays the answers behind it on the same ring.)
- Each response is journalled in the header's padding (offsets 32-59 of the 64-byte header: past
  the 4 bytes old ring.h called `pvt`, which netfront and blktap once used; blkfront zeroes the
  padding and never reads it). Three words and a copy of one response: MAGIC (ours: set once at
  attach, after COMMITTED and TAG), COMMITTED (every slot in [rsp_prod, COMMITTED) holds its whole
  response), TAG and the response bytes (the response of slot TAG). Slot k is answered as: bytes,
  TAG = k, slot k, COMMITTED = k + 1. A process killed anywhere leaves slots [rsp_prod, COMMITTED)
  answered, and slot COMMITTED either untouched (TAG names another slot: the bytes were written
  before TAG) or being written with the journalled bytes (TAG == COMMITTED): the successor finishes
  that write from the journal, exactly as the dead engine would have.
A successor's BackRing therefore publishes [rsp_prod, COMMITTED (+1)) as answered (`recovered`) and
starts consuming there: what lies between it and req_prod are requests taken but not answered (or
not taken at all), and it runs them again. Why that is safe, and what a guest can observe: see
handover.py.
The journal is in guest memory like everything else: a guest that forges it can only make us
publish its own slots as responses to itself, within the bounds checked below.
"""

from __future__ import annotations

import os
import struct
import sys
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Final

from xenblockctl.backend.blkif import PAGE_SIZE, SRING_HEADER_SIZE, Abi, Request, Response, ring_size
from xenblockctl.backend.fastlock import fast_lock
from xenblockctl.errors import XenblockError

_MASK: Final = 0xFFFFFFFF  # RING_IDX is a free-running unsigned 32-bit counter
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 1, 2, 3

#: (answers, ring buffer, rsp_prod_pvt, ring size, id offset) -> the new rsp_prod_pvt: writes a run
#: of answers that are next in ring order (BackRing.respond_run; _fastpass.respond)
RunWriter = Callable[[list[tuple[int, int, int]], memoryview, int, int, int], int]

#: in a list so a forked child can replace it: fastlock's semaphore lives in shared memory, and a
#: child must get its own, never share the parent's
_FENCE_LOCK = [fast_lock()]


def _fence_after_fork() -> None:
    _FENCE_LOCK[0] = fast_lock()


os.register_at_fork(after_in_child=_fence_after_fork)

#: the response journal in the header's padding (32-bit word indices into the header, byte offset)
_JOURNAL_MAGIC_WORD, _JOURNAL_COMMITTED_WORD, _JOURNAL_TAG_WORD, _JOURNAL_RESPONSE = 8, 9, 10, 44
#: "xbcJ": a journal we wrote (a frontend zeroes the padding when it initialises the ring)
JOURNAL_MAGIC: Final = 0x4A636278


def full_fence() -> None:
    """A full memory barrier on x86 (see the module docstring for why this works)."""
    lock = _FENCE_LOCK[0]
    lock.acquire()
    lock.release()


class RingBroken(XenblockError):
    """The frontend moved an index impossibly; the ring must be torn down (Linux: -EACCES)."""

    code = "blkif-ring-broken"


def init_shared_ring(buf: memoryview) -> None:
    """SHARED_RING_INIT (frontend side): producers 0, events 1, header padding zeroed."""
    buf[:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE)
    idx = buf[:16].cast("I")
    try:
        idx[_REQ_EVENT] = 1
        idx[_RSP_EVENT] = 1
    finally:
        idx.release()


class _RingBase:
    """Common geometry: validates the buffer and exposes the four header indices atomically."""

    def __init__(self, buf: memoryview, abi: Abi, nr_pages: int) -> None:
        if buf.readonly:
            raise ValueError("the shared ring must be writable")
        if buf.nbytes < nr_pages * PAGE_SIZE:
            raise ValueError(f"ring buffer of {buf.nbytes} bytes is smaller than {nr_pages} pages")
        self.abi = abi
        self.nr_pages = nr_pages
        self.size = ring_size(nr_pages, abi)
        self._entry = abi.entry_size
        self._buf = buf
        self._idx = buf[:16].cast("I")
        self._entries = buf[SRING_HEADER_SIZE : SRING_HEADER_SIZE + self.size * self._entry]

    def release(self) -> None:
        """Drop our views so the owner can unmap the buffer (mmap.close refuses while views exist)."""
        self._idx.release()
        self._entries.release()
        hdr = getattr(self, "_hdr", None)
        if hdr is not None:
            hdr.release()

    def _slot(self, idx: int) -> int:
        return (idx & (self.size - 1)) * self._entry

    # Raw header access (also used by tests and by a deliberately hostile frontend).
    @property
    def req_prod(self) -> int:
        return int(self._idx[_REQ_PROD])

    @property
    def req_event(self) -> int:
        return int(self._idx[_REQ_EVENT])

    @property
    def rsp_prod(self) -> int:
        return int(self._idx[_RSP_PROD])

    @property
    def rsp_event(self) -> int:
        return int(self._idx[_RSP_EVENT])


class BackRing(_RingBase):
    """The backend's view: consumes requests, produces responses.

    Not thread-safe: one thread (the queue's ring thread, or callers holding its lock) drives it.
    """

    def __init__(self, buf: memoryview, abi: Abi, nr_pages: int) -> None:
        super().__init__(buf, abi, nr_pages)
        # BACK_RING_ATTACH at the current rsp_prod: a reconnecting frontend's ring continues there.
        start = self.rsp_prod
        self.req_cons = start
        self.rsp_prod_pvt = start
        self._rsp_pushed = start  # our own copy: the guest may scribble over the shared rsp_prod
        #: the ring index of slot 0 of the last take_slots() copy
        self.taken_at = start
        self._pack_response = abi.response_struct.pack_into
        # the id of every slot of a copied batch, in one C-level pass
        self._ids = struct.Struct(f"={abi.id_offset}xQ{abi.entry_size - abi.id_offset - 8}x").iter_unpack
        #: x86_64 (every id 8-aligned in the copy): the ids as a strided view of 64-bit words, iterated
        #: in C (2.5x cheaper than iter_unpack's tuples; x86 is little-endian, as `=` is there)
        self._id_words = (
            (abi.id_offset // 8, abi.entry_size // 8)
            if abi.id_offset % 8 == 0 and abi.entry_size % 8 == 0 and sys.byteorder == "little"
            else None
        )
        self._hdr = buf[:SRING_HEADER_SIZE].cast("I")
        #: ids of the consumed requests not yet written back, in ring order from rsp_prod_pvt
        self._order: deque[int] = deque()
        #: answers that finished before an older request: (id, operation, status) by ring index
        self._held: dict[int, tuple[int, int, int]] = {}
        self.broken: str | None = None
        req_prod = self.req_prod
        # blkback refuses a ring that already claims more than RING_SIZE outstanding requests.
        if ((req_prod - start) & _MASK) > self.size:
            self.broken = f"req_prod {req_prod} is more than {self.size} ahead of rsp_prod {start}"
            self.release()
            raise RingBroken(f"ill-behaved frontend at connect: {self.broken}")
        #: the ring was in use before we attached (a re-attach, or a frontend reusing its ring)
        self.resumed = bool(start or req_prod)
        #: responses a previous engine wrote but did not publish, published by our first push
        self.recovered = self._recover(start, req_prod)
        #: requests between them and req_prod at attach: taken by a previous engine and not
        #: answered, or not taken yet; either way we run them now
        self.outstanding_at_attach = (req_prod - self.req_cons) & _MASK

    def _recover(self, start: int, req_prod: int) -> int:
        """Adopt the journal a previous engine left (module docstring), or start one: the count of
        slots from `start` that hold its complete responses (0 without a usable journal)."""
        hdr = self._hdr
        outstanding = (req_prod - start) & _MASK
        committed = int(hdr[_JOURNAL_COMMITTED_WORD])
        n = (committed - start) & _MASK
        if hdr[_JOURNAL_MAGIC_WORD] != JOURNAL_MAGIC or n > outstanding:
            # none, or not about this ring's outstanding slots (a forged or stale one): ours from
            # here, with nothing answered; the magic goes last, so a kill in between leaves none
            hdr[_JOURNAL_MAGIC_WORD] = 0
            hdr[_JOURNAL_COMMITTED_WORD] = start
            hdr[_JOURNAL_TAG_WORD] = (start - 1) & _MASK
            hdr[_JOURNAL_MAGIC_WORD] = JOURNAL_MAGIC
            return 0
        if n < outstanding and hdr[_JOURNAL_TAG_WORD] == committed:
            # killed while writing slot `committed`: finish it from the journal, as it would have
            size = self.abi.response_size
            at = (committed & (self.size - 1)) * self._entry
            self._entries[at : at + size] = self._buf[_JOURNAL_RESPONSE : _JOURNAL_RESPONSE + size]
            committed = (committed + 1) & _MASK
            hdr[_JOURNAL_COMMITTED_WORD] = committed
            n += 1
        self.req_cons = self.rsp_prod_pvt = committed
        return n

    def _mark_broken(self, why: str) -> None:
        if self.broken is None:
            self.broken = why

    @property
    def in_flight(self) -> int:
        """Requests consumed but not yet answered."""
        return (self.req_cons - self.rsp_prod_pvt) & _MASK

    def unconsumed(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS with the overflow guard; 0 forever once broken."""
        if self.broken is not None:
            return 0
        req_prod = self.req_prod  # one atomic read; everything below uses this value
        ahead = (req_prod - self.req_cons) & _MASK
        # A sane frontend never has more than RING_SIZE requests outstanding against our responses
        # (this also catches req_prod moving backwards: `ahead` becomes huge).
        if ahead + self.in_flight > self.size:
            self._mark_broken(
                f"req_prod {req_prod} impossible: req_cons {self.req_cons}, "
                f"rsp_prod_pvt {self.rsp_prod_pvt}, ring size {self.size}"
            )
            return 0
        return ahead

    def take_slots(self, limit: int | None = None) -> tuple[bytes, int]:
        """Copy out up to `limit` unconsumed request slots and consume them: `(copy, count)`.

        Slot i of the batch is `copy[i * entry_size : (i + 1) * entry_size]`. The slots are copied
        with one memcpy (two when the batch wraps around the ring end), so every byte of every slot
        is read from shared memory exactly once; decode only the copy.
        """
        n = self.unconsumed()
        if limit is not None:
            n = min(n, limit)
        if n <= 0:
            return b"", 0
        entry = self._entry
        first = self.req_cons & (self.size - 1)
        head = min(n, self.size - first)  # slots before the ring end
        data = bytes(self._entries[first * entry : (first + head) * entry])
        if head < n:
            data += bytes(self._entries[: (n - head) * entry])
        self._owe(data)
        self.taken_at = self.req_cons
        self.req_cons = (self.req_cons + n) & _MASK
        return data, n

    def lend(self) -> tuple[memoryview, int, int, int] | None:
        """The ring for a native loop that takes, answers and pushes by itself (grantcopy.NativeCopy
        .loop, with the same rules: the overflow check, one copy of each slot, this journal):
        `(buffer, req_cons, rsp_prod_pvt, rsp_pushed)`, or None while it may not have it — a
        request is outstanding (a worker answers it, or an answer is held), so the response side
        is not the loop's alone, or the ring is broken. Until `settle()` nothing else may touch
        the ring (the caller holds what serialises its answers)."""
        if self.broken is not None or self.req_cons != self.rsp_prod_pvt or self._held or self._order:
            return None
        return self._buf, self.req_cons, self.rsp_prod_pvt, self._rsp_pushed

    def settle(
        self, req_cons: int, rsp_prod_pvt: int, rsp_pushed: int, data: bytes | None, index: int
    ) -> None:
        """Take back the ring from the loop `lend()` gave it to, with the indices it left. `data`:
        the copy of the last slots it took and did not all answer (those from slot `index` on are
        outstanding, in ring order, as take_slots() leaves them), or None."""
        self.req_cons = req_cons & _MASK
        self.rsp_prod_pvt = rsp_prod_pvt & _MASK
        self._rsp_pushed = rsp_pushed & _MASK
        if data is None:
            return
        entry = self._entry
        count = len(data) // entry
        self.taken_at = (self.req_cons - count) & _MASK
        self._owe(data[index * entry : count * entry])

    def _owe(self, slots: bytes) -> None:
        """Record the ids of taken `slots` (whole entries, in ring order) as answers owed, in
        that order (take_slots(), and settle() for what the native loop took and left)."""
        words = self._id_words
        if words is not None:
            self._order.extend(memoryview(slots).cast("Q")[words[0] :: words[1]])
        else:
            self._order.extend([t[0] for t in self._ids(slots)])

    def take_requests(self, limit: int | None = None) -> list[bytes]:
        """Like take_slots, one bytes object per slot."""
        data, n = self.take_slots(limit)
        e = self._entry
        return [data[i * e : (i + 1) * e] for i in range(n)]

    def take_decoded(self, limit: int | None = None) -> list[Request]:
        return [self.abi.decode_request(raw) for raw in self.take_requests(limit)]

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if there is work; otherwise req_event is armed.

        Call before sleeping on the event channel; a request published between the two reads is
        caught by the second one.
        """
        if self.unconsumed():
            return True
        if self.broken is not None:
            return False
        self._idx[_REQ_EVENT] = (self.req_cons + 1) & _MASK
        full_fence()
        return self.unconsumed() > 0

    def respond(self, rid: int, operation: int, status: int) -> None:
        """Answer the oldest consumed request with id `rid` (not yet visible: call push_responses).

        Written into its slot once every older request is answered (ring order: see the module
        docstring); the whole `struct blkif_response` is packed, padding bytes as zeros (XSA-216).
        """
        self.respond_all(((rid, operation, status),))

    def respond_all(self, answers: Sequence[tuple[int, int, int]]) -> None:
        """`respond(rid, operation, status)` for each answer in order, in one loop (a ring pass
        answers up to 64 requests at once). An answer for no outstanding request is our bug: it
        raises, and the answers before it in `answers` stand."""
        order, held = self._order, self._held
        pack, entries, entry, mask = self._pack_response, self._entries, self._entry, self.size - 1
        hdr, buf = self._hdr, self._buf
        pvt = self.rsp_prod_pvt
        try:
            for given in answers:
                answer = given
                if held or not order or order[0] != given[0]:
                    # not the oldest: find its request (the oldest unanswered with this id), hold it
                    at = self._position(given[0], pvt)
                    if at is None:
                        raise XenblockError(
                            f"response to request {given[0]}, which is not outstanding", code="internal"
                        )
                    held[(pvt + at) & _MASK] = given
                    if at:
                        continue
                    answer = held.pop(pvt)
                # write it back, then every held answer it was holding up
                while True:
                    rid, operation, status = answer
                    pack(buf, _JOURNAL_RESPONSE, rid, operation, status)
                    hdr[_JOURNAL_TAG_WORD] = pvt
                    pack(entries, (pvt & mask) * entry, rid, operation, status)
                    pvt = (pvt + 1) & _MASK
                    hdr[_JOURNAL_COMMITTED_WORD] = pvt
                    order.popleft()
                    if not held or (nxt := held.pop(pvt, None)) is None:
                        break
                    answer = nxt
        finally:
            self.rsp_prod_pvt = pvt

    def respond_run(self, answers: list[tuple[int, int, int]], at: int, write: RunWriter | None) -> None:
        """respond_all for answers to the requests taken at ring indices at, at + 1, ... in that
        order (a run of one take_slots() copy: index taken_at + slot). When the first of them is
        the oldest unanswered request and nothing is held, they are next in ring order by
        construction (no id to look up), and `write` — the native pass's _fastpass.respond, the
        same journal protocol in C — writes them straight into their slots; otherwise, or without
        `write`, respond_all does."""
        pvt = self.rsp_prod_pvt
        n = len(answers)
        if write is None or self._held or pvt != at or n > len(self._order):
            self.respond_all(answers)
            return
        self.rsp_prod_pvt = write(answers, self._buf, pvt, self.size, self.abi.id_offset)
        order = self._order
        if n == len(order):  # the usual case: the pass answered everything outstanding
            order.clear()
        else:  # in C either way; a loop of popleft() cost ~0.1 µs an answer
            self._order = deque(islice(order, n, None))

    def _position(self, rid: int, pvt: int) -> int | None:
        """Where the oldest unanswered request with id `rid` is, counted from `pvt`."""
        order, held = self._order, self._held
        at = -1
        while True:
            try:
                at = order.index(rid, at + 1)
            except ValueError:
                return None
            if (pvt + at) & _MASK not in held:
                return at

    @property
    def held(self) -> int:
        """Answers waiting for an older request to finish."""
        return len(self._held)

    def put_response(self, rsp: Response) -> None:
        self.respond(rsp.id, rsp.operation, rsp.status)

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish rsp_prod; True if the frontend wants an event."""
        old = self._rsp_pushed
        new = self.rsp_prod_pvt
        if old == new:
            return False
        # Response slots were stored before this store; TSO keeps that order (wmb()).
        self._idx[_RSP_PROD] = new
        self._rsp_pushed = new
        full_fence()  # mb(): the rsp_event load must not pass the rsp_prod store
        rsp_event = self.rsp_event
        return ((new - rsp_event) & _MASK) < ((new - old) & _MASK)


class FrontRing(_RingBase):
    """The frontend's view (our test/sandbox blkfront): produces requests, consumes responses."""

    def __init__(self, buf: memoryview, abi: Abi, nr_pages: int, *, init: bool = True) -> None:
        super().__init__(buf, abi, nr_pages)
        if init:
            init_shared_ring(buf)
        # a response, then the rest of its slot skipped: iter_unpack walks a run of copied slots
        self._response_slots = struct.Struct(
            abi.response_struct.format + f"{abi.entry_size - abi.response_size}x"
        )
        self.req_prod_pvt = self.req_prod
        self.rsp_cons = self.rsp_prod

    @property
    def free_slots(self) -> int:
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _MASK)

    def put_request_bytes(self, slot_image: bytes) -> None:
        """Write a raw slot image at req_prod_pvt (any bytes: hostile tests use this directly)."""
        if self.free_slots <= 0:
            raise XenblockError("front ring full", code="frontend")
        off = self._slot(self.req_prod_pvt)
        self._entries[off : off + self._entry] = slot_image[: self._entry].ljust(self._entry, b"\0")
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _MASK

    def put_request(self, req: Request) -> None:
        self.put_request_bytes(self.abi.encode_request(req))

    def put_segment_request(
        self, operation: int, rid: int, sector: int, segments: Sequence[tuple[int, int, int]]
    ) -> None:
        """put_request(SegmentRequest(...)) packed straight into the slot, no objects in between."""
        if self.free_slots <= 0:
            raise XenblockError("front ring full", code="frontend")
        self.abi.pack_segment_request_into(
            self._entries, self._slot(self.req_prod_pvt), operation, rid, sector, segments=segments
        )
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _MASK

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old = self.req_prod
        new = self.req_prod_pvt
        self._idx[_REQ_PROD] = new
        full_fence()
        req_event = self.req_event
        return ((new - req_event) & _MASK) < ((new - old) & _MASK)

    def put_request_slots(self, images: bytes | memoryview, count: int) -> None:
        """Copy `count` prebuilt slot images (`count * entry_size` bytes) to the ring at
        req_prod_pvt: one copy, two where they wrap round the ring end; published by
        push_requests(). A benchmark frontend's batch path (bench/batch_frontend.py)."""
        entry = self._entry
        if count > self.free_slots or len(images) < count * entry:
            raise XenblockError(f"{count} slots do not fit the front ring or the images", code="frontend")
        first = self.req_prod_pvt & (self.size - 1)
        head = min(count, self.size - first)
        self._entries[first * entry : (first + head) * entry] = images[: head * entry]
        if head < count:
            self._entries[: (count - head) * entry] = images[head * entry : count * entry]
        self.req_prod_pvt = (self.req_prod_pvt + count) & _MASK

    def take_response_slots(self) -> tuple[bytes, int]:
        """Consume all published responses as one copy of their whole slots: `(copy, count)`
        (the response is the first `response_size` bytes of each `entry_size` slot)."""
        # Bound by the ring size so a broken backend cannot make us loop forever either.
        n = min((self.rsp_prod - self.rsp_cons) & _MASK, self.size)
        if n == 0:
            return b"", 0
        entry = self._entry
        first = self.rsp_cons & (self.size - 1)
        head = min(n, self.size - first)
        data = bytes(self._entries[first * entry : (first + head) * entry])
        if head < n:
            data += bytes(self._entries[: (n - head) * entry])
        self.rsp_cons = (self.rsp_cons + n) & _MASK
        return data, n

    def take_responses(self) -> list[Response]:
        """Consume all published responses (copied in one go, then decoded)."""
        data, _n = self.take_response_slots()
        return [Response(*fields) for fields in self._response_slots.iter_unpack(data)]

    def final_check_for_responses(self) -> bool:
        if (self.rsp_prod - self.rsp_cons) & _MASK:
            return True
        self._idx[_RSP_EVENT] = (self.rsp_cons + 1) & _MASK
        full_fence()
        return ((self.rsp_prod - self.rsp_cons) & _MASK) != 0

    # Hostile helpers: write any header value.
    def poke_index(self, which: str, value: int) -> None:
        names = {
            "req_prod": _REQ_PROD,
            "req_event": _REQ_EVENT,
            "rsp_prod": _RSP_PROD,
            "rsp_event": _RSP_EVENT,
        }
        self._idx[names[which]] = value & _MASK

    def slot_bytes(self, idx: int) -> bytes:
        off = self._slot(idx)
        return bytes(self._entries[off : off + self._entry])
