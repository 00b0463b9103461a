"""Grant copy for frontends without persistent grants: the guest's data pages are copied, not mapped.

Mapping a request's pages through gntdev costs a MAP ioctl, an mmap, a munmap (page-table updates
and a TLB flush in a PV dom0) and an UNMAP ioctl per request: GRUB's 2,480 single-page reads
during a pvgrub boot each paid all four. Copying (as QEMU's qdisk and tapdisk do) costs one
GNTTABOP_copy hypercall batch for any number of segments: the data plane stages every WRITE of a
ring pass with one copy out of the guest's pages before the I/O, and answers every READ it finished
in that pass with one copy into them after the I/O. Requests run by the I/O workers copy their own
READ data back when they finish.

A request's data lives in a `Bounce` of ours from a per-ring `BouncePool`, laid out back to back
(segment i right after segment i-1), so its preadv/pwritev is one iovec whatever its segments.
Segment bounds come from the validated copy of the request (requests.validate_slot), as for
mapping; a segment the copy refuses (a ref not granted, a read-only page for a READ) fails its
request alone.

The native pass (`NativeCopy`, backend/_grantcopy.c, an optional extension like _fastpass): GRUB's
one-page READs, one at a time, spent most of the ring thread's time per request in Python. Where
the module is built and the data plane's executor is an io.Executor, a pass's runs of simple
requests (READ/WRITE, direct segments, valid by requests.validate_slot's rules) are decoded,
copied (one grant copy out for the run's WRITEs, one in for its READs) and run in C through one
bounce buffer of its own; the first slot it does not finish — anything unusual, any failed copy,
any I/O that would block or fell short — goes through the pure-Python path above, which stays
complete and is all that runs without the module or with `--no-native`.
"""

from __future__ import annotations

import mmap
import types
from collections.abc import Sequence

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.fastlock import fast_lock
from xenblockctl.backend.fastpath import LoopExit, native_modes, run_loop
from xenblockctl.backend.io import Executor, Where
from xenblockctl.backend.requests import DeviceLimits, IoPlan
from xenblockctl.backend.transport.base import (
    GNTST_OKAY,
    Bounce,
    CopyItem,
    NativeWaiter,
    Transport,
    gntst_name,
)

_native: types.ModuleType | None
try:
    from xenblockctl.backend import _grantcopy as _native
except ImportError as _exc:  # not built (no compiler, no Python headers): the pure-Python path
    _native = None
    _WHY_NOT = f"native module not built ({_exc})"
else:
    _WHY_NOT = ""

#: idle bytes a ring's pool keeps for reuse (beyond that, a returned buffer is unmapped): enough
#: for a full ring of 128 KiB requests, or four 1 MiB ones
DEFAULT_POOL_BYTES = 4 << 20


class BouncePool:
    """Bounce buffers by size class (whole pages, rounded up to a power of two), reused: a ring's
    requests take and give them back from the ring thread and the I/O workers alike."""

    def __init__(self, max_idle_bytes: int = DEFAULT_POOL_BYTES) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[Bounce]] = {}
        self._idle_bytes = 0
        self._lock = fast_lock()  # two per request without persistent grants (take, give)
        self._closed = False
        self.created = 0

    def take(self, nbytes: int) -> Bounce:
        size = PAGE_SIZE
        while size < nbytes:
            size <<= 1
        with self._lock:
            free = self._idle.get(size)
            if free:
                self._idle_bytes -= size
                return free.pop()
            self.created += 1
        return Bounce(size)

    def give(self, bounce: Bounce) -> None:
        with self._lock:
            if not self._closed and self._idle_bytes + bounce.nbytes <= self.max_idle_bytes:
                self._idle.setdefault(bounce.nbytes, []).append(bounce)
                self._idle_bytes += bounce.nbytes
                return
        bounce.close()

    def close(self) -> None:
        """Unmap every idle buffer; buffers given back later are unmapped at once."""
        with self._lock:
            self._closed = True
            idle, self._idle, self._idle_bytes = self._idle, {}, 0
        for buffers in idle.values():
            for bounce in buffers:
                bounce.close()


