"""One blkif queue served end to end: ring + event channel + executor, on its own thread.

The xenbus state machine creates a `DataPlane` when the frontend is Initialised/Connected (after it
has read `ring-ref*`, `ring-page-order`, `event-channel` and `protocol`), calls `start()`, then
publishes Connected. On teardown (frontend Closing/Closed, `online`=0) it calls `stop()`, which
takes no new requests, drains in-flight I/O, pushes the last responses, and unmaps the ring. The
device fd is the engine's: a frontend reconnect creates a new DataPlane on the same DeviceTarget.

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
from xenblockctl.backend.blkif import Abi, Request, Response
from xenblockctl.backend.io import DeviceTarget, Executor
from xenblockctl.backend.requests import DeviceLimits, IoPlan, IoSegment, Kind, Rejection, validate
from xenblockctl.backend.ring import BackRing, RingBroken
from xenblockctl.backend.transport.base import EventChannel, GrantError, GrantMapping, Transport
from xenblockctl.errors import XenblockError

log = logging.getLogger(__name__)

#: requests taken from the ring per batch before we look at completions again
_BATCH = 64


@dataclass
class QueueStats:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    unsupported: int = 0
    notifies: int = 0
    rejections: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RingParams:
    """The frontend's ring parameters as read (untrusted) from xenstore, already parsed to ints."""

    ring_refs: tuple[int, ...]  # ring-ref, or ring-ref0..N-1 in order
    event_channel: int
    abi: Abi

    @classmethod
    def parse(
        cls,
        *,
        ring_refs: Sequence[str],
        event_channel: str,
        protocol: str | None,
        ring_page_order: str | None,
        max_ring_page_order: int = blkif.MAX_RING_PAGE_ORDER,
    ) -> RingParams:
        """Parse the node values; raise BlkifError (code blkif-*) on anything malformed.

        `ring_refs` is ["<ring-ref>"] for a single page or the ring-ref%u values in order.
        """
        order = 0 if ring_page_order in (None, "") else _parse_u32(ring_page_order, "ring-page-order")
        pages = blkif.ring_pages_for_order(order, max_ring_page_order)
        if len(ring_refs) != pages:
            raise blkif.BlkifError(
                f"{len(ring_refs)} ring refs for ring-page-order {order}", code="blkif-invalid"
            )
        refs = tuple(_parse_u32(r, "ring-ref") for r in ring_refs)
        port = _parse_u32(event_channel, "event-channel")
        return cls(refs, port, blkif.abi_for_protocol(protocol))


def _parse_u32(text: str | None, what: str) -> int:
    raw = (text or "").strip()
    if not raw.isdigit() or len(raw) > 10 or int(raw) > 0xFFFFFFFF:
        raise blkif.BlkifError(
            f"{what} '{blkif.printable(text or '', 20)}' is not a uint32", code="blkif-invalid"
        )
    return int(raw)


def _iovecs(mapping: GrantMapping, segments: Sequence[IoSegment]) -> list[memoryview]:
    """Buffers for preadv/pwritev: runs of segments that continue each other across page boundaries
    (one ends at the page end, the next starts at 0 of the next, contiguously mapped page) merge into
    one view, so per-iovec cost does not scale with the segment count of large requests."""
    out: list[memoryview] = []
    i, n = 0, len(segments)
    while i < n:
        j = i
        while (
            j + 1 < n
            and segments[j].offset + segments[j].length == blkif.PAGE_SIZE
            and segments[j + 1].offset == 0
            and mapping.follows(j)
        ):
            j += 1
        run = mapping.span(i, j - i + 1) if j > i else None
        if run is not None:
            out.append(
                run[segments[i].offset : (j - i) * blkif.PAGE_SIZE + segments[j].offset + segments[j].length]
            )
            run.release()
        else:
            for k in range(i, j + 1):
                s = segments[k]
                out.append(mapping.page(k)[s.offset : s.offset + s.length])
        i = j + 1
    return out


