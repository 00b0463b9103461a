"""Persistent grants (blkif `feature-persistent`): one ring's cache of data-page mappings.

Without persistent grants a backend maps a request's grant refs before the I/O and unmaps them
after it: on real Xen that is a gntdev MAP ioctl, an mmap, an munmap and an UNMAP ioctl (plus the
hypervisor's grant map/unmap and TLB flush) per request. When both ends write `feature-persistent`
= 1, the frontend instead keeps a pool of granted pages and reuses the same refs, and the backend
keeps each mapping, keyed by grant ref, until the ring disconnects (xen-block-protocol.md; Linux
xen-blkback/xen-blkfront).

Rules this cache keeps:

- Map on first use, reuse afterwards. Keyed by grant ref only: the domain is fixed per ring (one
  cache per data plane), and a segment's sector range within the page is applied per request.
- A request's pages not yet cached are mapped with one map call (on Xen one MAP ioctl and one
  mmap, instead of one of each per page: a frontend filling its pool after connecting sends
  hundreds of new pages) when they all fit in the limit and the budget below; otherwise, or when
  that call fails (a bad or read-only ref fails the whole call), page by page as before. gntdev
  unmaps a map call's pages only together, so they form a group that is evicted (and given back)
  whole, and never while a request in flight uses any page of it.
- Every cached mapping is **writable**, whatever the request. A guest READ needs to be written into,
  a guest WRITE only read; caching a read-only mapping made for a WRITE and handing it to a later
  READ would fail (or, with a key that ignored the mode, let us write through a page the guest only
  granted read-only). Linux blkback maps persistent grants writable for the same reason, and Linux
  blkfront grants its persistent pool writable. A WRITE still gets read-only *views* of the page.
  A frontend that grants a page read-only (the writable map fails) is served for WRITEs and
  indirect descriptor pages with a read-only mapping for that one request, never cached, so no
  cache entry can ever be of the wrong mode.
- Bounded: at most `max_grants` (default 1056, Linux blkback's `max_persistent_grants`) per ring.
  A miss when full unmaps the least-recently-used mapping that no in-flight request uses; when every
  cached mapping is in use the page is mapped for that request only and unmapped after it (Linux
  does the same once its limit is reached). Recency of requests whose exact list of refs was seen
  before (a remembered "shape", see acquire()) is applied to the LRU order in one go before an
  eviction, so the order is LRU per request, not per page, for those: a close approximation (Linux
  itself approximates, purging unused grants in batches).
- Budgeted across rings: every cached page is one mapping, i.e. one VMA of the process, and a
  process has vm.max_map_count of them (65530 by default): 62 rings at 1056 pages would be past
  it. So all caches of the process share one `MappingBudget` of half of vm.max_map_count (read
  at first use); a cache whose next page finds the budget spent evicts its own least-recently
  used idle page for it, or maps the page for that request only.
- A valid request never fails for a resource the engine itself holds. When mapping a page fails
  for lack of one (EMFILE, ENFILE, ENOMEM: fds, the VMA limit, memory), the cache unmaps idle
  cached pages (a quarter of them at a time) and tries again; with none left idle, it waits
  (bounded) for requests on the I/O workers to finish and free theirs. Pages mapped after such a
  failure are not cached (the cache stops growing into the limit) and are unmapped after the
  request. Only when nothing the ring holds can be given back does the request fail, with the
  reason, as RSP_ERROR.
- A page an in-flight request uses is never unmapped. Only `acquire()` evicts, and only the ring
  thread calls it, so a request served on the ring thread (validation's indirect pages, inline
  I/O) is safe until that thread's next `acquire()`; a request handed to an I/O worker is
  `Lease.pin()`ned first and keeps its pages until its `Lease.unmap()`. Eviction skips every page a
  pinned request (or the request being mapped) names, and `close()` (after the data plane has
  drained) unmaps everything. A reconnect builds a new data plane, hence a new, empty cache.
- Grants are the guest's: on Xen a ref we keep mapped cannot be re-granted to another page (the
  mapping pins it), so a cached entry never goes stale during a connection; between connections the
  cache is empty. The local transport can re-register its grant table mid-connection: entries still
  cached keep the old (still mapped, still the frontend's) memory, anything mapped afterwards comes
  from the new table.

Thread safety: the ring thread alone calls `acquire()` and is the only one to change the entries
(close() runs after it stopped), so a request whose pages are all cached takes no lock. I/O workers
finish pinned requests with `Lease.unmap()`; one lock guards the pinned set, transient mappings and
whatever a miss changes.
"""

