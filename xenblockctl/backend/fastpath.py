"""The optional native fast path of the ring pass (issue 20): when it is used, and how it is called.

`_fastpass` is a small C extension (backend/_fastpass.c, built by setup.py as an optional
extension, so a build without a compiler still installs). Given a pass's copied request slots it
serves the longest prefix of simple requests — READ/WRITE, with direct or indirect segments, whose
pages (indirect descriptor pages included) are all in the ring's persistent grant cache — with the
same validation rules as requests.validate_slot (tests/unit/test_fastpass.py checks that the two
agree on arbitrary bytes) and the same choice of where the I/O runs as io.Executor.run_now, and
returns their answers and where it stopped.
DataPlane._serve_batch serves the request it stopped at through the pure-Python path (which
validates, logs and answers everything unusual) and calls it again for the rest. A run's answers
that are next in ring order (nothing held, the run starts at rsp_prod_pvt) are written into the
ring by `_fastpass.respond` (BackRing.respond_run: ring.py's journal protocol, per answer, in C;
tests/unit/test_fastpass.py checks it leaves the ring byte for byte as respond_all does); any
other answer goes through ring.py's respond_all as before. A pass of large requests that follows a
sleep of the ring thread is served in runs cut at CUT_BYTES, each pushed before the next one's I/O
(DataPlane._cut_for_pass: the QD-4 turnaround, bench/README.md).

The wait-and-serve loop (`FastPass.loop`, _fastpass.c's loop() on ring_loop.h, shared with the
grant-copy pass): where the event channel has a blocking wake-up, DataPlane._loop_natively lends the
ring to one native call that takes, serves (the same pass), answers, pushes, notifies, unmasks,
makes the final check and sleeps. A pass whose pages the cache's C index holds is decoded, looked
up and run without the GIL; the loop takes it once before each sleep, for the counts and the refs
its runs used (note_used, a sleep's runs at once), and for a slot the index alone cannot decide (a
page not indexed yet, anything refused: tried again from there with the GIL). It returns to Python
for any slot the pass stops at (served from there by DataPlane._serve_fast), a stop, an impossible
req_prod or every 256 requests.

Used only where it applies: an io.Executor (not NBD) and persistent grants negotiated (the cache's
pages; Linux blkfront's case). Everything else — grants copied or mapped per request, the local
transport's own table — stays on the pure-Python path, which remains complete and is what runs
when the module is not built or `xenblockctl backend --no-native` turns it off.

Grant cache bookkeeping: the C code only reads the cache's dict of entries (ring thread, between
acquire() calls, which are the only place entries are evicted). That dict is a `_fastpass.Pages`
(GrantCache.index_pages): it keeps a buffer export on each page view the C pass has looked up,
with its address in a C table, until the cache removes that page (the dict's pop drops it first),
so a page's view cannot be released, nor its mapping closed, while C can still reach it. The
pages it used are noted with GrantCache.note_used once per call (serve) or, in the loop, once per
sleep (the refs of the runs since, in ring order): those requests count as one use for the LRU
order (close to per request, as the cache's own shapes already are; see grantcache.py). Eviction
happens only in acquire(), on the ring thread, after the loop has returned and noted them all.

What a stop costs: the request is tried twice. A READ that misses the page cache makes one
RWF_NOWAIT preadv2 here and one in run_now before it goes to a worker; a short transfer is redone
in full by Python's path (safe: the request is not answered yet, as io.execute_nowait explains);
an indirect request's descriptor pages are read again by Python's validation, which decides on its
own copy alone (ours only decided to stop).
"""

from __future__ import annotations

import mmap
import types
from collections.abc import Callable, Iterable
from typing import NamedTuple

from xenblockctl.backend import blkif
from xenblockctl.backend.grantcache import GrantCache
from xenblockctl.backend.io import DeviceTarget, Executor, Where
from xenblockctl.backend.requests import DeviceLimits
from xenblockctl.backend.ring import RunWriter
from xenblockctl.backend.transport.base import NativeWaiter

_native: types.ModuleType | None
try:
    from xenblockctl.backend import _fastpass as _native
except ImportError as _exc:  # not built (no compiler, no Python headers): the pure-Python path
    _native = None
    _WHY_NOT = f"native module not built ({_exc})"
else:
    _WHY_NOT = ""

_HOST_PAGE = mmap.PAGESIZE
#: a native run the data plane asks to cut ends once it holds this many bytes, and the data plane
#: publishes each cut run before the next one's I/O (issue 20, the QD-4 turnaround): the frontend
#: refills its ring while the engine copies, instead of waiting for the whole pass. Runs of small
#: requests never reach it (a 4 KiB QD-32 pass is 128 KiB); bench/README.md, "turnaround".
CUT_BYTES = 2 << 20
#: how long the native loop watches req_prod for the frontend's refill after a pass before it arms
#: req_event and sleeps (ring_loop.h's poller; it pauses itself while polls catch nothing). Longer
#: than a frontend's turnaround on an idle CPU: its wake-up (~25 µs on the test VM) and its refill.
#: bench/README.md, issue 20, "a poll for the refill".
POLL_NS = 50_000
#: index the cache's pages in C (_fastpass.Pages); False only for bench/ring_cpu's `--native dict`
#: rows, which measure the plain dict lookup it replaced (a dict get and a buffer export per page)
INDEX_PAGES = True