class Staged:
    """One request's data in a Bounce: what the data plane holds where it would hold a mapping
    (`unmap()` when the I/O is over gives the buffer back)."""

    __slots__ = ("bounce", "length", "plan", "pool", "to_guest")

    def __init__(self, pool: BouncePool, plan: IoPlan, to_guest: bool) -> None:
        self.pool: BouncePool | None = pool
        self.plan = plan
        self.to_guest = to_guest
        self.length = plan.length
        self.bounce = pool.take(plan.length)

    def iovecs(self) -> list[memoryview]:
        """The one buffer preadv/pwritev moves the request's bytes through."""
        return [self.bounce.view[: self.length]]

    def item(self) -> CopyItem:
        """The request's pages against our buffer (segments back to back), for grant_copy."""
        return self.plan.grefs, self.plan.extents, self.bounce

    def unmap(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.give(self.bounce)


def failures(staged: Sequence[Staged], statuses: Sequence[int]) -> dict[int, str]:
    """Which of `staged` (by index) a copy with these per-segment `statuses` failed, and why
    (its first bad segment). Segments are in the order of `staged`, each request's in its order."""
    out: dict[int, str] = {}
    if not any(statuses):
        return out
    at = 0
    for i, item in enumerate(staged):
        n = len(item.plan.grefs)
        for j in range(at, at + n):
            if statuses[j] != GNTST_OKAY:
                ref = item.plan.grefs[j - at]
                way = "into" if item.to_guest else "out of"
                out[i] = f"grant copy {way} ref {ref} (segment {j - at}) failed: {gntst_name(statuses[j])}"
                break
        at += n
    return out


#: the native pass's own bounce buffer: a chunk of a pass is as many requests as fit (23 of 11 pages,
#: two copy calls for them; GRUB's are one page), the rest of the pass goes in the next chunk of the
#: same call. Anonymous memory: only the pages a ring's requests have used are ever faulted in.
NATIVE_BOUNCE_BYTES = 256 * PAGE_SIZE
_HOST_PAGE = mmap.PAGESIZE


def native_available() -> bool:
    """backend/_grantcopy.c is built and imports."""
    return _native is not None


def describe(enabled: bool) -> str:
    """Which pass serves frontends without persistent grants, for the engine's start-up log line."""
    if not enabled:
        return "grant copy in pure Python (native passes turned off)"
    if _native is None:
        return f"grant copy in pure Python ({_WHY_NOT})"
    return "native grant-copy pass for direct READ/WRITE (backend/_grantcopy.c)"


class NativeCopy:
    """The native grant-copy pass for one data plane (its device, limits, executor, and the
    transport's way to copy its domain's grants)."""

    __slots__ = ("_bounce", "_executor", "_fixed", "_how", "_loop", "_serve", "served")

    def __init__(
        self,
        abi: blkif.Abi,
        limits: DeviceLimits,
        executor: Executor,
        bounce: Bounce,
        how: tuple[object, ...],
    ) -> None:
        assert _native is not None
        self._serve = _native.serve
        self._loop = _native.loop
        self._executor = executor
        self._bounce = bounce
        #: (domid, gntdev fd or -1, the transport's copier or None)
        self._how = how
        #: requests answered here so far (tests and benchmarks: which path ran)
        self.served = 0
        target = executor.target
        self._fixed = (
            abi.id_offset,
            limits.sectors,
            target.size_bytes,
            limits.logical_block_size,
            limits.read_only,
            target.fd,
        )

    @classmethod
    def create(
        cls,
        enabled: bool,
        abi: blkif.Abi,
        limits: DeviceLimits,
        executor: object,
        *,
        transport: Transport,
        domid: int,
    ) -> NativeCopy | None:
        """The native pass for a data plane that copies grants, or None where it does not apply."""
        if not enabled or _native is None or type(executor) is not Executor:
            return None
        bounce = Bounce(NATIVE_BOUNCE_BYTES)
        how = transport.native_copier(domid, bounce)
        if how is None:
            bounce.close()
            return None
        copy_fd, copier = how
        return cls(abi, limits, executor, bounce, (domid, copy_fd, copier))

    def serve(self, data: bytes, start: int, count: int) -> tuple[list[tuple[int, int, int]], int]:
        """Serve slots [start, next) of the copied batch: their answers (all RSP_OKAY) and next,
        the first slot it did not finish (count when it did them all)."""
        executor = self._executor
        read, write = executor.placement()
        answers, stop = self._serve(
            data,
            start,
            count,
            *self._fixed,
            executor.write_fd,
            _MODES[read],
            _MODES[write],
            _HOST_PAGE,
            self._bounce.view,
            *self._how,
        )
        self.served += len(answers)
        return answers, stop

    def loop(
        self,
        lent: tuple[memoryview, int, int, int],
        ring_size: int,
        waiter: NativeWaiter,
        *,
        stop: bytearray,
        pending: bool,
        batch: int,
        budget: int,
        stats: object,
    ) -> LoopExit:
        """The wait-and-serve loop (ring_loop.h, with this pass as its serve step: _grantcopy.c's
        loop()): on the ring `lent` (BackRing.lend()),
        wait on the event channel (`waiter`: EventChannel.native_waiter()), serve, answer, push,
        notify, unmask, until something needs Python (LoopExit). `stop[0]` nonzero ends it;
        `pending`: the last wake-up's unmask is still owed. It adds its requests, wake-ups and
        notifies to `stats` (the data plane's QueueStats) and to `served` before each sleep."""
        executor = self._executor
        read, write = executor.placement()
        return run_loop(
            self._loop,
            lent,
            ring_size,
            waiter,
            self,
            stop=stop,
            pending=pending,
            batch=batch,
            budget=budget,
            stats=stats,
            pass_args=(
                *self._fixed,
                executor.write_fd,
                _MODES[read],
                _MODES[write],
                _HOST_PAGE,
                self._bounce.view,
                *self._how,
            ),
        )

    def close(self) -> None:
        """Unmap the bounce buffer (the ring thread is done: nothing of C's can be using it)."""
        self._bounce.close()


#: io.Where -> the C pass's mode (fastpath.native_modes: one mapping for both native passes)
_MODES: dict[Where, int] = native_modes(_native) if _native is not None else {}


__all__ = [
    "DEFAULT_POOL_BYTES",
    "NATIVE_BOUNCE_BYTES",
    "BouncePool",
    "NativeCopy",
    "Staged",
    "describe",
    "failures",
    "native_available",
]
