"""One blkif queue served end to end: ring + event channel + executor, on its own thread.

The xenbus state machine creates a `DataPlane` when the frontend is Initialised/Connected (after it
has read `ring-ref*`, `ring-page-order`, `event-channel` and `protocol`), calls `start()`, then
publishes Connected. On teardown (frontend Closing/Closed, `online`=0) it calls `stop()`, which
takes no new requests, drains in-flight I/O, pushes the last responses, and unmaps the ring. The
device fd is the engine's: a frontend reconnect creates a new DataPlane on the same DeviceTarget.

Per ring pass the thread copies up to 64 request slots out of shared memory in one go, validates
each copy (requests.validate_slot), and runs small cached reads right there (RWF_NOWAIT; see
io.Executor) while anything that would block goes to the I/O workers. The answers finished in the
pass are published with one push and at most one event, as the frontend's rsp_event asks (a pass
of large requests after the ring thread slept for want of requests: once per fastpath.CUT_BYTES,
so the frontend refills while the rest copies); workers answer their own requests as they
complete. Where the native fast path is built and applies
(backend/fastpath.py: persistent grants, an io.Executor), it serves the pass's runs of simple cached
READs/WRITEs from the same copy, and everything else still comes through here. With a blocking
wake-up and a native pass (that one, or grant copy's), the whole cycle — wait, take, serve, answer,
push, notify, final check — runs in one native loop while nothing is outstanding elsewhere
(_loop_natively, ring_loop.h), and comes back here for whatever that pass does not serve.

Data pages: when the frontend negotiated persistent grants (`RingParams.persistent`), every
transport goes through the ring's GrantCache (backend/grantcache.py): map on first use, keep until
stop(). Otherwise the local transport hands out slices of the frontend's whole grant table, mapped
once (transport.base.PersistentGrants), and Xen copies them (backend/grantcopy.py: one grant copy
out of the guest's pages for all of a pass's WRITEs, one into them for all its finished READs), or
maps and unmaps each request's pages where gntdev has no grant copy.

If the frontend breaks the ring (impossible indices) the thread stops taking requests and calls
`on_broken(reason)`; the engine should then write the error node and go to Closing, like
`xenbus_dev_fatal()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import PAGE_SIZE, Abi
from xenblockctl.backend.errorlog import ErrorResponses
from xenblockctl.backend.fastlock import fast_lock
from xenblockctl.backend.fastpath import CUT_BYTES, EXIT_CHECK, EXIT_OSERROR, FastPass
from xenblockctl.backend.grantcache import DEFAULT_MAX_PERSISTENT_GRANTS, GrantCache, Lease
from xenblockctl.backend.grantcopy import BouncePool, NativeCopy, Staged, failures
from xenblockctl.backend.io import DeviceTarget, Executor
from xenblockctl.backend.nbdio import NbdExecutor, NbdTarget
from xenblockctl.backend.requests import (
    BARRIER,
    READ,
    DeviceLimits,
    IoPlan,
    Rejection,
    Verdict,
    validate_slot,
)
from xenblockctl.backend.ring import BackRing, RingBroken
from xenblockctl.backend.ringgroup import RingGroup, RingGroups, Seat
from xenblockctl.backend.transport.base import (
    GNTST_OKAY,
    Bounce,
    EventChannel,
    GrantError,
    GrantMapping,
    NativeWaiter,
    PersistentGrants,
    Transport,
    gntst_name,
)
from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.numbers import NodeValueError, parse_uint

log = logging.getLogger(__name__)

#: requests taken from the ring per batch before we look at completions again
_BATCH = 64
#: requests the native loop answers before it comes back to Python (stats seen, stop flag looked at)
_LOOP_BUDGET = 256


@dataclass
class QueueStats:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    unsupported: int = 0
    notifies: int = 0
    wakeups: int = 0  # the event channel woke the ring thread (a sleep ended by the frontend)
    polls: int = 0  # the native loop watched req_prod after a pass instead of sleeping at once
    polls_caught: int = 0  # ... and the frontend's refill came within the poll: a wake-up saved
    rejections: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RingParams:
    """The frontend's ring parameters as read (untrusted) from xenstore, already parsed to ints."""

    ring_refs: tuple[int, ...]  # ring-ref, or ring-ref0..N-1 in order
    event_channel: int
    abi: Abi
    persistent: bool = False  # the frontend wrote feature-persistent = 1 (and we offer it)

    @classmethod
    def parse(
        cls,
        *,
        ring_refs: Sequence[str],
        event_channel: str,
        protocol: str | None,
        ring_page_order: str | None,
        max_ring_page_order: int = blkif.MAX_RING_PAGE_ORDER,
        feature_persistent: str | None = None,
    ) -> RingParams:
        """Parse the node values; raise BlkifError (code blkif-*) on anything malformed.

        `ring_refs` is ["<ring-ref>"] for a single page or the ring-ref%u values in order.
        `feature_persistent` is the frontend's node: exactly "1" turns persistent grants on; "0",
        absent or anything else (" 1", "01", "true", garbage) leaves them off. A bad value is not
        worth refusing the disk over, and off is the mode every frontend must support.
        """
        order = 0 if ring_page_order is None else _parse_u32(ring_page_order, "ring-page-order")
        pages = blkif.ring_pages_for_order(order, max_ring_page_order)
        if len(ring_refs) != pages:
            raise blkif.BlkifError(
                f"{len(ring_refs)} ring refs for ring-page-order {order}", code="blkif-invalid"
            )
        refs = tuple(_parse_u32(r, "ring-ref") for r in ring_refs)
        port = _parse_u32(event_channel, "event-channel")
        return cls(refs, port, blkif.abi_for_protocol(protocol), feature_persistent == "1")