def available() -> bool:
    """The extension is built and imports."""
    return _native is not None


def describe(enabled: bool) -> str:
    """Which ring pass the engine runs, for its start-up log line."""
    if not enabled:
        return "pure Python (native fast path turned off)"
    if _native is None:
        return f"pure Python ({_WHY_NOT})"
    return "native fast path for cached READ/WRITE (backend/_fastpass.c), pure Python for the rest"


class FastPass:
    """The native pass for one data plane (its device, limits, executor and grant cache)."""

    __slots__ = (
        "_cache",
        "_entries",
        "_executor",
        "_fixed",
        "_loop",
        "_serve",
        "served",
        "write_answers",
    )

    def __init__(
        self,
        abi: blkif.Abi,
        limits: DeviceLimits,
        target: DeviceTarget,
        executor: Executor,
        cache: GrantCache,
    ) -> None:
        assert _native is not None
        self._serve = _native.serve
        self._loop = _native.loop
        #: writes a run of answers next in ring order into the ring (BackRing.respond_run): ring.py's
        #: loop per answer cost ~0.5 µs of Python per cached 4 KiB request (a third of the pass)
        self.write_answers: RunWriter = _native.respond
        self._executor = executor
        self._cache = cache
        #: requests answered here so far (tests and benchmarks: which path ran)
        self.served = 0
        # indexed in C: a 1 MiB request's 256 page lookups cost one probe each, not a dict get,
        # a PyLong and a buffer export (~11 µs a request)
        self._entries = cache.index_pages(_native.Pages) if INDEX_PAGES else cache.native_pages()
        self._fixed = (
            abi.id_offset,
            limits.sectors,
            target.size_bytes,
            limits.logical_block_size,
            limits.read_only,
            limits.max_indirect_segments,
        )

    @classmethod
    def create(
        cls,
        enabled: bool,
        abi: blkif.Abi,
        limits: DeviceLimits,
        executor: object,
        cache: GrantCache | None,
    ) -> FastPass | None:
        """The fast path for a data plane, or None where it does not apply."""
        if not enabled or _native is None or cache is None or type(executor) is not Executor:
            return None
        return cls(abi, limits, executor.target, executor, cache)

    def serve(
        self, data: bytes, start: int, count: int, cut: int = 0
    ) -> tuple[list[tuple[int, int, int]], int, bool]:
        """Serve slots [start, next) of the copied batch: their answers (all RSP_OKAY), next, the
        first slot it did not finish (count when it did them all), and whether the run was only
        cut at `cut` bytes (0: not cut; then slot next is the next call's, not one it could not
        serve)."""
        executor = self._executor
        read, write = executor.placement()
        answers, stop, refs, was_cut = self._serve(
            data,
            start,
            count,
            *self._fixed,
            executor.read_fd,
            executor.write_fd,
            _MODES[read],
            _MODES[write],
            _HOST_PAGE,
            self._entries,
            cut,
        )
        if refs:
            self.served += len(answers)
            self._cache.note_used(memoryview(refs).cast("I"))
        return answers, stop, was_cut

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
        group: GroupLoop | None = None,
    ) -> LoopExit:
        """The wait-and-serve loop (ring_loop.h, with this pass as its serve step: _fastpass.c's
        loop()): on the ring `lent` (BackRing.lend()), wait on the event channel (`waiter`:
        EventChannel.native_waiter()), serve, answer, push, notify, unmask, until something needs
        Python (LoopExit). `stop[0]` nonzero ends it; `pending`: the last wake-up's unmask is still
        owed. After a pass it watches req_prod for up to POLL_NS before it sleeps (ring_loop.h's
        poller). It adds its requests, wake-ups, notifies and polls to `stats` (the data plane's
        QueueStats) and to `served`, and notes the pages it used in the cache (note_used), before
        each sleep and at its exit, or right after a run once half of _fastpass.c's USED_CAP refs
        wait.
        With a `group` (RingGroup.loop, backend/ringgroup.py) the ring is served
        in that group's one loop, with the same exits, and I/O that waits for the device (direct
        I/O, or any where the executor has no I/O threads: Where.INLINE) is not the group's to run:
        those slots stop the pass, so the ring goes back to its own thread, and a device that hangs
        holds its own ring alone (_GROUP_MODES)."""
        executor = self._executor
        read, write = executor.placement()
        modes = _MODES if group is None else _GROUP_MODES
        executor.in_group = group is not None  # its refused writes are hand-offs, logged (writegate.py)
        got = run_loop(
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
                executor.read_fd,
                executor.write_fd,
                modes[read],
                modes[write],
                _HOST_PAGE,
                self._entries,
                self._cache.note_used,
                CUT_BYTES,
                POLL_NS,
                executor.writes.state,
            ),
            group=group,
        )
        if group is not None:
            executor.writes.report()  # what the group's write gate did, logged (rate-limited)
        return got