class DataPlane:
    """Serves one ring. Construct (maps + binds), `start()`, later `stop()`."""

    def __init__(
        self,
        transport: Transport,
        domid: int,
        params: RingParams,
        target: DeviceTarget,
        limits: DeviceLimits,
        *,
        workers: int = 4,
        on_broken: Callable[[str], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.transport = transport
        self.domid = domid
        self.params = params
        self.target = target
        self.limits = limits
        self.on_broken = on_broken
        self.name = name or f"xbc-dom{domid}"
        self.stats = QueueStats()
        self.broken: str | None = None
        self._lock = threading.Lock()  # guards the ring's response side and stats
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
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.executor = Executor(target, workers=workers, name=f"{self.name}-io")

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise XenblockError("data plane already started", code="internal")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop taking requests, drain in-flight I/O, answer it, unbind, unmap. Idempotent.

        Returns False if in-flight I/O did not finish within `timeout`; the ring is then left mapped
        (unmapping under running I/O would hand freed memory to preadv) and the caller should treat
        the device as stuck.
        """
        if self._stopped:
            return True
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        drained = self.executor.close(timeout)
        if not drained:
            log.error("%s: in-flight I/O did not drain within %ss", self.name, timeout)
            return False
        with self._lock:
            if self.ring.push_responses():
                self._notify()
        self._stopped = True
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
        poller = select.poll()
        poller.register(self.evtchn.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop.is_set():
                reqs = self.ring.take_decoded(_BATCH)
                for req in reqs:
                    if self._stop.is_set():
                        break
                    self._dispatch(req)
                if reqs:
                    continue
                if self.ring.final_check_for_requests():
                    continue
                if self.ring.broken is not None:
                    self._broken(self.ring.broken)
                    return
                poller.poll(1000)
                self.evtchn.ack()
        except Exception as exc:  # a bug of ours must not take the whole engine down
            log.exception("%s: data plane failed", self.name)
            self._broken(f"internal error: {exc}")

    def _broken(self, reason: str) -> None:
        self.broken = reason
        log.error("%s: frontend broke the ring: %s", self.name, reason)
        if self.on_broken is not None:
            try:
                self.on_broken(reason)
            except Exception:
                log.exception("%s: on_broken callback failed", self.name)

    def _read_indirect(self, grefs: Sequence[int]) -> bytes:
        with self.transport.map_grants(self.domid, grefs, writable=False) as m:
            return b"".join(bytes(m.page(i)) for i in range(len(grefs)))

    def _dispatch(self, req: Request) -> None:
        verdict = validate(req, self.limits, self._read_indirect)
        if isinstance(verdict, Rejection):
            log.debug("%s: rejected id %d: %s", self.name, verdict.id, verdict.reason)
            with self._lock:
                key = verdict.reason.split(" ", 1)[0]
                self.stats.rejections[key] = self.stats.rejections.get(key, 0) + 1
            self._complete(verdict.id, verdict.operation, verdict.status)
            return
        self._submit(verdict)

    def _submit(self, plan: IoPlan) -> None:
        mapping: GrantMapping | None = None
        bufs: list[memoryview] = []
        if plan.segments:
            # guest READ: we write into its pages, so they must be mapped writable
            writable = plan.kind is Kind.READ
            try:
                mapping = self.transport.map_grants(
                    self.domid, [s.gref for s in plan.segments], writable=writable
                )
                bufs = _iovecs(mapping, plan.segments)
            except (GrantError, IndexError) as exc:
                for b in bufs:
                    b.release()
                if mapping is not None:
                    mapping.unmap()
                log.debug("%s: id %d: %s", self.name, plan.id, exc)
                self._complete(plan.id, plan.operation, blkif.RSP_ERROR)
                return

        def done(status: int) -> None:
            for b in bufs:
                b.release()
            if mapping is not None:
                mapping.unmap()
            self._complete(plan.id, plan.operation, status)

        if plan.kind is Kind.BARRIER:
            # a barrier is ordered against everything: nothing before it may still run, nothing after
            # it may start before it completes (the ring thread blocks here)
            self.executor.drain()
            self.executor.submit(plan, bufs, done)
            self.executor.drain()
        else:
            self.executor.submit(plan, bufs, done)

    def _complete(self, rid: int, operation: int, status: int) -> None:
        with self._lock:
            self.stats.requests += 1
            if status == blkif.RSP_OKAY:
                self.stats.ok += 1
            elif status == blkif.RSP_EOPNOTSUPP:
                self.stats.unsupported += 1
            else:
                self.stats.errors += 1
            self.ring.put_response(Response(rid, operation, status))
            if self.ring.push_responses():
                self._notify()

    def _notify(self) -> None:
        self.stats.notifies += 1
        try:
            self.evtchn.notify()
        except (OSError, XenblockError) as exc:
            log.warning("%s: notify failed: %s", self.name, exc)


__all__ = ["DataPlane", "QueueStats", "RingBroken", "RingParams"]
