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
  does the same once its limit is reached).
- A page an in-flight request uses is never unmapped: `acquire()` pins each page until the request's
  `Lease.unmap()`, eviction only takes unpinned entries, and `close()` (after the data plane has
  drained) unmaps everything. A reconnect builds a new data plane, hence a new, empty cache.
- Grants are the guest's: on Xen a ref we keep mapped cannot be re-granted to another page (the
  mapping pins it), so a cached entry never goes stale during a connection; between connections the
  cache is empty. The local transport can re-register its grant table mid-connection: entries still
  cached keep the old (still mapped, still the frontend's) memory, anything mapped afterwards comes
  from the new table.

Thread safety: the ring thread calls `acquire()`; I/O workers finish requests and call
`Lease.unmap()`. One lock guards the entries, pin counts and counters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.transport.base import GrantError, GrantMapping, Transport

#: Linux xen-blkback's default `max_persistent_grants` per ring: 32 ring slots x (32 segments + 1
#: indirect page), what Linux blkfront's default pool fills.
DEFAULT_MAX_PERSISTENT_GRANTS = 1056


@dataclass
class GrantCacheStats:
    hits: int = 0  # pages served from a cached mapping
    misses: int = 0  # pages not cached when asked for
    maps: int = 0  # mappings made (cached or transient)
    unmaps: int = 0  # mappings released (evicted, transient done, or at close)
    evictions: int = 0  # cached mappings unmapped to make room
    transient: int = 0  # pages mapped for one request only (cache full of in-use pages, read-only grant)


class _Entry:
    """One mapped page: the mapping and where its bytes are, writable and read-only."""

    __slots__ = ("base", "mapping", "ro_base", "start", "users")

    def __init__(self, mapping: GrantMapping) -> None:
        self.mapping = mapping
        self.base, self.start = mapping.page_location(0)
        self.ro_base = self.base if self.base.readonly else self.base.toreadonly()
        self.users = 0

    def unmap(self) -> None:
        if self.ro_base is not self.base:
            self.ro_base.release()  # our views first: an mmap refuses to close under them
        self.mapping.unmap()


class Lease:
    """What one request holds: pins on cached pages and its own transient mappings. `unmap()` once
    the request's views are released (the same contract as GrantMapping.unmap)."""

    __slots__ = ("_cache", "_pinned", "_transient")

    def __init__(self, cache: GrantCache, pinned: list[_Entry], transient: list[_Entry]) -> None:
        self._cache = cache
        self._pinned = pinned
        self._transient = transient

    def unmap(self) -> None:
        pinned, self._pinned = self._pinned, []
        transient, self._transient = self._transient, []
        self._cache._unpin(pinned, transient)


class GrantCache:
    """The persistent-grant mappings of one ring of domain `domid` (see the module docstring)."""

    def __init__(
        self, transport: Transport, domid: int, max_grants: int = DEFAULT_MAX_PERSISTENT_GRANTS
    ) -> None:
        if max_grants < 0:
            raise ValueError("max_grants must be >= 0")
        self.transport = transport
        self.domid = domid
        self.max_grants = max_grants
        self.stats = GrantCacheStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._closed = False

    @property
    def mapped(self) -> int:
        """Pages held in the cache now (transient mappings not included)."""
        return len(self._entries)

    @property
    def pinned(self) -> int:
        """Cached pages an in-flight request is using now."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.users)

    def acquire(
        self, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, *, writable: bool
    ) -> tuple[list[memoryview], Lease]:
        """Buffers for bytes [offset, offset + length) of page `refs[i]` for each extent i (None:
        whole pages), neighbouring ranges merged, read-only unless `writable`; and the lease that
        keeps them mapped. GrantError if a page cannot be mapped (nothing stays pinned then)."""
        if not refs:
            raise GrantError("no grant refs to map")
        pinned: list[_Entry] = []
        transient: list[_Entry] = []
        order: list[_Entry] = []  # one entry per ref, in ref order
        try:
            with self._lock:
                if self._closed:
                    raise GrantError("grant cache already closed")
                entries = self._entries
                stats = self.stats
                for ref in refs:
                    entry = entries.get(ref)
                    if entry is not None:
                        entries.move_to_end(ref)
                        stats.hits += 1
                    else:
                        stats.misses += 1
                        entry = self._map_missing(ref, writable)
                        if entry.users < 0:  # transient: owned by this request alone
                            transient.append(entry)
                            order.append(entry)
                            continue
                    entry.users += 1
                    pinned.append(entry)
                    order.append(entry)
        except BaseException:
            self._unpin(pinned, transient)
            raise
        return _views(order, extents, writable), Lease(self, pinned, transient)

    def _map_missing(self, ref: int, writable: bool) -> _Entry:
        """Map `ref` (lock held): cached if there is room or an idle entry to evict, else a
        transient entry (marked users = -1) that the caller owns."""
        entries = self._entries
        room = len(entries) < self.max_grants or self._evict_one()
        try:
            mapping = self.transport.map_grants(self.domid, (ref,), writable=True)
        except GrantError:
            if writable:
                raise
            # A read-only grant can still serve a guest WRITE or an indirect page: map it the way
            # it was granted, for this request only, so no cached entry is ever read-only.
            mapping = self.transport.map_grants(self.domid, (ref,), writable=False)
            room = False
        self.stats.maps += 1
        entry = _Entry(mapping)
        if room:
            entries[ref] = entry
        else:
            self.stats.transient += 1
            entry.users = -1
        return entry

    def _evict_one(self) -> bool:
        """Unmap the least-recently-used entry no request is using (lock held). False if all are
        in use (or the cache holds nothing)."""
        for ref, entry in self._entries.items():
            if not entry.users:
                del self._entries[ref]
                entry.unmap()
                self.stats.unmaps += 1
                self.stats.evictions += 1
                return True
        return False

    def _unpin(self, pinned: list[_Entry], transient: list[_Entry]) -> None:
        with self._lock:
            for entry in pinned:
                entry.users -= 1
            self.stats.unmaps += len(transient)
        for entry in transient:
            entry.unmap()

    def close(self) -> int:
        """Unmap every cached page; the cache refuses further use. Call only when no request is in
        flight (the data plane has drained). Returns how many pages were unmapped."""
        with self._lock:
            self._closed = True
            in_use = sum(1 for e in self._entries.values() if e.users)
            if in_use:
                # a caller bug: never unmap under running I/O; leave everything mapped and say so
                raise GrantError(f"{in_use} persistent grants still in use at close")
            entries = list(self._entries.values())
            self._entries.clear()
            for entry in entries:
                entry.unmap()
            self.stats.unmaps += len(entries)
        return len(entries)


def _views(
    order: list[_Entry], extents: Sequence[tuple[int, int]] | None, writable: bool
) -> list[memoryview]:
    """Slices of each entry's page (extent i of page i, or whole pages), ranges that continue each
    other in the same underlying mapping merged into one buffer."""
    out: list[memoryview] = []
    run: memoryview | None = None
    run_obj: object = None
    run_lo = run_hi = -1
    for i, entry in enumerate(order):
        base = entry.base if writable else entry.ro_base
        if extents is None:
            lo = entry.start
            hi = lo + PAGE_SIZE
        else:
            offset, length = extents[i]
            lo = entry.start + offset
            hi = lo + length
        if lo == run_hi and base.obj is run_obj:
            run_hi = hi
            continue
        if run is not None:
            out.append(run[run_lo:run_hi])
        run, run_obj, run_lo, run_hi = base, base.obj, lo, hi
    if run is not None:
        out.append(run[run_lo:run_hi])
    return out


__all__ = ["DEFAULT_MAX_PERSISTENT_GRANTS", "GrantCache", "GrantCacheStats", "Lease"]