from __future__ import annotations

import errno
import logging
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.transport.base import GrantError, GrantMapping, Transport

log = logging.getLogger(__name__)

#: Linux xen-blkback's default `max_persistent_grants` per ring: 32 ring slots x (32 segments + 1
#: indirect page), what Linux blkfront's default pool fills.
DEFAULT_MAX_PERSISTENT_GRANTS = 1056


#: errnos that say the engine ran out of something it holds, not that the guest's ref is bad
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
#: how long one request may wait for requests on the I/O workers to give pages back
RESOURCE_WAIT = 5.0
MAX_MAP_COUNT_PATH = "/proc/sys/vm/max_map_count"


class MappingBudget:
    """How many pages all grant caches sharing this budget may keep mapped together."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("a budget cannot be negative")
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @classmethod
    def from_system(cls, path: str = MAX_MAP_COUNT_PATH) -> MappingBudget:
        """Half of vm.max_map_count: the rest stays for rings, per-request mappings, transient
        pages and everything else the process maps (the interpreter, libraries, thread stacks)."""
        try:
            with open(path, encoding="ascii") as f:
                count = int(f.read().strip())
        except (OSError, ValueError):
            count = 65530  # the kernel's default (DEFAULT_MAX_MAP_COUNT)
        return cls(max(0, count // 2))

    @property
    def used(self) -> int:
        return self._used

    def take(self, pages: int = 1) -> bool:
        """Room for `pages` more pages, all or none."""
        with self._lock:
            if self._used + pages > self.limit:
                return False
            self._used += pages
            return True

    def give(self, pages: int = 1) -> None:
        with self._lock:
            self._used -= pages


_process_budget: list[MappingBudget] = []  # made at first use
_process_budget_lock = threading.Lock()


def process_budget() -> MappingBudget:
    """The budget every cache of this process shares unless given its own (tests)."""
    with _process_budget_lock:
        if not _process_budget:
            _process_budget.append(MappingBudget.from_system())
        return _process_budget[0]


@dataclass
class GrantCacheStats:
    hits: int = 0  # pages served from a cached mapping
    misses: int = 0  # pages not cached when asked for
    maps: int = 0  # mappings made (cached or transient)
    unmaps: int = 0  # mappings released (evicted, transient done, or at close)
    evictions: int = 0  # cached mappings unmapped to make room
    transient: int = 0  # pages mapped for one request only (cache full of in-use pages, read-only grant)
    shed: int = 0  # cached pages unmapped because a mapping failed for lack of resources
    resource_failures: int = 0  # mappings that failed for lack of resources (each retried)
    budget_refusals: int = 0  # pages not cached because the process-wide budget was spent
    whole: int = 0  # requests mapped in one piece outside the cache (page by page did not fit)
    map_calls: int = 0  # transport.map_grants calls (each one MAP ioctl + one mmap on Xen)
    batches: int = 0  # requests whose uncached pages were all mapped by one call (see _batch)
    batch_fallbacks: int = 0  # such calls that failed: the request's pages mapped one by one instead
    prefetches: int = 0  # passes whose next requests' new pages were mapped by one call (prefetch)
    map_seconds: float = 0.0  # wall time spent in those calls (issue 20: what a cold write pays)


class _Group:
    """The pages one map call mapped for the cache (one MAP ioctl + one mmap on Xen). gntdev
    mmaps and unmaps a grant map only whole: its mmap and UNMAP ioctl want the map's exact index
    and count, and a partial munmap of a PV dom0's grant VMA (a split VMA) went wrong in kernels
    without the 2022 fix "xen/gntdev: Accommodate VMA splitting". So the mapping is unmapped once
    its last page has left the cache, and eviction takes a group's pages together
    (GrantCache._remove_group)."""

    __slots__ = ("live", "refs")

    def __init__(self, refs: tuple[int, ...]) -> None:
        self.refs = refs
        self.live = len(refs)  # pages of it still in the cache


class _Entry:
    """One mapped page: the mapping and where its bytes are, writable and read-only."""

    __slots__ = ("base", "group", "mapping", "obj", "place", "ro_base", "start")

    def __init__(
        self, mapping: GrantMapping, regions: _Regions, index: int = 0, group: _Group | None = None
    ) -> None:
        self.mapping = mapping
        self.group = group  # None: the mapping is this page's alone
        self.base, self.start = mapping.page_location(index)
        self.ro_base = self.base if self.base.readonly else self.base.toreadonly()
        self.obj = self.base.obj  # pages of one underlying mapping may merge into one iovec
        # Which mapping and where in it, as one machine-word int: neighbouring pages of one mapping
        # have places PAGE_SIZE apart, pages of different mappings never do.
        self.place = regions.acquire(self.obj) + self.start

    def unmap(self, regions: _Regions) -> None:
        if self.ro_base is not self.base:
            self.ro_base.release()  # our views first: an mmap refuses to close under them
        group = self.group
        if group is None:
            self.mapping.unmap()
        else:
            group.live -= 1
            if not group.live:  # the group's last page: every view of the mapping is released
                self.mapping.unmap()
        regions.release(self.obj)


class _Regions:
    """A small serial number per underlying mapping object (the cache's lock held), so that an
    entry's place fits a machine word and C-level comparisons stay fast. A serial is held while
    entries use the object; the object is referenced meanwhile, so its id cannot be reused."""

    _SHIFT = 40  # a grant table (local) is far smaller than 2**40 bytes

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[object, int]] = {}  # id(obj) -> (obj, serial << _SHIFT)
        self._users: dict[int, int] = {}
        self._free: list[int] = []
        self._next = 1

    def acquire(self, obj: object) -> int:
        key = id(obj)
        slot = self._by_id.get(key)
        if slot is None:
            if self._free:
                serial = self._free.pop()
            else:
                serial = self._next
                self._next += 1
            slot = self._by_id[key] = (obj, serial << self._SHIFT)
            self._users[key] = 0
        self._users[key] += 1
        return slot[1]

    def release(self, obj: object) -> None:
        key = id(obj)
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key]
            self._free.append(self._by_id.pop(key)[1] >> self._SHIFT)


class Lease:
    """What one request holds: its transient mappings, and once `pin()`ned, every page it named.
    `unmap()` once the request's views are released (GrantMapping.unmap's contract)."""

    __slots__ = ("_cache", "pinned", "refs", "transient", "whole")

    def __init__(
        self,
        cache: GrantCache,
        refs: Sequence[int],
        transient: list[_Entry],
        whole: GrantMapping | None = None,
    ) -> None:
        self._cache = cache
        self.refs = refs
        self.transient = transient
        self.whole = whole  # the request mapped in one piece, outside the cache (resource fallback)
        self.pinned = False

    def pin(self) -> None:
        """Keep every page of this request mapped until `unmap()`, whatever later requests need:
        required before the pages leave the ring thread (an I/O worker, a barrier)."""
        self._cache._pin(self)

    def unmap(self) -> None:
        if self.pinned or self.transient or self.whole is not None:
            self._cache._end(self)


class GrantCache:
    """The persistent-grant mappings of one ring of domain `domid` (see the module docstring).

    Costs are per request, not per page, wherever possible: pins are the pinned leases (worked
    out into pages only when an eviction needs them), LRU moves are recorded per request and
    applied before an eviction, and a request whose exact refs were all cached before is served
    from a remembered shape (one tuple hash, buffers precomputed). Only a miss does per-page work.
    """

    def __init__(
        self,
        transport: Transport,
        domid: int,
        max_grants: int = DEFAULT_MAX_PERSISTENT_GRANTS,
        *,
        budget: MappingBudget | None = None,
        name: str | None = None,
    ) -> None:
        if max_grants < 0:
            raise ValueError("max_grants must be >= 0")
        self.transport = transport
        self.domid = domid
        self.max_grants = max_grants
        self.budget = budget if budget is not None else process_budget()
        self.name = name or f"grant cache of domain {domid}"
        self.stats = GrantCacheStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        #: each cached page's own (writable) view, ref -> view: what the native fast path reads
        #: (native_pages); kept in step with _entries, released before its page is unmapped
        self._pages: dict[int, memoryview] = {}
        self._leases: set[Lease] = set()  # requests in flight
        self._regions = _Regions()
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # a pinned request gave its pages back
        self._ended = 0  # pinned requests ended so far (what _give_back waits for)
        self._pressure = False  # the current miss hit a resource failure: cache nothing more
        self._closed = False
        # Request shapes seen with every page cached: refs tuple -> (entries, tick of last use,
        # whole-page runs). A frontend reusing its pool sends the same shapes again and again; a
        # known shape costs one tuple hash instead of per-page passes. Valid only while no entry
        # has been removed: every eviction (and close) forgets them all.
        self._shapes: dict[tuple[int, ...], _Shape] = {}
        # LRU bookkeeping is deferred: requests append (tick, refs) here (shape hits note their
        # tick in the shape) and the entries' order is brought up to date in one go before an
        # eviction needs it (or when this grows long), so a hit costs no per-page move.
        self._recent: list[tuple[int, Sequence[int]]] = []
        self._tick = 0

    @property
    def mapped(self) -> int:
        """Pages held in the cache now (transient mappings not included)."""
        return len(self._entries)

    @property
    def pinned(self) -> int:
        """Cached pages that pinned requests (those on I/O workers) are using now."""
        with self._lock:
            return len(self._busy().intersection(self._entries))

    def _busy(self) -> set[int]:
        """Refs named by a pinned request (lock held)."""
        busy: set[int] = set()
        for lease in self._leases:
            busy.update(lease.refs)
        return busy

    def _pin(self, lease: Lease) -> None:
        with self._lock:
            self._leases.add(lease)
            lease.pinned = True

    def acquire(
        self, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, *, writable: bool
    ) -> tuple[list[memoryview], Lease]:
        """Buffers for bytes [offset, offset + length) of page `refs[i]` for each extent i (None:
        whole pages), neighbouring ranges merged, read-only unless `writable`; and the request's
        lease. The pages stay mapped until this thread's next acquire(), or, once the lease is
        `pin()`ned, until its `unmap()`. GrantError if a page cannot be mapped (nothing is held
        then). Ring thread only."""
        if not refs:
            raise GrantError("no grant refs to map")
        if self._closed:
            raise GrantError("grant cache already closed")
        shape = self._shapes.get(refs) if isinstance(refs, tuple) else None
        if shape is not None:
            # a known shape: its pages are all still cached (no removal since it was recorded);
            # its recency is noted per shape and applied to the LRU order before any eviction
            self._tick += 1
            shape.tick = self._tick
            self.stats.hits += len(shape.order)
            if extents is None:
                runs = shape.runs_w if writable else shape.runs_ro
                if len(runs) == 1:  # one run (every 4 KiB request): no list comprehension frame
                    view, lo, hi = runs[0]
                    return [view[lo:hi]], Lease(self, refs, _NO_TRANSIENT)
                return [view[lo:hi] for view, lo, hi in runs], Lease(self, refs, _NO_TRANSIENT)
            return _views(shape.order, extents, writable), Lease(self, refs, _NO_TRANSIENT)
        entries = self._entries
        try:
            # every page cached: C-level passes over the refs, no lock (only this thread changes
            # the entries)
            order: list[_Entry | None] = list(map(entries.__getitem__, refs))
        except KeyError:
            transient: list[_Entry] = []
            with self._lock:
                order = list(map(entries.get, refs))
                try:
                    self._fill(refs, order, transient, writable)
                except GrantError as exc:
                    self._drop(transient)
                    if exc.errno not in RESOURCE_ERRNOS:
                        raise
                    # Page by page did not fit in what the engine can hold: the whole request
                    # as one mapping, for this request only (one fd-less mapping, one VMA).
                    whole = self._map_whole(refs, writable)
                    self._used(refs)
                    try:
                        views = whole.iovecs(extents)
                    except BaseException:
                        whole.unmap()
                        raise
                    return views, Lease(self, refs, _NO_TRANSIENT, whole)
                except BaseException:
                    self._drop(transient)
                    raise
            lease = Lease(self, refs, transient)
            self._used(refs)
        else:
            self.stats.hits += len(refs)
            self._used(refs)
            if isinstance(refs, tuple):  # hashable as is: remember the shape
                self._remember(refs, order)  # type: ignore[arg-type]
            lease = Lease(self, refs, _NO_TRANSIENT)
        return _views(order, extents, writable), lease  # type: ignore[arg-type]

    def native_pages(self) -> dict[int, memoryview]:
        """The cached pages, ref -> a writable view of exactly that page, for the native fast path
        (backend/fastpath.py) to read on the ring thread between acquire() calls: only acquire()
        evicts (and close(), after the ring thread stopped), so every page it finds stays mapped
        while it runs; it also holds a buffer export on each view it uses. Read only."""
        return self._pages

    def index_pages(
        self, make: Callable[[dict[int, memoryview]], dict[int, memoryview]]
    ) -> dict[int, memoryview]:
        """Hold the page views in `make(views)` from now on: a dict with the same items that the
        native fast path indexes (backend/_fastpass.c's Pages, a dict subclass keeping a buffer
        export on each page it has looked up). This cache changes the dict only with `pop` and
        item assignment, which drop that export first, so a page is still released before it is
        unmapped. Returns what native_pages() returns from then on."""
        with self._lock:
            self._pages = make(self._pages)
            return self._pages

    def note_used(self, refs: Sequence[int]) -> None:
        """The native fast path served requests from these cached pages (in order): count the hits
        and note the use for the LRU order, as acquire() does for the requests it serves."""
        self.stats.hits += len(refs)
        self._used(refs)

    def _used(self, refs: Sequence[int]) -> None:
        self._tick += 1
        self._recent.append((self._tick, refs))
        if len(self._recent) >= _MAX_RECENT:
            self._apply_recency()

    def _apply_recency(self) -> None:
        """Bring the entries' LRU order up to date with every use since the last time: the pages
        of the most recent request last, within a request its later pages after its earlier ones."""
        events = self._recent
        events.extend((shape.tick, shape.refs) for shape in self._shapes.values())
        events.sort(key=_FIRST)
        seen: set[int] = set()
        newest_first: list[int] = []
        placed: set[object] = set()
        for _tick, refs in reversed(events):
            # A frontend reusing its pool repeats the same requests (the native pass notes a whole
            # pass's refs at once: 1028 of them for four 1 MiB requests): an older use of exactly
            # the refs of a newer one places nothing, so it is skipped whole (hashing its refs is
            # one C-level pass; walking them here cost ~7 µs per 1 MiB request)
            key = refs.tobytes() if isinstance(refs, memoryview) else tuple(refs)
            if key in placed:
                continue
            placed.add(key)
            for ref in reversed(refs):
                if ref not in seen:
                    seen.add(ref)
                    newest_first.append(ref)
        entries = self._entries
        for ref in reversed(newest_first):
            if ref in entries:
                entries.move_to_end(ref)
        self._recent = []

    def _remember(self, refs: tuple[int, ...], order: list[_Entry]) -> None:
        if len(self._shapes) >= _MAX_SHAPES:
            self._apply_recency()
            self._forget_shapes()
        self._shapes[refs] = _Shape(
            refs, order, self._tick, _runs(_views(order, None, True)), _runs(_views(order, None, False))
        )

    def _forget_shapes(self) -> None:
        """Drop every remembered shape (their views first: the pages may be unmapped next)."""
        for shape in self._shapes.values():
            for runs in (shape.runs_w, shape.runs_ro):
                for view, _lo, _hi in runs:
                    view.release()
        self._shapes.clear()

    def _fill(
        self, refs: Sequence[int], order: list[_Entry | None], transient: list[_Entry], writable: bool
    ) -> None:
        """Map the refs `order` has no entry for (lock held). Evictions spare the pinned requests'
        pages and this request's own."""
        entries = self._entries
        stats = self.stats
        busy: set[int] | None = None  # worked out at the first eviction, if any
        self._pressure = False
        if self._batch(refs, order):
            return
        for i, ref in enumerate(refs):
            entry = entries.get(ref)  # again: an earlier miss of this request may have cached it
            if entry is not None:
                stats.hits += 1
                order[i] = entry
                continue
            stats.misses += 1
            mapping, cacheable = self._map(ref, refs, writable)
            if self._pressure:
                cacheable = False  # a mapping failed for lack of resources: do not grow into the limit
            # Make room only now that the page is mapped: refs that cannot be mapped (a hostile
            # frontend's garbage) never push good mappings out.
            room = False
            if cacheable:
                if len(entries) < self.max_grants and self.budget.take():
                    room = True
                else:
                    if busy is None:
                        self._prepare_eviction()
                        busy = self._busy()
                        busy.update(refs)
                    # our own least recently used idle page makes room (its budget share with it)
                    room = self._evict_one(busy) and self.budget.take()
                    if not room and len(entries) < self.max_grants:
                        stats.budget_refusals += 1
            stats.maps += 1
            made = _Entry(mapping, self._regions)
            if room:
                self._keep(ref, made)
            else:
                stats.transient += 1
                transient.append(made)
            order[i] = made

    def _batch(self, refs: Sequence[int], order: list[_Entry | None]) -> bool:
        """Map every page of the request that `order` has no entry for with ONE map call and cache
        them all (lock held); True if done. Only where they all fit without an eviction (in the
        cache's limit and the budget): a frontend filling its persistent pool, as Linux blkfront
        does after connecting (528 new pages for 32 MiB of 1 MiB writes), pays one MAP ioctl and
        one mmap per request instead of one per page. Anything else (a full cache, a failed call:
        a bad or read-only ref, or lack of resources) is left to the page-by-page path, which
        evicts, caches, keeps read-only grants transient and gives resources back by its rules,
        so a bad ref still fails only its own request and evicts nothing."""
        missing = tuple(dict.fromkeys(ref for ref, entry in zip(refs, order, strict=True) if entry is None))
        if not self._map_group(missing):
            return False
        n = len(missing)
        entries = self._entries
        stats = self.stats
        stats.batches += 1
        stats.misses += n
        wanted = 0
        for i, ref in enumerate(refs):
            if order[i] is None:
                order[i] = entries[ref]
                wanted += 1
        stats.hits += wanted - n  # a ref named twice: mapped once, found again (as page by page)
        return True

    def _map_group(self, missing: tuple[int, ...]) -> bool:
        """Map `missing` (distinct refs, none cached) with ONE map call and cache them as one group
        (lock held); True if done. Only when they all fit without an eviction, in the cache's limit
        and the budget (taken all or none), and never a single page (it needs no group); a failed
        call (a bad or read-only ref, lack of resources) maps and caches nothing: the caller's
        page-by-page path then applies every rule as before."""
        n = len(missing)
        if n < 2 or len(self._entries) + n > self.max_grants or not self.budget.take(n):
            return False
        try:
            mapping = self._map_grants(missing, True)
        except GrantError as exc:
            self.budget.give(n)
            self.stats.batch_fallbacks += 1
            log.debug(
                "%s: mapping %d pages in one call failed (%s): page by page", self.name, n, exc.one_line()
            )
            return False
        group = _Group(missing)
        for i, ref in enumerate(missing):
            self._keep(ref, _Entry(mapping, self._regions, i, group))
        self.stats.maps += n
        return True

    def prefetch(self, refs: Sequence[int]) -> int:
        """Map the pages of `refs` not cached yet with one map call, for requests about to be served
        (issue 20, the cold write: a pass of requests on new pages cost two map calls per request,
        its indirect pages and its data pages; DataPlane._prefetch asks for a whole pass's in two).
        Only where they all fit without evicting anything (_map_group); otherwise, or if the call
        fails, nothing is mapped and each request maps its own pages in acquire() as before, so a
        bad ref still fails only its own request. Returns the pages mapped. Ring thread only."""
        if self._closed:
            return 0
        entries = self._entries
        with self._lock:
            missing = tuple(dict.fromkeys(ref for ref in refs if ref not in entries))
            if not self._map_group(missing):
                return 0
            self.stats.prefetches += 1
            return len(missing)

    def _prepare_eviction(self) -> None:
        """Before removing entries (lock held): the LRU order must be exact, and a removal ends
        every remembered shape's validity."""
        self._apply_recency()
        self._forget_shapes()

    def _map(self, ref: int, refs: Sequence[int], writable: bool) -> tuple[GrantMapping, bool]:
        """Map one page writable, (mapping, cacheable) (lock held); a read-only grant: mapped
        read-only for this request, never cached."""
        try:
            return self._map_retrying((ref,), True, spare=refs), True
        except GrantError as exc:
            if writable or exc.errno in RESOURCE_ERRNOS:
                raise
        # A read-only grant still serves a guest WRITE or an indirect page: map it as granted,
        # for this request only, so no cached entry is ever read-only.
        return self._map_grants((ref,), False), False

    def _map_grants(self, refs: Sequence[int], writable: bool) -> GrantMapping:
        """transport.map_grants, counted and timed (failed calls too: they cost the same ioctl)."""
        stats = self.stats
        stats.map_calls += 1
        t0 = time.perf_counter()
        try:
            return self.transport.map_grants(self.domid, refs, writable=writable)
        finally:
            stats.map_seconds += time.perf_counter() - t0

    def _map_retrying(self, refs: Sequence[int], writable: bool, spare: Sequence[int]) -> GrantMapping:
        """Map `refs` (lock held). Lack of resources: give idle cached pages back (never one of
        `spare`), or wait for pinned requests to, and try again until RESOURCE_WAIT has passed
        (see the module docstring). The one place that rule lives: single pages and whole
        requests must give up alike."""
        deadline: float | None = None
        while True:
            try:
                return self._map_grants(refs, writable)
            except GrantError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                if deadline is None:
                    deadline = time.monotonic() + RESOURCE_WAIT
                    self._note_pressure(exc)
                if self._give_back(spare, deadline):
                    continue
                raise GrantError(
                    f"{exc.message} (nothing left to give back: {len(self._entries)} pages cached,"
                    f" all in use)",
                    errno=exc.errno,
                ) from exc

    def _drop(self, transient: list[_Entry]) -> None:
        """Unmap a failed request's transient pages (lock held)."""
        for entry in transient:
            entry.unmap(self._regions)
        self.stats.unmaps += len(transient)

    def _map_whole(self, refs: Sequence[int], writable: bool) -> GrantMapping:
        """The request's pages as one mapping outside the cache (lock held), giving back idle
        cached pages (this request's own included: nothing uses them yet) while that fails for
        lack of resources."""
        mapping = self._map_retrying(refs, writable, spare=())
        self.stats.whole += 1
        self.stats.maps += 1
        return mapping

    def _note_pressure(self, exc: GrantError) -> None:
        self.stats.resource_failures += 1
        self._pressure = True
        log.warning(
            "%s: %s; giving back idle persistent grants and retrying (%d cached)",
            self.name,
            exc.one_line(),
            len(self._entries),
        )

    def _give_back(self, spare: Sequence[int], deadline: float) -> bool:
        """Unmap a quarter of the idle cached pages (at least one; never one of `spare`), or wait
        until a pinned request ends (lock held). False if there is nothing to give back before
        `deadline`."""
        while True:
            self._prepare_eviction()
            busy = self._busy()
            busy.update(spare)
            idle = [ref for ref in self._entries if ref not in busy]
            want, shed = max(1, len(idle) // 4), 0
            for ref in idle:
                if shed >= want:
                    break
                if ref in self._entries and self._group_idle(ref, busy):
                    shed += self._remove_group(ref)
            if shed:
                self.stats.shed += shed
                return True
            remaining = deadline - time.monotonic()
            if not self._leases or remaining <= 0:
                return False
            # pinned requests on the I/O workers hold pages: one finishing may free enough
            ended = self._ended
            self._returned.wait(remaining)
            if self._ended != ended:
                return True  # try again: the pages it released may be what was missing

    def _keep(self, ref: int, entry: _Entry) -> None:
        """Cache a mapped page, with the view the native pass's page index serves (lock held);
        _remove undoes both."""
        self._entries[ref] = entry
        self._pages[ref] = entry.base[entry.start : entry.start + PAGE_SIZE]

    def _remove(self, ref: int) -> None:
        """Unmap one cached page and return its budget share (lock held)."""
        self._pages.pop(ref).release()  # our view first: an mmap refuses to close under it
        self._entries.pop(ref).unmap(self._regions)
        self.budget.give()
        self.stats.unmaps += 1

    def _group_idle(self, ref: int, busy: set[int]) -> bool:
        """Whether no request in flight names the page or another page of its group (lock held)."""
        group = self._entries[ref].group
        return ref not in busy and (group is None or busy.isdisjoint(group.refs))

    def _remove_group(self, ref: int) -> int:
        """Unmap a cached page and, if one call mapped it with others, those others too (lock
        held): the memory of a group goes only whole (see _Group). How many pages left."""
        group = self._entries[ref].group
        if group is None:
            self._remove(ref)
            return 1
        gone = 0
        for member in group.refs:
            if member in self._entries and self._entries[member].group is group:
                self._remove(member)
                gone += 1
        return gone

    def _evict_one(self, busy: set[int]) -> bool:
        """Unmap the least-recently-used entry no request in flight names, with its group (lock
        held). False if every cached page (or group) is in use, or the cache holds nothing."""
        for ref in self._entries:
            if self._group_idle(ref, busy):
                self.stats.evictions += self._remove_group(ref)
                return True
        return False

    def _end(self, lease: Lease) -> None:
        """A request is done with its pages (its views released): unpin, drop its transients."""
        with self._lock:
            self._leases.discard(lease)
            lease.pinned = False
            transient, lease.transient = lease.transient, _NO_TRANSIENT
            whole, lease.whole = lease.whole, None
            self.stats.unmaps += len(transient) + (whole is not None)
            for entry in transient:
                entry.unmap(self._regions)
            if whole is not None:
                whole.unmap()
            self._ended += 1
            self._returned.notify_all()

    def close(self) -> int:
        """Unmap every cached page; the cache refuses further use. Returns how many pages were
        unmapped. Meant for after the data plane has drained; if a request still holds pages
        anyway (a bug), those stay mapped (never unmap under I/O that may still run), everything
        else is unmapped, and GrantError says how many were left; a later close() retries them."""
        with self._lock:
            self._closed = True
            self._forget_shapes()
            busy = self._busy() if self._leases else set()
            idle = [ref for ref in self._entries if ref not in busy]
            for ref in idle:
                self._remove(ref)
            if self._entries:
                raise GrantError(f"{len(self._entries)} persistent grants still in use at close: left mapped")
        return len(idle)


_PLACE = operator.attrgetter("place")
_FIRST = operator.itemgetter(0)
#: uses recorded before the LRU order is brought up to date anyway
_MAX_RECENT = 1024
#: request shapes remembered per ring before they are all forgotten (a frontend reusing its pool
#: has at most one shape per ring slot and request size in use)
_MAX_SHAPES = 1024


class _Shape:
    __slots__ = ("order", "refs", "runs_ro", "runs_w", "tick")

    def __init__(
        self,
        refs: tuple[int, ...],
        order: list[_Entry],
        tick: int,
        runs_w: list[tuple[memoryview, int, int]],
        runs_ro: list[tuple[memoryview, int, int]],
    ) -> None:
        self.refs = refs
        self.order = order
        self.tick = tick
        self.runs_w = runs_w
        self.runs_ro = runs_ro


def _runs(views: list[memoryview]) -> list[tuple[memoryview, int, int]]:
    """Whole-page views kept as (view, 0, length): slicing them again per request is one step."""
    return [(v, 0, v.nbytes) for v in views]


_NO_TRANSIENT: list[_Entry] = []  # shared, never appended to: a lease with nothing of its own


def _views(
    order: list[_Entry], extents: Sequence[tuple[int, int]] | None, writable: bool
) -> list[memoryview]:
    """Slices of each entry's page (extent i of page i, or whole pages), ranges that continue each
    other in the same underlying mapping merged into one buffer."""
    out: list[memoryview] = []
    first = order[0]
    run = first.base if writable else first.ro_base
    run_obj = first.obj
    if extents is None:
        n = len(order)
        lo = first.start
        if n == 1:
            return [run[lo : lo + PAGE_SIZE]]
        # Whole pages that are neighbours in one mapping (the local transport, a frontend reusing
        # a block of consecutive refs): one slice, found with C-level passes instead of a loop.
        place = first.place
        if list(map(_PLACE, order)) == list(range(place, place + n * PAGE_SIZE, PAGE_SIZE)):
            return [run[lo : lo + n * PAGE_SIZE]]
        run_lo = first.start
        run_hi = run_lo + PAGE_SIZE
        for entry in order[1:]:
            lo = entry.start
            if lo == run_hi and entry.obj is run_obj:
                run_hi += PAGE_SIZE
                continue
            out.append(run[run_lo:run_hi])
            run = entry.base if writable else entry.ro_base
            run_obj, run_lo, run_hi = entry.obj, lo, lo + PAGE_SIZE
    else:
        offset, length = extents[0]
        run_lo = first.start + offset
        run_hi = run_lo + length
        for entry, (offset, length) in zip(order[1:], extents[1:], strict=True):
            lo = entry.start + offset
            if lo == run_hi and entry.obj is run_obj:
                run_hi += length
                continue
            out.append(run[run_lo:run_hi])
            run = entry.base if writable else entry.ro_base
            run_obj, run_lo, run_hi = entry.obj, lo, lo + length
    out.append(run[run_lo:run_hi])
    return out


__all__ = [
    "DEFAULT_MAX_PERSISTENT_GRANTS",
    "RESOURCE_ERRNOS",
    "GrantCache",
    "GrantCacheStats",
    "Lease",
    "MappingBudget",
    "process_budget",
]
