"""Persistent grants (feature-persistent): the ring's grant cache on its own and inside the data plane,
over the real local transport (memfd grant table), with data checked on the backing file and in the
frontend's pages. Fault injection (a transport that refuses writable maps, slow I/O) only where a
real peer cannot produce the situation."""

from __future__ import annotations

import array
import dataclasses
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.fixtures.backend import (
    DISK_SIZE,
    PairFactory,
    WrappedTransport,
    all_on_workers,
    on_disk,
    ring_params_of,
)
from tests.fixtures.ring_thread import sleeping_in
from xenblockctl.backend import blkif, io
from xenblockctl.backend.blkif import Segment, SegmentRequest
from xenblockctl.backend.dataplane import DataPlane, RingParams
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.grantcache import DEFAULT_MAX_PERSISTENT_GRANTS, GrantCache, MappingBudget
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.requests import IoPlan
from xenblockctl.backend.transport import GrantError, GrantMapping, TransportError
from xenblockctl.backend.transport.local import LocalTransport

# every test on both ring passes: pure Python and the native fast path (tests/fixtures/backend.py)
pytestmark = pytest.mark.usefixtures("engine_path")

ABIS = [blkif.X86_64, blkif.X86_32]


def release_all(views: Sequence[memoryview]) -> None:
    for v in views:
        v.release()


# --- the data plane with persistent grants on and off ------------------------------------------------
@pytest.mark.parametrize("persistent", [False, True], ids=["per-request", "persistent"])
@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@pytest.mark.parametrize("order", [0, 2])
def test_data_integrity_both_modes(
    make_pair: PairFactory, abi: blkif.Abi, order: int, persistent: bool
) -> None:
    pair = make_pair(
        abi=abi,
        ring_page_order=order,
        scramble_ring_refs=order > 0,
        persistent=persistent,
        data_pages=128,
        indirect_pages=8,
    )
    fe, dp = pair.frontend, pair.dataplane
    assert dp.params.persistent is persistent
    assert (dp.grant_cache is not None) is persistent
    for round_ in range(3):  # the same refs come round again: cache hits in persistent mode
        data = os.urandom(44 * 1024)  # 11 segments: a plain request
        assert fe.write(16, data) == blkif.RSP_OKAY
        assert on_disk(pair.path, 16 * 512, len(data)) == data
        assert fe.read(16, len(data)) == data
        assert fe.read(17, 1024) == data[512:1536]  # sub-page segment inside a cached page
        big = os.urandom(100 * 4096)  # 100 segments: an indirect request (indirect page cached too)
        assert fe.write(4096 + round_, big) == blkif.RSP_OKAY
        assert fe.read(4096 + round_, len(big)) == big
        assert on_disk(pair.path, (4096 + round_) * 512, len(big)) == big
    assert dp.stats.errors == 0
    if dp.grant_cache is not None:
        g = dp.grant_cache.stats
        assert g.hits > g.misses > 0, g
        assert g.transient == 0
        assert g.evictions == 0
        assert dp.grant_cache.mapped == g.maps  # nothing was unmapped while serving


def test_repeated_requests_map_each_page_once(
    make_pair: PairFactory, local_transport: LocalTransport
) -> None:
    """The point of the feature: a frontend reusing its pool costs no map after the first use."""
    pair = make_pair(persistent=True, data_pages=16, workers=0)
    fe, cache = pair.frontend, pair.dataplane.grant_cache
    assert cache is not None
    ring_pages = len(pair.dataplane.params.ring_refs)
    calls0 = local_transport.map_calls
    for i in range(200):
        assert fe.write(i, bytes([i]) * 4096) == blkif.RSP_OKAY
        assert fe.read(i, 4096) == bytes([i]) * 4096
    sleeping_in(pair.dataplane)  # the native loop notes its pages just after the answer is out
    # the LIFO pool gives every 1-page request the same ref: one mapping for 400 requests
    assert local_transport.map_calls - calls0 == 1
    assert cache.stats.maps == 1
    assert cache.stats.hits == 399
    assert local_transport.mapped_pages == ring_pages + 1


def _persistent_plane(
    transport: LocalTransport, fe: LocalFrontend, target: DeviceTarget, max_grants: int, workers: int = 0
) -> DataPlane:
    """A data plane that uses persistent grants whatever the frontend's pool order (FIFO pools
    cycle through every page: the worst case for the cache)."""
    params = dataclasses.replace(ring_params_of(fe), persistent=True)
    return DataPlane(
        transport,
        fe.client.domid,
        params,
        target,
        target.limits(),
        workers=workers,
        max_persistent_grants=max_grants,
    )