class LoopExit(NamedTuple):
    """Why a native wait-and-serve loop returned (ring_loop.h's ring_loop(): FastPass.loop,
    grantcopy.NativeCopy.loop), and the ring as it left it."""

    exit: int  #: EXIT_SLOT, EXIT_CHECK, EXIT_WOKEN, EXIT_BUDGET or EXIT_OSERROR
    req_cons: int
    rsp_prod_pvt: int
    rsp_pushed: int
    pending: bool  #: a wake-up's unmask is still owed
    data: bytes | None  #: EXIT_SLOT: the copy of the batch it stopped in
    at: int  #: EXIT_SLOT: the slot it stopped at (slots [at, taken) are not answered)
    taken: int  #: EXIT_SLOT: the slots in `data`
    requests: int  #: answered (all RSP_OKAY; already in the stats and `served`)
    errno: int  #: EXIT_OSERROR: the read's or unmask's
    notify_errno: int  #: a notify failed (0: none did)


#: the loop's exits, as ring_loop.h spells them (both extensions export them: a test holds them equal)
EXIT_SLOT, EXIT_CHECK, EXIT_WOKEN, EXIT_BUDGET, EXIT_OSERROR = 0, 1, 2, 3, 4


#: a ring group's loop (RingGroup.loop): a native loop()'s arguments in, that ring's exit out
GroupLoop = Callable[[tuple[object, ...]], LoopExit]


def run_loop(
    native_loop: Callable[..., Iterable[object]],
    lent: tuple[memoryview, int, int, int],
    ring_size: int,
    waiter: NativeWaiter,
    owner: object,
    *,
    stop: bytearray,
    pending: bool,
    batch: int,
    budget: int,
    stats: object,
    pass_args: tuple[object, ...],
    group: GroupLoop | None = None,
) -> LoopExit:
    """Call a native pass's loop() (FastPass.loop, grantcopy.NativeCopy.loop) with ring_loop.h's
    LOOP_ARGS head — the lent ring, its indices, the loop's bounds, `stats`, `owner` (whose
    `served` it counts) and the waiter — in the one order loop_parse() reads it, then the pass's
    own arguments (`pass_args`, in the order its loop() parses the rest); or hand those arguments
    to a ring group's loop (`group`, which serves the ring as that loop() would)."""
    buffer, req_cons, pvt, pushed = lent
    args = (
        buffer,
        ring_size,
        req_cons,
        pvt,
        pushed,
        pending,
        batch,
        budget,
        stop,
        stats,
        owner,
        waiter,
        *pass_args,
    )
    if group is not None:
        return group(args)
    return LoopExit._make(native_loop(*args))


def native_modes(native: types.ModuleType) -> dict[Where, int]:
    """io.Where -> a native pass's mode: the same choices, spelled as blkif_slot.h's enum, which
    both extensions (_fastpass, _grantcopy) export."""
    return {
        Where.POOL: native.MODE_STOP,
        Where.NOWAIT: native.MODE_NOWAIT,
        Where.INLINE: native.MODE_BLOCK,
        Where.INLINE_ALIGNED: native.MODE_BLOCK_ALIGNED,
        Where.INLINE_MEMORY: native.MODE_BLOCK,
    }


_MODES: dict[Where, int] = native_modes(_native) if _native is not None else {}
#: a group member's (FastPass.loop): what would run inline whatever the device does (direct I/O,
#: or everything where the executor has no I/O threads) stops, for the ring's own thread. Buffered
#: writes without RWF_NOWAIT (INLINE_ALIGNED: ext4, block devices) stay in the group while the
#: device's write gate is open (MODE_GATED, write_gate.h: the host's dirty pages well below the
#: throttle, no write of the device slept lately), and leave for the ring's thread while it is
#: closed: sending every write pass to its ring's thread and back cost the lane's 1 MiB writes a
#: third (0.90 -> 0.63 of blkback), and a write the kernel throttles would delay the group's other
#: rings as long as it sleeps (writegate.py). RWF_NOWAIT writes (xfs) stay NOWAIT: a refusal leaves.
_GROUP_MODES: dict[Where, int] = (
    _MODES | {Where.INLINE: _native.MODE_STOP, Where.INLINE_ALIGNED: _native.MODE_GATED}
    if _native is not None
    else {}
)


__all__ = [
    "EXIT_BUDGET",
    "EXIT_CHECK",
    "EXIT_OSERROR",
    "EXIT_SLOT",
    "EXIT_WOKEN",
    "FastPass",
    "GroupLoop",
    "LoopExit",
    "available",
    "describe",
    "native_modes",
    "run_loop",
]