def _parse_u32(text: str | None, what: str) -> int:
    try:
        return parse_uint(text, what, maximum=0xFFFFFFFF)
    except NodeValueError as exc:
        raise blkif.BlkifError(exc.message, code="blkif-invalid") from exc


def _release(mapping: GrantMapping | Lease | Staged | None, bufs: list[memoryview]) -> None:
    """After the I/O: drop our views of the pages, then the mapping (in that order: an mmap
    refuses to close while views of it exist)."""
    for b in bufs:
        b.release()
    if mapping is not None:
        mapping.unmap()


class DataPlane:
    """Serves one ring. Construct (maps + binds), `start()`, later `stop()`."""

    def __init__(
        self,
        transport: Transport,
        domid: int,
        params: RingParams,
        target: DeviceTarget | NbdTarget,
        limits: DeviceLimits,
        *,
        workers: int = 4,
        on_broken: Callable[[str], None] | None = None,
        name: str | None = None,
        max_persistent_grants: int = DEFAULT_MAX_PERSISTENT_GRANTS,
        errors: ErrorResponses | None = None,
        native: bool = True,
        blocking_wakeup: bool = True,
        native_loop: bool = True,
        groups: RingGroups | None = None,
    ) -> None:
        """`native`: use the native fast path where it is built and applies (backend/fastpath.py);
        False: the pure-Python path only. `blocking_wakeup`: sleep in one blocking read of the
        event channel where it has that (EventChannel.start_blocking); False: poll and a late read.
        `native_loop`: with both and the native grant-copy pass, the ring thread waits, serves and
        answers in one native loop (_loop_natively); False: a Python turn per wake-up. `groups`:
        the persistent-grant pass's loop runs in a ring group's loop, with the other rings lent
        to it, instead of on this ring's thread, whenever those groups serve their rings
        (backend/ringgroup.py, RingGroups: past as many rings as the engine has CPUs)."""
        self.transport = transport
        self.domid = domid
        self.params = params
        self.target = target
        self.limits = limits
        self.on_broken = on_broken
        self.name = name or f"xbc-dom{domid}"
        self.stats = QueueStats()
        self._blocking_wakeup = blocking_wakeup
        self._native_loop = native_loop
        #: the ring's place among the engine's ring groups (made last in __init__), or None: its
        #: loop always on its own thread
        self._seat: Seat | None = None
        #: the native loop's stop flag (request_stop sets it; the loop reads it without the GIL),
        #: also set by a kick out of a ring group (_kick), and then cleared before the next loop
        self._stop_word = bytearray(1)
        self._stop_word_lock = threading.Lock()  # _stop and the word, set or cleared together
        #: every error response, counted and logged with its reason (the device's, across reconnects)
        self.errors = errors if errors is not None else ErrorResponses(self.name)
        self.broken: str | None = None
        # guards the ring's response side and stats; taken once per answered pass (fastlock.py)
        self._lock = fast_lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        nr_pages = len(params.ring_refs)
        self._ring_map: GrantMapping = transport.map_grants(
            domid, params.ring_refs, writable=True, contiguous=True
        )
        try:
            self.ring = BackRing(self._ring_map.buffer, params.abi, nr_pages)
        except BaseException:
            self._ring_map.unmap()
            raise
        try:
            self.evtchn: EventChannel = transport.bind_interdomain(domid, params.event_channel)
        except BaseException:
            self.ring.release()
            self._ring_map.unmap()
            raise
        #: persistent grants (negotiated): the ring's cache of data page mappings, unmapped in stop()
        self.grant_cache: GrantCache | None = None
        self._grants: PersistentGrants | None = None
        #: no persistent grants, none of the above: data pages copied through these buffers
        self.bounces: BouncePool | None = None
        #: and indirect pages into this one (the ring thread's alone; made on first use)
        self._indirect_bounce: Bounce | None = None
        try:
            if params.persistent:
                self.grant_cache = GrantCache(transport, domid, max_persistent_grants, name=self.name)
            else:
                # mapped once for our lifetime where the transport can (local), else copied, else
                # mapped per request
                self._grants = transport.map_persistent(domid)
                if self._grants is None and transport.copies_grants:
                    self.bounces = BouncePool()
        except BaseException:
            self.evtchn.close()
            self.ring.release()
            self._ring_map.unmap()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.executor: Executor | NbdExecutor = target.executor(workers=workers, name=f"{self.name}-io")
        #: the native pass for simple requests, or None: every request on the pure-Python path
        # in a group's loop while the groups serve (grant copy never is: GRUB's one page at a time)
        self._fast = FastPass.create(native, params.abi, limits, self.executor, self.grant_cache)
        #: stats.wakeups when the last native pass began (_cut_for_pass)
        self._wakeups_seen = 0
        #: grants copied: the native grant-copy pass (backend/grantcopy.py), or None
        self._fast_copy = (
            NativeCopy.create(native, params.abi, limits, self.executor, transport=transport, domid=domid)
            if self.bounces is not None
            else None
        )
        if isinstance(self.executor, Executor):
            # a request alone on the ring runs inline even if it blocks (io.Executor's docstring).
            # A closure over the ring, not a bound method: the executor must not point back at the
            # data plane, or the cycle keeps the ring's and the guest's mappings until a gc pass
            # (tests/flows/test_scale.py caught 256 of them still mapped after every detach).
            ring = self.ring
            self.executor.alone = lambda: ring.in_flight == 1
        if self._fast is not None and groups is not None:  # last: a failed __init__ takes no seat
            self._seat = groups.seat(self._kick)

    @property
    def group(self) -> RingGroup | None:
        """The ring group this ring's native loop runs in now (RingGroups), or None: on its own
        thread. Read as a loop begins (_loop_natively); a ring moves at its loop's next exit."""
        return self._seat.now() if self._seat is not None else None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise XenblockError("data plane already started", code="internal")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop taking requests, without waiting: a device with several queues stops them all
        before it waits for any (stop() then drains and releases each)."""
        if self._stopped:
            return
        with self._stop_word_lock:
            self._stop.set()
            self._stop_word[0] = 1  # before the interrupt: a native loop it wakes sees it
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        try:
            self.evtchn.interrupt()  # a ring thread asleep in take() (the blocking wake-up)
        except (OSError, XenblockError) as exc:
            log.warning("%s: cannot interrupt the ring thread's wait: %s", self.name, exc)

    def _kick(self) -> None:
        """Ask the ring's loop to leave its ring group (RingGroups.leave: the rings go back to
        their own threads): the group gives the ring back once it sees the word, and
        _loop_natively clears it before the next loop, which runs on this ring's thread."""
        with self._stop_word_lock:
            self._stop_word[0] = 1

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop taking requests, drain in-flight I/O, answer it, unbind, unmap. Idempotent, and
        meant to be called again after it returned False.

        Returns False while the ring thread is still running (it may be about to start a request)
        or in-flight I/O did not finish within `timeout` (each wait is bounded by it): nothing is
        released then — the ring and the guest's pages stay mapped, because unmapping under running
        I/O would hand freed memory to preadv, and the caller must not close the device fd either.
        """
        if self._stopped:
            return True
        self.request_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                return False  # e.g. blocked behind a barrier whose I/O hangs
        if not self.executor.close(timeout):
            return False
        with self._lock:
            if self.ring.push_responses():
                self._notify()
        self._stopped = True
        if self._seat is not None:
            self._seat.leave()
        if self._grants is not None:
            self._grants.close()
        if self.bounces is not None:
            self.bounces.close()
        if self._fast_copy is not None:
            self._fast_copy.close()
        if self._indirect_bounce is not None:
            self._indirect_bounce.close()
        if self.grant_cache is not None:
            # drained: no request holds a page, so every persistent mapping goes now
            try:
                self.grant_cache.close()
            except GrantError as exc:  # a request that never released its pages: a bug of ours
                log.error("%s: %s", self.name, exc)
        self.evtchn.close()
        self.ring.release()
        self._ring_map.unmap()
        os.close(self._wake_r)
        os.close(self._wake_w)
        return True

    @property
    def in_flight(self) -> int:
        return self.executor.in_flight

    # -- the ring thread -------------------------------------------------------------------------
    def _run(self) -> None:
        # The wake-up path (issue 20), in kernel blkback's order (xen_blkif_schedule: serve, then the
        # late EOI): after a wake-up the ring is served and its answers pushed and notified first,
        # and only then is the event consumed and the port unmasked, so those two syscalls are not
        # on the way from the guest's request to our answer (one QD1 request is one wake-up). Events
        # the frontend sends meanwhile stay pending (Xen holds them while the port is masked; the
        # unmask raises them again), and the ack comes before the final check, so a request whose
        # event the ack consumed is still seen there. poll() has no timeout: a stop writes the wake
        # pipe, and a poll with a timeout reads the clock and arms a timer for every sleep.
        # Where the channel has a blocking wake-up (EventChannel.start_blocking), the thread sleeps
        # in take(), one read() that wakes and consumes the event (poll + the late read were two),
        # and the late ack is the unmask alone; a stop interrupts the take().
        evtchn_fd = self.evtchn.fileno()
        poller = select.poll()
        poller.register(evtchn_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        pending = False  # the event channel woke us and is not acked yet
        try:
            blocking = self._blocking_wakeup and self.evtchn.start_blocking()
            # the native wait-and-serve loop (_loop_natively), where a native pass applies
            loop = blocking and self._native_loop and (self._fast_copy is not None or self._fast is not None)
            waiter = self.evtchn.native_waiter() if loop else None
            # Re-attached to a live ring (issue 21): publish the answers a previous engine finished
            # (ring.py's journal) and wake the frontend, which may wait for answers pushed just before
            # that engine died, or have notified a port nobody was bound to.
            if self.ring.resumed:
                with self._lock:
                    self.ring.push_responses()
                    self._notify()
            while not self._stop.is_set():
                if waiter is not None:
                    pending, python_turn = self._loop_natively(waiter, pending)
                    if not python_turn:
                        continue
                # a short batch took everything there was: straight to the final check, which looks
                # again (one take_slots() fewer per pass than asking until one comes back empty)
                if self._serve_batch() >= _BATCH:
                    continue
                if pending:
                    if blocking:
                        self.evtchn.unmask()
                    else:
                        self.evtchn.ack()
                    pending = False
                if self.ring.final_check_for_requests():
                    continue
                if self.ring.broken is not None:
                    self._broken(self.ring.broken)
                    return
                if blocking:
                    if self.evtchn.take() and not self._stop.is_set():
                        pending = True
                        self.stats.wakeups += 1
                    continue
                for fd, _events in poller.poll():
                    if fd == evtchn_fd:
                        pending = True
                        self.stats.wakeups += 1
        except Exception as exc:  # a bug of ours must not take the whole engine down
            log.exception("%s: data plane failed", self.name)
            self._broken(f"internal error: {exc}")

    def _loop_natively(self, waiter: NativeWaiter, pending: bool) -> tuple[bool, bool]:
        """One run of the native wait-and-serve loop (ring_loop.h: the cycle of _run in C without
        the GIL, with the data plane's native pass as its serve step: grantcopy.NativeCopy.loop
        for grants copied, fastpath.FastPass.loop for persistent grants), and what it left to
        Python: the slot its pass stopped at and the rest of that batch (validated, served,
        answered and logged here as always), a failed notify (logged) or a read/unmask that failed
        (raised, as take() would). Returns (pending, python_turn): python_turn when _run's own turn
        must come now — the ring was not the loop's to lend (a request outstanding on a worker or
        held), or its req_prod needs BackRing's judgement (EXIT_CHECK: broken, logged there)."""
        with self._stop_word_lock:
            if not self._stop.is_set():
                self._stop_word[0] = 0  # a kick out of a group (_kick) is spent once we are here
        # then where this loop runs: a kick after this reads the groups' new word, so it is seen
        seat = self._seat
        group = seat.now() if seat is not None else None
        with self._lock:  # a worker answering its last request finishes its push first
            lent = self.ring.lend()
        if lent is None:
            return pending, True
        # it counts its requests, wake-ups and notifies into self.stats as it goes (in a ring group
        # if it serves in one: FastPass.loop)
        if self._fast_copy is not None:
            got = self._fast_copy.loop(
                lent, self.ring.size, waiter, stop=self._stop_word, pending=pending, batch=_BATCH,
                budget=_LOOP_BUDGET, stats=self.stats,
            )  # fmt: skip
        else:
            assert self._fast is not None
            got = self._fast.loop(
                lent, self.ring.size, waiter, stop=self._stop_word, pending=pending, batch=_BATCH,
                budget=_LOOP_BUDGET, stats=self.stats, group=group.loop if group is not None else None,
            )  # fmt: skip
        with self._lock:
            self.ring.settle(got.req_cons, got.rsp_prod_pvt, got.rsp_pushed, got.data, got.at)
        if got.notify_errno:
            log.warning("%s: notify failed: %s", self.name, os.strerror(got.notify_errno))
        if got.exit == EXIT_OSERROR:
            raise OSError(got.errno, f"event channel: {os.strerror(got.errno)}")
        if got.data is not None:  # EXIT_SLOT: answers before it are out; it and the rest are ours
            if self._fast_copy is not None:
                self._serve_copied(got.data, got.at + 1, got.at)
                self._serve_copied_fast(got.data, got.taken, got.at + 1)
            else:  # the native pass tries that slot once more (it stops at once), then Python's path
                self._serve_fast(got.data, got.taken, got.at)
        return got.pending, got.exit == EXIT_CHECK

    def _serve_batch(self) -> int:
        """Take up to _BATCH requests (one copy), validate and start each; answer the ones that
        finished here with one push (and at most one notification) at the end. Returns the count."""
        data, count = self.ring.take_slots(_BATCH)
        if not count:
            return 0
        if self._fast_copy is not None:
            return self._serve_copied_fast(data, count)
        if self.bounces is not None:
            return self._serve_copied(data, count)
        if self._fast is not None:
            return self._serve_fast(data, count)
        abi, limits, entry = self.params.abi, self.limits, self.params.abi.entry_size
        read_indirect, serve = self._read_indirect, self._serve_slot
        answers: list[tuple[int, int, int]] = []
        for offset in range(0, count * entry, entry):
            answers = serve(validate_slot(abi, data, offset, limits, read_indirect), answers)
        if answers:
            self._answer(answers)
        return count

    def _serve_fast(self, data: bytes, count: int, start: int = 0) -> int:
        """_serve_batch with the native fast path (backend/fastpath.py) over slots [start, count):
        it serves the longest run of simple requests; the one it stops at goes through
        _serve_slot; repeat from the next.
        A native run whose answers are next in ring order goes straight into the ring
        (_write_run); anything after an answer still pending keeps ring order through _answer.
        A run the native pass cut (_cut_for_pass) is pushed before the next one starts."""
        assert self._fast is not None
        fast, abi, limits, entry = self._fast.serve, self.params.abi, self.limits, self.params.abi.entry_size
        at = self.ring.taken_at
        cut_at = self._cut_for_pass()
        answers: list[tuple[int, int, int]] = []  # finished, not yet written
        unpublished = False  # a native run is in its slots, not yet pushed
        cache = self.grant_cache
        prefetch = cache is not None  # once per pass: see _prefetch
        index = start
        while index < count:
            first = index
            done, index, cut = fast(data, index, count, cut_at)
            if done:
                if answers:
                    answers += done
                else:  # the usual pass, one native run to its end: written and pushed in one go
                    # (a cut run too, so the frontend refills while the next run copies)
                    self._write_run(done, (at + first) & 0xFFFFFFFF, publish=index == count or cut)
                    unpublished = index < count and not cut
            if cut:
                continue
            if index < count:
                verdict = validate_slot(abi, data, index * entry, limits, self._read_indirect)
                if unpublished and not isinstance(verdict, Rejection) and verdict.kind is BARRIER:
                    self._publish()  # the barrier blocks this thread (see _serve_slot)
                    unpublished = False
                calls = cache.stats.map_calls if cache is not None else 0
                answers = self._serve_slot(verdict, answers)
                index += 1
                if prefetch and index < count and cache is not None and cache.stats.map_calls != calls:
                    prefetch = False  # this request mapped new pages: the rest of the pass may too
                    self._prefetch(data, index, count)
        if answers:
            self._answer(answers)
        elif unpublished:
            self._publish()
        return count

    def _prefetch(self, data: bytes, start: int, count: int) -> None:
        """Map the new pages of slots [start, count) of the pass ahead, in two map calls: their
        indirect descriptor pages, then their data pages (issue 20, the cold write: a frontend
        filling its persistent pool sends a pass of requests on new pages, and each one left the
        native pass to map its indirect page and then its data pages, two MAP ioctls and mmaps
        per request, ~2 ms each under TCG). The native pass then serves those requests from the
        cache. Only a hint: the refs are what validate_slot reads (its rules, from the same copy
        `data`, not a second decoder), GrantCache.prefetch maps them only when they all fit without
        an eviction, and a call that fails maps nothing, so each request then maps its own pages
        as before and a bad ref fails only its own request. Every request is validated again when
        it is served."""
        cache = self.grant_cache
        assert cache is not None
        abi, limits, entry = self.params.abi, self.limits, self.params.abi.entry_size
        offsets = range(start * entry, count * entry, entry)
        indirect: list[int] = []

        def note(grefs: Sequence[int]) -> bytes:
            indirect.extend(grefs)
            return b""  # validation refuses a request without descriptors: its verdict is ignored

        for offset in offsets:
            validate_slot(abi, data, offset, limits, note)
        if indirect:
            cache.prefetch(indirect)
        pages: list[int] = []
        for offset in offsets:
            verdict = validate_slot(abi, data, offset, limits, self._read_indirect)
            if not isinstance(verdict, Rejection):
                pages.extend(verdict.grefs)
        if pages:
            cache.prefetch(pages)

    def _cut_for_pass(self) -> int:
        """Where the native pass cuts this pass's runs (fastpath.CUT_BYTES), or 0: not cut.

        Issue 20, the QD-4 turnaround: a frontend that keeps 4 MiB outstanding gets nothing back
        until a pass of all of it is copied, and refills only then, while the ring thread, out of
        requests, sleeps. Answering the first 2 MiB early lets it refill during the rest; the ring
        then settles into passes of 2 MiB that overlap the frontend's refill, one event more per
        4 MiB. That event costs ~2-4 µs of CPU per 1 MiB request (bench/README.md), worth it only
        when the ring thread would otherwise sleep: so only a pass that follows a sleep is cut (on
        a busy host the scheduler often runs the frontend between our answer and our final check,
        and the ring thread does not sleep at all)."""
        wakeups = self.stats.wakeups
        if wakeups == self._wakeups_seen:
            return 0
        self._wakeups_seen = wakeups
        return CUT_BYTES

    def _publish(self) -> None:
        """Push what is written (and notify if the frontend asked)."""
        with self._lock:
            if self.ring.push_responses():
                self._notify()

    def _write_run(self, answers: list[tuple[int, int, int]], at: int, *, publish: bool) -> None:
        """The native pass's answers (all RSP_OKAY) to the requests taken at ring index `at` on,
        written into the ring (BackRing.respond_run); pushed (and notified, if the frontend asked)
        here when `publish`, else by the pass's one push at its end."""
        assert self._fast is not None
        n = len(answers)
        with self._lock:
            self.ring.respond_run(answers, at, self._fast.write_answers)
            self.stats.requests += n
            self.stats.ok += n
            if publish and self.ring.push_responses():
                self._notify()  # under the lock: stop() closes the channel under it

    def _serve_slot(
        self, verdict: Verdict, answers: list[tuple[int, int, int]]
    ) -> list[tuple[int, int, int]]:
        """Start one validated (or refused) request of the pass; `answers` with its answer if it
        finished here (a barrier first answers what the pass finished before it)."""
        if isinstance(verdict, Rejection):
            self._reject(verdict)
            answers.append((verdict.id, verdict.operation, verdict.status))
            return answers
        if verdict.kind is BARRIER and answers:
            self._answer(answers)  # the barrier blocks this thread: do not hold finished answers
            answers = []
        status = self._start(verdict)
        if status is not None:
            answers.append((verdict.id, verdict.operation, status))
        return answers

    def _broken(self, reason: str) -> None:
        self.broken = reason
        log.error("%s: frontend broke the ring: %s", self.name, reason)
        if self.on_broken is not None:
            try:
                self.on_broken(reason)
            except Exception:
                log.exception("%s: on_broken callback failed", self.name)

    def _read_indirect(self, grefs: Sequence[int]) -> bytes:
        if self.bounces is not None:
            return self._copy_indirect(grefs)
        mapping: GrantMapping | Lease | None = None
        if self.grant_cache is not None:
            views, mapping = self.grant_cache.acquire(grefs, None, writable=False)
        elif self._grants is not None:
            views = self._grants.iovecs(grefs, None, writable=False)
        else:
            mapping = self.transport.map_grants(self.domid, grefs, writable=False)
            try:
                views = mapping.iovecs()
            except BaseException:
                mapping.unmap()
                raise
        try:
            return b"".join(views)  # the copy that validation decodes
        finally:
            _release(mapping, views)

    def _start(self, plan: IoPlan) -> int | None:
        """Map the plan's pages and run it here or on a worker: its status if it already finished
        (the caller answers), None if a worker answers it."""
        mapping: GrantMapping | Lease | None = None
        bufs: list[memoryview] = []
        kind = plan.kind
        if plan.grefs:
            # guest READ: we write into its pages, so they must be mapped writable
            writable = kind is READ
            try:
                if self._grants is not None:  # first: the local transport's per-request path
                    bufs = self._grants.iovecs(plan.grefs, plan.extents, writable=writable)
                elif self.grant_cache is not None:
                    bufs, mapping = self.grant_cache.acquire(plan.grefs, plan.extents, writable=writable)
                else:
                    mapping = self.transport.map_grants(self.domid, plan.grefs, writable=writable)
                    bufs = mapping.iovecs(plan.extents)
            except (GrantError, IndexError) as exc:
                if mapping is not None:
                    mapping.unmap()
                reason = exc.one_line() if isinstance(exc, GrantError) else f"bad page index: {exc}"
                self.errors.record("grant-map", plan.id, reason)
                return blkif.RSP_ERROR
        status = self._run_plan(plan, mapping, bufs)
        if status is not None and mapping is not None:
            mapping.unmap()
        return status

    def _run_plan(
        self, plan: IoPlan, holder: GrantMapping | Lease | Staged | None, bufs: list[memoryview]
    ) -> int | None:
        """Run a plan whose buffers are ready, here or on a worker (which gets `holder` with it):
        its status if it finished here (`bufs` released, a failure recorded; `holder` is the
        caller's to give back), None if a worker answers it."""
        if plan.kind is BARRIER:
            # a barrier is ordered against everything: nothing before it may still run, nothing after
            # it may start before it completes (the ring thread blocks here)
            self.executor.drain()
            self._submit(plan, holder, bufs)
            self.executor.drain()
            return None
        status = self.executor.run_now(plan, bufs)
        if status is None:
            self._submit(plan, holder, bufs)
            return None
        for b in bufs:  # inline, not _release(): this runs for every request finished here
            b.release()
        if status != blkif.RSP_OKAY:
            self._io_failed(plan, status)
        return status

    def _io_failed(self, plan: IoPlan, status: int) -> None:
        # io.execute logged the device's own error just before; this is the answer the guest got
        cause = "unsupported" if status == blkif.RSP_EOPNOTSUPP else "io"
        self.errors.record(
            cause, plan.id, f"{plan.kind.value} of {plan.length} bytes at {plan.offset} failed"
        )

    def _submit(
        self, plan: IoPlan, mapping: GrantMapping | Lease | Staged | None, bufs: list[memoryview]
    ) -> None:
        if isinstance(mapping, Lease):
            # the pages leave the ring thread: later misses there must not evict them
            mapping.pin()

        def done(status: int) -> None:
            if isinstance(mapping, Staged) and mapping.to_guest and status == blkif.RSP_OKAY:
                for b in bufs:  # before the buffer goes back to the pool (which may unmap it)
                    b.release()
                status = self._copy_out([mapping])[0]  # the READ's data into the guest's pages
            _release(mapping, bufs)
            if status != blkif.RSP_OKAY:
                self._io_failed(plan, status)
            self._answer([(plan.id, plan.operation, status)])

        self.executor.submit(plan, bufs, done)

    # -- frontends without persistent grants: data pages copied (backend/grantcopy.py) -------------
    def _serve_copied_fast(self, data: bytes, count: int, start: int = 0) -> int:
        """_serve_copied with the native grant-copy pass over slots [start, count): it serves the
        longest run of simple requests; the slot it stops at goes through _serve_copied alone;
        repeat from the next. Its answers go out before that slot's (which _serve_copied answers
        itself)."""
        assert self._fast_copy is not None
        fast = self._fast_copy.serve
        answers: list[tuple[int, int, int]] = []
        index = start
        while index < count:
            done, index = fast(data, index, count)
            answers += done
            if index < count:
                if answers:
                    self._answer(answers)
                    answers = []
                self._serve_copied(data, index + 1, index)
                index += 1
        if answers:
            self._answer(answers)
        return count

    def _serve_copied(self, data: bytes, count: int, start: int = 0) -> int:
        """_serve_batch with the pass's grant work batched: validate every slot of [start, count),
        copy every WRITE's data out of the guest's pages in one call, start each request in ring
        order, then copy every READ finished here into the guest's pages in one call and answer
        the pass."""
        abi, limits, entry = self.params.abi, self.limits, self.params.abi.entry_size
        read_indirect = self._read_indirect
        verdicts: list[Verdict] = [
            validate_slot(abi, data, offset, limits, read_indirect)
            for offset in range(start * entry, count * entry, entry)
        ]
        staged_in = self._stage_in(verdicts)
        answers: list[tuple[int, int, int]] = []
        reads: list[Staged] = []  # READs done here whose data is still ours
        for verdict in verdicts:
            if isinstance(verdict, Rejection):
                self._reject(verdict)
                answers.append((verdict.id, verdict.operation, verdict.status))
                continue
            if verdict.kind is BARRIER and (answers or reads):
                self._answer(answers + self._finish_reads(reads))
                answers, reads = [], []
            got: Staged | str | None = None
            if verdict.kind is READ:
                if verdict.grefs:  # filled by the I/O, copied into the guest's pages after it
                    got = self._stage(verdict, True)
            else:
                got = staged_in.pop(id(verdict), None)
            if isinstance(got, str):  # no buffer, or its copy out of the guest's pages failed
                self.errors.record("grant-map", verdict.id, got)
                answers.append((verdict.id, verdict.operation, blkif.RSP_ERROR))
                continue
            staged = got
            status = self._start_staged(verdict, staged)
            if status is None:
                continue
            if staged is not None and staged.to_guest and status == blkif.RSP_OKAY:
                reads.append(staged)
            else:
                answers.append((verdict.id, verdict.operation, status))
        if answers or reads:
            self._answer(answers + self._finish_reads(reads))
        return count

    def _reject(self, verdict: Rejection) -> None:
        cause = "unsupported" if verdict.status == blkif.RSP_EOPNOTSUPP else "invalid"
        self.errors.record(cause, verdict.id, verdict.reason)
        with self._lock:
            key = verdict.reason.split(" ", 1)[0]
            self.stats.rejections[key] = self.stats.rejections.get(key, 0) + 1

    def _stage_in(self, verdicts: Sequence[Verdict]) -> dict[int, Staged | str]:
        """Every plan with data for the device (WRITE, and FLUSH/BARRIER carrying data) staged in
        a bounce buffer with one grant copy out of the guest's pages; by id() of the plan, its
        Staged or the reason its copy failed (its buffer already given back)."""
        out: dict[int, Staged | str] = {}
        staged: list[Staged] = []
        for v in verdicts:
            if not isinstance(v, Rejection) and v.grefs and v.kind is not READ:
                got = self._stage(v, False)
                if isinstance(got, str):
                    out[id(v)] = got
                else:
                    staged.append(got)
        if not staged:
            return out
        reasons = self._copy(staged, to_guest=False)
        for i, item in enumerate(staged):
            reason = reasons.get(i)
            if reason is None:
                out[id(item.plan)] = item
            else:
                item.unmap()
                out[id(item.plan)] = reason
        return out

    def _stage(self, plan: IoPlan, to_guest: bool) -> Staged | str:
        """A bounce buffer for `plan`, or why there is none (that request alone fails)."""
        assert self.bounces is not None
        try:
            return Staged(self.bounces, plan, to_guest)
        except OSError as exc:  # mmap: ENOMEM at the memory or VMA limit
            return f"no memory for a {plan.length}-byte bounce buffer: {os.strerror(exc.errno or 0)}"

    def _start_staged(self, plan: IoPlan, staged: Staged | None) -> int | None:
        """_start for a plan whose data is (or will be) in `staged`: its status if it finished
        here, None if a worker answers it. A finished READ keeps its buffer: the caller copies it
        into the guest's pages."""
        status = self._run_plan(plan, staged, staged.iovecs() if staged is not None else [])
        if status is not None and staged is not None and not (staged.to_guest and status == blkif.RSP_OKAY):
            staged.unmap()
        return status

    def _finish_reads(self, reads: list[Staged]) -> list[tuple[int, int, int]]:
        """Copy READs finished on this thread into the guest's pages (one call), give their buffers
        back, and return their answers."""
        if not reads:
            return []
        statuses = self._copy_out(reads)
        return [(s.plan.id, s.plan.operation, status) for s, status in zip(reads, statuses, strict=True)]

    def _copy_out(self, reads: Sequence[Staged]) -> list[int]:
        """One grant copy of these READs' data into the guest's pages; each one's blkif status
        (RSP_ERROR, logged, where its copy failed). Their buffers go back to the pool."""
        reasons = self._copy(reads, to_guest=True)
        out: list[int] = []
        for i, item in enumerate(reads):
            item.unmap()
            reason = reasons.get(i)
            if reason is None:
                out.append(blkif.RSP_OKAY)
            else:
                self.errors.record("grant-map", item.plan.id, reason)
                out.append(blkif.RSP_ERROR)
        return out

    def _copy(self, staged: Sequence[Staged], *, to_guest: bool) -> dict[int, str]:
        """One grant copy for all of `staged`: which of them (by index) failed, and why."""
        try:
            statuses = self.transport.grant_copy(
                self.domid, [item.item() for item in staged], to_guest=to_guest
            )
        except GrantError as exc:
            reason = exc.one_line()
            return dict.fromkeys(range(len(staged)), reason)
        return failures(staged, statuses)

    def _copy_indirect(self, grefs: Sequence[int]) -> bytes:
        """The indirect pages' contents (the copy validation decodes), by one grant copy."""
        bounce = self._indirect_bounce
        if bounce is None:
            # not from the pool: a ring of large requests keeps the pool's idle bytes for data
            bounce = self._indirect_bounce = Bounce(blkif.MAX_INDIRECT_PAGES_PER_REQUEST * PAGE_SIZE)
        if len(grefs) > blkif.MAX_INDIRECT_PAGES_PER_REQUEST:  # validation never asks for more
            raise GrantError(f"{len(grefs)} indirect pages")
        statuses = self.transport.grant_copy(self.domid, [(grefs, None, bounce)], to_guest=False)
        bad = next((i for i, status in enumerate(statuses) if status != GNTST_OKAY), None)
        if bad is not None:
            reason = gntst_name(statuses[bad])
            raise GrantError(f"grant copy of indirect page ref {grefs[bad]} failed: {reason}")
        return bytes(bounce.view[: len(grefs) * PAGE_SIZE])

    def _answer(self, answers: Sequence[tuple[int, int, int]]) -> None:
        """Write (id, operation, status) responses, publish them, notify if the frontend asked."""
        n = len(answers)
        ok = int(answers[0][2] == blkif.RSP_OKAY) if n == 1 else [a[2] for a in answers].count(blkif.RSP_OKAY)
        with self._lock:
            self.ring.respond_all(answers)
            stats = self.stats
            stats.requests += n
            stats.ok += ok
            if ok != n:
                for _rid, _operation, status in answers:
                    if status == blkif.RSP_EOPNOTSUPP:
                        stats.unsupported += 1
                    elif status != blkif.RSP_OKAY:
                        stats.errors += 1
            notify = self.ring.push_responses()
            if notify:
                # under the lock: stop() closes the channel under it after the last push
                self._notify()

    def _notify(self) -> None:
        self.stats.notifies += 1
        try:
            self.evtchn.notify()
        except (OSError, XenblockError) as exc:
            log.warning("%s: notify failed: %s", self.name, exc)


__all__ = ["DataPlane", "QueueStats", "RingBroken", "RingParams"]