def test_eviction_keeps_the_cache_bounded(
    local_transport: LocalTransport, disk_file: tuple[Path, int]
) -> None:
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    blob = os.urandom(DISK_SIZE // 8)
    with open(path, "r+b") as f:
        f.write(blob)
    # persistent=False: the pool is FIFO, so 64 distinct refs go round against a limit of 8
    with LocalFrontend(local_transport.socket_path, 40, data_pages=64) as fe:
        dp = _persistent_plane(local_transport, fe, target, max_grants=8)
        dp.start()
        try:
            cache = dp.grant_cache
            assert cache is not None
            for i in range(200):
                sector = (i * 37 % (len(blob) // 4096)) * 8
                assert fe.read(sector, 4096) == blob[sector * 512 : sector * 512 + 4096]
                assert cache.mapped <= 8
            assert fe.read(0, 16 * 4096) == blob[: 16 * 4096]  # one request with 16 > 8 pages
            g = cache.stats
            assert cache.mapped == 8
            assert g.evictions >= 200 - 8, g
            assert g.transient == 8, g  # the 16-page request: 8 cached, 8 more for it alone
            assert g.maps - g.unmaps == 8
            assert local_transport.mapped_pages == 1 + 8  # ring + cache, transients gone
        finally:
            assert dp.stop()
        assert cache.mapped == 0
        assert local_transport.mapped_pages == 0, "stop() unmaps the ring and every cached page"


class _WatchedTransport(WrappedTransport):
    """The local transport, with every one-page mapping's unmap checked against the pages that
    requests are using right now (`busy`, maintained by the test's slow I/O)."""

    def __init__(self, inner: LocalTransport) -> None:
        super().__init__(inner)
        self.busy: dict[int, int] = {}
        self.lock = threading.Lock()
        self.unmapped_while_busy: list[int] = []
        self.refuse_writable: set[int] = set()  # refs "granted read-only" by the frontend

    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        if writable and set(refs) & self.refuse_writable:
            raise GrantError("grant is read-only (GNTST_permission_denied)")
        mapping = self.inner.map_grants(domid, refs, writable=writable, contiguous=contiguous)
        if contiguous:
            return mapping
        pages = tuple(refs)  # one page, or a cold request's pages mapped in one call

        def check() -> None:
            with self.lock:
                self.unmapped_while_busy.extend(ref for ref in pages if self.busy.get(ref))

        return self.on_unmap(mapping, check)


def test_pages_in_flight_are_never_unmapped(
    local_transport: LocalTransport, disk_file: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    watched = _WatchedTransport(local_transport)
    gate = threading.Event()
    real = io.execute

    def slow_execute(tgt: DeviceTarget, plan: IoPlan, bufs: list[memoryview]) -> int:
        # fault injection: I/O that is still running while the ring thread maps more pages
        with watched.lock:
            for ref in plan.grefs:
                watched.busy[ref] = watched.busy.get(ref, 0) + 1
        try:
            gate.wait(10)
            return real(tgt, plan, bufs)
        finally:
            with watched.lock:
                for ref in plan.grefs:
                    watched.busy[ref] -= 1

    monkeypatch.setattr(io, "execute", slow_execute)
    all_on_workers(monkeypatch)
    with LocalFrontend(local_transport.socket_path, 41, data_pages=32) as fe:
        params = dataclasses.replace(ring_params_of(fe), persistent=True)
        dp = DataPlane(watched, 41, params, target, target.limits(), workers=2, max_persistent_grants=4)
        dp.start()
        try:
            cache = dp.grant_cache
            assert cache is not None
            try:
                ids = [fe.submit_write(i * 8, bytes([i + 1]) * 4096) for i in range(8)]
                fe.kick()
                deadline = time.monotonic() + 5
                while dp.in_flight < 8 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert dp.in_flight == 8
                # 4 pages cached and pinned; the other 4 could not evict anything: transient
                assert cache.mapped == 4
                assert cache.pinned == 4
                assert cache.stats.transient == 4
                assert cache.stats.evictions == 0
            finally:
                gate.set()
            done = fe.collect(8)
            assert sorted(done) == sorted(ids)
            assert all(c.response.status == blkif.RSP_OKAY for c in done.values())
            for i in range(8):
                assert on_disk(path, i * 4096, 4096) == bytes([i + 1]) * 4096
            # more distinct pages with slow I/O: evictions happen, never of a busy page
            for round_ in range(3):
                ids = [fe.submit_read(i * 8, 4096) for i in range(6)]
                done = fe.collect(6, timeout=20)
                assert all(done[r].response.status == blkif.RSP_OKAY for r in ids), round_
            assert cache.stats.evictions > 0
            assert watched.unmapped_while_busy == []
            assert cache.pinned == 0
        finally:
            gate.set()
            assert dp.stop()
        assert cache.mapped == 0


def test_read_only_grants_are_never_cached(
    local_transport: LocalTransport, disk_file: tuple[Path, int]
) -> None:
    """A frontend that grants a page read-only: a guest WRITE from it is served with a mapping for
    that request alone; a READ into it (we would write) fails; the cache only ever holds writable
    mappings, so a later READ can never be handed a read-only page or vice versa."""
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    watched = _WatchedTransport(local_transport)
    with LocalFrontend(local_transport.socket_path, 42, data_pages=8) as fe:
        params = dataclasses.replace(ring_params_of(fe), persistent=True)
        dp = DataPlane(watched, 42, params, target, target.limits(), workers=0)
        dp.start()
        try:
            cache = dp.grant_cache
            assert cache is not None
            ref = fe.ring_pages  # first data page
            watched.refuse_writable.add(ref)
            fe.page(ref)[:] = b"R" * 4096
            fe.submit_raw(SegmentRequest(blkif.OP_WRITE, 1, 0, 1, 0, (Segment(ref, 0, 7),)))
            assert fe.collect(1)[1].response.status == blkif.RSP_OKAY
            assert on_disk(path, 0, 4096) == b"R" * 4096
            assert cache.mapped == 0
            assert cache.stats.transient == 1
            fe.submit_raw(SegmentRequest(blkif.OP_READ, 1, 0, 2, 8, (Segment(ref, 0, 7),)))
            assert fe.collect(1)[2].response.status == blkif.RSP_ERROR
            assert bytes(fe.page(ref)) == b"R" * 4096
            # granted writable again: cached from now on, and serves both directions
            watched.refuse_writable.clear()
            fe.submit_raw(SegmentRequest(blkif.OP_READ, 1, 0, 3, 8, (Segment(ref, 0, 7),)))
            assert fe.collect(1)[3].response.status == blkif.RSP_OKAY
            assert bytes(fe.page(ref)) == bytes(4096)
            assert cache.mapped == 1
        finally:
            assert dp.stop()


def _read_into(fe: LocalFrontend, rid: int, sector: int, ref: int) -> int:
    fe.submit_raw(SegmentRequest(blkif.OP_READ, 1, 0, rid, sector, (Segment(ref, 0, 7),)))
    return fe.collect(1)[rid].response.status


def test_evicted_mapping_is_not_reused_after_a_regrant(
    local_transport: LocalTransport, disk_file: tuple[Path, int]
) -> None:
    """Ref R is cached, evicted, then granted again onto a different page: the next read into R
    must land in the new page. A cache that kept (or returned) the old mapping writes into memory
    the frontend no longer uses, and this test sees the old contents."""
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    with open(path, "r+b") as f:
        f.write(b"A" * 4096 + b"B" * 4096)
    with LocalFrontend(local_transport.socket_path, 43, data_pages=16) as fe:
        dp = _persistent_plane(local_transport, fe, target, max_grants=4)
        dp.start()
        try:
            cache = dp.grant_cache
            assert cache is not None
            r = fe.ring_pages
            assert _read_into(fe, 1, 0, r) == blkif.RSP_OKAY
            assert bytes(fe.page(r)) == b"A" * 4096
            for i, other in enumerate(range(r + 1, r + 5)):  # 4 more refs: R is the LRU, evicted
                assert _read_into(fe, 10 + i, 0, other) == blkif.RSP_OKAY
            assert cache.stats.evictions == 1
            fe.regrant()  # every ref now names a new page (with the old contents copied)
            assert _read_into(fe, 2, 8, r) == blkif.RSP_OKAY
            assert bytes(fe.page(r)) == b"B" * 4096, "read landed in the page R was granted to before"
            fe.page(r)[:] = b"C" * 4096
            fe.submit_raw(SegmentRequest(blkif.OP_WRITE, 1, 0, 3, 16, (Segment(r, 0, 7),)))
            assert fe.collect(1)[3].response.status == blkif.RSP_OKAY
            assert on_disk(path, 16 * 512, 4096) == b"C" * 4096
        finally:
            assert dp.stop()


def test_reconnect_starts_with_an_empty_cache(
    local_transport: LocalTransport, disk_file: tuple[Path, int]
) -> None:
    """Each connection is a new grant table (a rebooted guest) with the same ref numbers: a cache
    that outlived its ring would serve the previous guest's pages."""
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    pattern = os.urandom(8 * 4096)
    with open(path, "r+b") as f:
        f.write(pattern)
    for round_ in range(4):
        assert local_transport.mapped_pages == 0
        with LocalFrontend(local_transport.socket_path, 44, data_pages=16, persistent=True) as fe:
            dp = DataPlane(local_transport, 44, ring_params_of(fe), target, target.limits(), workers=0)
            cache = dp.grant_cache
            assert cache is not None
            assert cache.mapped == 0
            assert cache.stats.maps == 0
            assert local_transport.mapped_pages == 1  # the ring only
            dp.start()
            try:
                for i in range(8):
                    assert fe.read(i * 8, 4096) == pattern[i * 4096 : (i + 1) * 4096], round_
                assert fe.read(0, len(pattern)) == pattern
                assert cache.mapped > 0
                assert local_transport.mapped_pages == 1 + cache.mapped
            finally:
                assert dp.stop()
            assert cache.mapped == 0
            assert cache.stats.unmaps == cache.stats.maps
    assert local_transport.mapped_pages == 0


def test_feature_persistent_values() -> None:
    def parse(value: str | None) -> bool:
        return RingParams.parse(
            ring_refs=["8"], event_channel="3", protocol=None, ring_page_order=None, feature_persistent=value
        ).persistent

    assert parse("1") is True
    for hostile in [None, "0", "", " 1", "1 ", "01", "1\n", "true", "yes", "2", "-1", "0x1", "١", "1" * 100]:
        assert parse(hostile) is False, repr(hostile)


# --- the cache on its own --------------------------------------------------------------------------
@pytest.fixture
def frontend(local_transport: LocalTransport) -> Iterator[LocalFrontend]:
    with LocalFrontend(local_transport.socket_path, 45, data_pages=16) as fe:
        for ref in range(fe.total_pages):
            fe.page(ref)[:] = bytes([ref]) * 4096
        yield fe


def test_cache_merges_neighbours_and_hands_out_read_only_views(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    cache = GrantCache(local_transport, 45, max_grants=16)
    bufs, lease = cache.acquire(
        [3, 4, 5, 9, 9], [(512, 3584), (0, 4096), (0, 1024), (0, 4096), (0, 512)], writable=False
    )
    try:
        assert [b.nbytes for b in bufs] == [3584 + 4096 + 1024, 4096, 512]
        assert all(b.readonly for b in bufs)
        assert b"".join(bufs) == b"\x03" * 3584 + b"\x04" * 4096 + b"\x05" * 1024 + b"\x09" * 4608
    finally:
        release_all(bufs)
        lease.unmap()
    assert cache.mapped == 4  # ref 9 twice in one request is one mapping
    bufs, lease = cache.acquire([6, 7], None, writable=True)
    assert [b.nbytes for b in bufs] == [8192]
    assert not bufs[0].readonly
    bufs[0][:4] = b"back"
    release_all(bufs)
    lease.unmap()
    assert bytes(frontend.page(6)[:4]) == b"back"
    assert cache.stats.hits == 1
    assert cache.stats.misses == 6
    assert cache.close() == 6
    assert local_transport.mapped_pages == 0
    with pytest.raises(TransportError):
        cache.acquire([3], None, writable=False)


def test_cache_failure_leaves_nothing_pinned(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    cache = GrantCache(local_transport, 45, max_grants=2)
    with pytest.raises(TransportError) as exc:
        cache.acquire([1, 2, frontend.total_pages + 3], None, writable=True)
    assert exc.value.code == "grant-map"
    assert cache.pinned == 0
    assert cache.mapped == 2  # mapped pages stay cached for the next request; none is pinned
    with pytest.raises(TransportError):
        cache.acquire([], None, writable=True)
    bufs, lease = cache.acquire([1], None, writable=True)
    lease.pin()  # as the data plane does before handing the pages to an I/O worker
    with pytest.raises(TransportError, match="1 persistent grants still in use"):
        cache.close()  # never unmap under a request: ref 1 stays, ref 2 goes
    assert cache.mapped == 1
    assert local_transport.mapped_pages == 1
    assert bytes(bufs[0][:1]) == b"\x01"  # still the frontend's page
    release_all(bufs)
    lease.unmap()
    assert cache.close() == 1
    assert local_transport.mapped_pages == 0


def test_default_limit_is_linux_blkback() -> None:
    assert DEFAULT_MAX_PERSISTENT_GRANTS == 1056


def test_pinned_pages_survive_misses_unpinned_ones_are_evictable(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    """Only the ring thread evicts (in acquire), so a lease used there needs no pin; one handed
    to another thread is pinned, and then no later miss may unmap its pages."""
    cache = GrantCache(local_transport, 45, max_grants=2)
    held, lease = cache.acquire([3, 4], None, writable=False)
    lease.pin()
    assert cache.pinned == 2
    bufs, other = cache.acquire([5], None, writable=False)  # full, all pinned: transient
    assert cache.stats.transient == 1
    assert cache.stats.evictions == 0
    assert bytes(bufs[0][:1]) == b"\x05"
    release_all(bufs)
    other.unmap()
    assert b"".join(held) == b"\x03" * 4096 + b"\x04" * 4096  # still mapped, still the right pages
    release_all(held)
    lease.unmap()
    assert cache.pinned == 0
    bufs, other = cache.acquire([6, 7], None, writable=False)  # unpinned now: both evicted (LRU)
    assert cache.stats.evictions == 2
    assert b"".join(bufs) == b"\x06" * 4096 + b"\x07" * 4096
    release_all(bufs)
    other.unmap()
    assert cache.close() == 2
    assert local_transport.mapped_pages == 0


def _read_pages_into(fe: LocalFrontend, rid: int, sector: int, refs: Sequence[int]) -> int:
    segs = tuple(Segment(ref, 0, 7) for ref in refs)
    fe.submit_raw(SegmentRequest(blkif.OP_READ, len(segs), 0, rid, sector, segs))
    return fe.collect(1)[rid].response.status


def test_remembered_request_shapes_are_forgotten_at_eviction(
    local_transport: LocalTransport, disk_file: tuple[Path, int]
) -> None:
    """A request whose exact refs were all cached before is served from a remembered shape
    (no per-page lookups). An eviction must end that: after the pages are evicted and granted
    again elsewhere, the same refs must reach the new pages, not the views the shape kept."""
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    with open(path, "r+b") as f:
        f.write(b"A" * 8192 + b"B" * 8192)
    with LocalFrontend(local_transport.socket_path, 46, data_pages=16) as fe:
        dp = _persistent_plane(local_transport, fe, target, max_grants=4)
        dp.start()
        try:
            cache = dp.grant_cache
            assert cache is not None
            r = fe.ring_pages
            shape = (r, r + 1)
            for rid in (1, 2, 3):  # miss, all-hit (shape remembered), shape hit
                assert _read_pages_into(fe, rid, 0, shape) == blkif.RSP_OKAY
            sleeping_in(dp)  # the native loop notes its pages just after the answer is out
            assert bytes(fe.page(r)) + bytes(fe.page(r + 1)) == b"A" * 8192
            assert cache.stats.maps == 2
            assert cache.stats.hits == 4
            for i, other in enumerate([(r + 2, r + 3), (r + 4, r + 5)]):  # 4 more: both evicted
                assert _read_pages_into(fe, 10 + i, 0, other) == blkif.RSP_OKAY
            assert cache.stats.evictions == 2
            fe.regrant()
            assert _read_pages_into(fe, 4, 16, shape) == blkif.RSP_OKAY
            assert bytes(fe.page(r)) + bytes(fe.page(r + 1)) == b"B" * 8192, "served from a stale shape"
        finally:
            assert dp.stop()
        assert local_transport.mapped_pages == 0


def test_eviction_takes_the_least_recently_used_page(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    """LRU across plain hits and remembered shapes (whose recency is applied lazily)."""
    cache = GrantCache(local_transport, 45, max_grants=4)

    def use(*refs: int) -> None:
        bufs, lease = cache.acquire(tuple(refs), None, writable=False)
        assert b"".join(bufs) == b"".join(bytes([r]) * 4096 for r in refs)
        release_all(bufs)
        lease.unmap()

    def cached(ref: int) -> bool:
        maps = cache.stats.maps
        use(ref)
        return cache.stats.maps == maps

    use(1, 2)  # miss
    use(1, 2)  # all cached: shape remembered
    use(3)
    use(4)
    use(1, 2)  # shape hit: 1 and 2 are now the most recent, 3 the least
    use(5)  # full: evicts 3
    assert cache.stats.evictions == 1
    assert cached(1)
    assert cached(2)
    assert cached(4)
    assert cached(5)
    use(4)  # order now 1, 2, 5, 4 (oldest first)
    use(6)  # evicts 1
    assert not cached(1)  # (and that miss evicted 2)
    assert cached(4)
    assert cache.close() == 4
    assert local_transport.mapped_pages == 0


def test_repeated_uses_are_skipped_without_changing_the_lru_order(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    """The LRU order after many uses of a few request shapes (as the native pass notes them: a pass's
    refs as a uint32 memoryview; acquire(): tuples or lists), some naming refs not cached, is the
    order a walk over every single use gives (what _apply_recency did before it skipped repeats)."""
    rnd = random.Random(3)
    cache = GrantCache(local_transport, 45, max_grants=16)
    for ref in range(12):
        bufs, lease = cache.acquire([ref], None, writable=False)  # a list: no shape remembered
        release_all(bufs)
        lease.unmap()

    def walked(order: list[int], events: list[tuple[int, Sequence[int]]]) -> list[int]:
        seen: list[int] = []
        for _tick, refs in sorted(events, key=lambda e: e[0], reverse=True):
            seen += [ref for ref in reversed(refs) if ref not in seen]
        for ref in reversed(seen):
            if ref in order:
                order.remove(ref)
                order.append(ref)
        return order

    shapes = [rnd.sample(range(14), rnd.randrange(1, 6)) for _ in range(5)]  # 12, 13: never cached
    for _ in range(30):
        cache._apply_recency()
        before = list(cache._entries)
        for _ in range(rnd.randrange(1, 40)):
            refs = rnd.choice(shapes)
            kind = rnd.randrange(3)
            cache.note_used(
                memoryview(array.array("I", refs)) if kind == 0 else tuple(refs) if kind == 1 else list(refs)
            )
        events = list(cache._recent)
        cache._apply_recency()
        assert list(cache._entries) == walked(before, events)
    assert cache.close() == 12


def test_unmappable_refs_evict_nothing(local_transport: LocalTransport, frontend: LocalFrontend) -> None:
    """Garbage refs from a hostile frontend fail their request without pushing good pages out."""
    cache = GrantCache(local_transport, 45, max_grants=2)
    for ref in (1, 2):
        bufs, lease = cache.acquire((ref,), None, writable=True)
        release_all(bufs)
        lease.unmap()
    for bad in range(frontend.total_pages, frontend.total_pages + 50):
        with pytest.raises(TransportError):
            cache.acquire((bad,), None, writable=False)
    assert cache.stats.evictions == 0
    assert cache.mapped == 2
    maps = cache.stats.maps
    bufs, lease = cache.acquire((1, 2), None, writable=False)
    assert b"".join(bufs) == b"\x01" * 4096 + b"\x02" * 4096
    release_all(bufs)
    lease.unmap()
    assert cache.stats.maps == maps
    assert cache.close() == 2


# --- a cold request's pages in one map call (issue 20: the first write after attach) -----------------
def _pages_of(refs: Sequence[int]) -> bytes:
    return b"".join(bytes([ref]) * 4096 for ref in refs)


def test_a_cold_request_maps_its_pages_in_one_call(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    """On Xen each map call is a MAP ioctl and an mmap (and the hypervisor's map): a frontend
    filling its persistent pool must pay one per request, not one per page. The pages are still
    cached one by one (hits, the native pass's page index)."""
    cache = GrantCache(local_transport, 45, max_grants=16)
    calls = local_transport.map_calls
    refs = (3, 8, 4, 9, 8)  # scattered, one named twice
    bufs, lease = cache.acquire(refs, None, writable=False)
    assert b"".join(bufs) == _pages_of(refs)
    release_all(bufs)
    lease.unmap()
    assert local_transport.map_calls - calls == 1
    assert (cache.mapped, cache.stats.batches, cache.stats.maps) == (4, 1, 4)
    assert (cache.stats.misses, cache.stats.hits) == (4, 1)  # as page by page counted them
    assert local_transport.mapped_pages == 4
    bufs, lease = cache.acquire((9, 3), None, writable=True)  # cached page by page: no map
    assert b"".join(bufs) == _pages_of((9, 3))
    release_all(bufs)
    lease.unmap()
    assert local_transport.map_calls - calls == 1
    pages = cache.native_pages()
    assert sorted(pages) == [3, 4, 8, 9]
    assert all(bytes(pages[ref]) == bytes([ref]) * 4096 for ref in pages)
    assert cache.close() == 4
    assert local_transport.mapped_pages == 0


def test_a_cold_write_through_the_data_plane_is_one_map_call(
    make_pair: PairFactory, local_transport: LocalTransport
) -> None:
    """What blkfront does after connecting: every request brings pages never seen before."""
    pair = make_pair(persistent=True, data_pages=64, workers=0)
    fe, cache = pair.frontend, pair.dataplane.grant_cache
    assert cache is not None
    calls = local_transport.map_calls
    blob = os.urandom(8 * 4096)  # 8 direct segments: one request
    assert fe.write(0, blob) == blkif.RSP_OKAY
    assert local_transport.map_calls - calls == 1
    assert fe.read(0, len(blob)) == blob  # the same pool pages: served from the cache
    assert local_transport.map_calls - calls == 1
    assert cache.stats.batches == 1


def test_a_cold_pass_maps_its_new_pages_ahead_in_two_calls(
    make_pair: PairFactory, local_transport: LocalTransport, engine_path: str
) -> None:
    """Issue 20, the cold write on real Xen: blkfront filling its persistent pool sends a pass of
    indirect requests on new pages; each cost two map calls (its indirect page, then its data
    pages: a MAP ioctl and an mmap each, ~2 ms under TCG). Once the native pass's first request
    has mapped its own, the rest of the pass's new pages are mapped ahead: their indirect pages in
    one call, their data pages in another. The pure-Python pass maps per request, as before."""
    pair = make_pair(persistent=True, data_pages=4 * 32, workers=0)
    fe, cache = pair.frontend, pair.dataplane.grant_cache
    assert cache is not None
    blobs = [os.urandom(32 * 4096) for _ in range(4)]  # 4 requests of 32 pages: indirect
    calls = local_transport.map_calls
    rids = [fe.submit_write(i * 256, blob) for i, blob in enumerate(blobs)]
    done = fe.collect(want=4)  # one kick: the four in one pass
    assert {rid: done[rid].response.status for rid in rids} == dict.fromkeys(rids, blkif.RSP_OKAY)
    if engine_path == "python":
        assert local_transport.map_calls - calls == 8
        assert cache.stats.prefetches == 0
    else:
        assert local_transport.map_calls - calls == 4  # the first request's 2, then 2 for three
        assert cache.stats.prefetches == 2
    assert (cache.mapped, cache.stats.evictions) == (4 * 33, 0)
    assert on_disk(pair.path, 0, 4 * len(blobs[0])) == b"".join(blobs)
    assert fe.read(0, 4 * 32 * 4096) == b"".join(blobs)  # the same pool pages: from the cache
    assert local_transport.map_calls - calls == (8 if engine_path == "python" else 4)


def test_prefetch_maps_only_what_fits_and_a_bad_ref_maps_nothing(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    """GrantCache.prefetch is a hint: one call for the pages not cached yet, only if they all fit
    without an eviction; a failed call (one bad ref) maps nothing, and the good pages are then
    mapped by their own requests as before, the bad ref failing only its own."""
    cache = GrantCache(local_transport, 45, max_grants=6)
    calls = local_transport.map_calls
    assert cache.prefetch((1, 2, 2, 3)) == 3
    assert local_transport.map_calls - calls == 1
    assert cache.prefetch((1, 2, 3)) == 0  # all cached: no call
    assert cache.prefetch((3, 4)) == 0  # one new page: a request maps it as well as we could
    assert cache.prefetch((4, 5, 6, 7)) == 0  # 3 + 4 > 6: never evicts for a hint
    assert local_transport.map_calls - calls == 1
    bad = frontend.total_pages + 3
    assert cache.prefetch((4, bad)) == 0
    assert cache.stats.batch_fallbacks == 1
    assert (cache.stats.prefetches, cache.stats.evictions) == (1, 0)
    assert sorted(cache.native_pages()) == [1, 2, 3]
    bufs, lease = cache.acquire((1, 2, 3), None, writable=False)  # hits
    assert b"".join(bufs) == _pages_of((1, 2, 3))
    release_all(bufs)
    lease.unmap()
    assert cache.stats.map_calls == 2  # the failed one counted: it costs the same ioctl
    with pytest.raises(TransportError):
        cache.acquire((bad,), None, writable=False)
    bufs, lease = cache.acquire((4,), None, writable=False)
    assert b"".join(bufs) == _pages_of((4,))
    release_all(bufs)
    lease.unmap()
    assert sorted(cache.native_pages()) == [1, 2, 3, 4]
    assert cache.close() == 4
    assert local_transport.mapped_pages == 0


def test_a_batch_is_evicted_whole_and_never_while_a_page_of_it_is_pinned(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    """gntdev unmaps a map call's pages only together, so the cache does too: the limit counts
    pages really mapped, and a group one of whose pages a request in flight uses stays."""
    cache = GrantCache(local_transport, 45, max_grants=6)
    for refs in ((1, 2, 3), (4, 5, 6)):
        bufs, lease = cache.acquire(refs, None, writable=False)
        release_all(bufs)
        if refs == (1, 2, 3):
            lease.unmap()
        else:
            held = lease
            held.pin()  # (4, 5, 6) on an I/O worker
    assert cache.stats.batches == 2
    bufs, lease = cache.acquire((7,), None, writable=False)  # full: the LRU group goes whole
    release_all(bufs)
    lease.unmap()
    assert cache.stats.evictions == 3
    assert sorted(cache.native_pages()) == [4, 5, 6, 7]
    assert local_transport.mapped_pages == 4
    bufs, lease = cache.acquire((8, 9, 10), None, writable=False)  # no room for a batch
    assert b"".join(bufs) == _pages_of((8, 9, 10))
    release_all(bufs)
    lease.unmap()
    assert sorted(cache.native_pages()) == [4, 5, 6, 8, 9, 10], "a pinned group was evicted"
    assert cache.stats.evictions == 4  # 7 alone
    held.unmap()
    bufs, lease = cache.acquire((11,), None, writable=False)
    release_all(bufs)
    lease.unmap()
    assert sorted(cache.native_pages()) == [8, 9, 10, 11]  # (4, 5, 6) idle now, LRU: gone whole
    assert cache.stats.evictions == 7
    assert local_transport.mapped_pages == 4
    assert cache.close() == 4
    assert local_transport.mapped_pages == 0


def test_a_failed_batch_falls_back_to_page_by_page(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    """One bad ref fails the whole map call (gntdev maps all or nothing): the request is then
    mapped page by page, so the bad ref fails only its own request, the good pages are cached as
    before, and nothing is evicted for it."""
    cache = GrantCache(local_transport, 45, max_grants=4)
    bufs, lease = cache.acquire((1, 2), None, writable=False)
    release_all(bufs)
    lease.unmap()
    bad = frontend.total_pages + 3
    with pytest.raises(TransportError):
        cache.acquire((3, bad), None, writable=False)
    assert cache.stats.batch_fallbacks == 1
    assert sorted(cache.native_pages()) == [1, 2, 3]
    with pytest.raises(TransportError):
        cache.acquire((bad, bad + 1), None, writable=False)  # 3 + 2 > 4: page by page at once
    assert cache.stats.batch_fallbacks == 1
    assert cache.stats.evictions == 0
    assert sorted(cache.native_pages()) == [1, 2, 3]
    assert cache.close() == 3
    assert local_transport.mapped_pages == 0


def test_a_read_only_grant_in_a_cold_request_stays_transient(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    watched = _WatchedTransport(local_transport)
    watched.refuse_writable.add(5)
    cache = GrantCache(watched, 45, max_grants=16)
    bufs, lease = cache.acquire((4, 5, 6), None, writable=False)  # a guest WRITE may use it
    assert b"".join(bufs) == _pages_of((4, 5, 6))
    release_all(bufs)
    lease.unmap()
    assert cache.stats.batch_fallbacks == 1
    assert sorted(cache.native_pages()) == [4, 6]
    assert cache.stats.transient == 1
    assert cache.close() == 2
    assert local_transport.mapped_pages == 0


def test_a_batch_takes_its_whole_budget_or_none() -> None:
    budget = MappingBudget(4)
    assert budget.take(3)
    assert not budget.take(2)
    assert budget.used == 3
    assert budget.take()
    budget.give(4)
    assert budget.used == 0


def test_a_cold_request_over_the_budget_is_mapped_page_by_page(
    local_transport: LocalTransport, frontend: LocalFrontend
) -> None:
    budget = MappingBudget(3)
    cache = GrantCache(local_transport, 45, max_grants=16, budget=budget)
    bufs, lease = cache.acquire((1, 2, 3, 4), None, writable=False)
    assert b"".join(bufs) == _pages_of((1, 2, 3, 4))
    release_all(bufs)
    lease.unmap()
    assert cache.stats.batches == 0
    assert (cache.mapped, budget.used, cache.stats.budget_refusals) == (3, 3, 1)
    assert cache.close() == 3
    assert budget.used == 0
    assert local_transport.mapped_pages == 0
