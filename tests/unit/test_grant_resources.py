"""Issue 13, item 3: a valid request never fails for a resource the engine itself holds.

- Grant mappings hold no file descriptor. On real Xen every mapping used to be its own
  `mmap.mmap(gntdev_fd, ...)`, which CPython 3.11 backs with a dup() of the fd: a persistent-grant
  cache of 1056 pages per ring went past RLIMIT_NOFILE and mkfs got EIO. The Xen transport's mapping
  code runs here for real over a memfd standing in for /dev/xen/gntdev (only the two gntdev ioctls
  are faked: there is no gntdev without Xen; the mmap at the map's index offset is the real one),
  and /proc/self/fd is counted.
- When mapping fails for lack of resources anyway (fds, the VMA limit, memory), the grant cache
  gives idle cached pages back and retries, and maps a request in one piece outside the cache when
  page by page does not fit. The kernel cannot produce EMFILE/ENOMEM on demand for one mapping, so
  a fault-injecting wrapper around the real local transport refuses mappings beyond a live count,
  as a process limit would; the data, the frontend and the data plane are real.
- The caches of all rings share a budget taken from vm.max_map_count.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.fixtures.backend import WrappedTransport, on_disk, ring_params_of
from xenblockctl.backend import blkif, io
from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.grantcache import GrantCache, MappingBudget
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.requests import IoPlan
from xenblockctl.backend.transport import GrantError, GrantMapping
from xenblockctl.backend.transport import xen as xen_transport
from xenblockctl.backend.transport.fixedmap import Reservation
from xenblockctl.backend.transport.local import LocalTransport, create_grant_memfd

# every test on both ring passes: pure Python and the native fast path (tests/fixtures/backend.py)
pytestmark = pytest.mark.usefixtures("engine_path")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- no fd per mapping ------------------------------------------------------------------------------
@pytest.fixture
def fake_gntdev(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[xen_transport.XenTransport, int]]:
    """A XenTransport whose "gntdev" is a memfd of 4096 pages; page N of the memfd is "grant ref"
    N of domain 7. MAP_GRANT_REF answers index = first ref (refs must be consecutive), UNMAP is
    counted. Everything else (reservation, MAP_FIXED mmap at the index offset, views, munmap,
    UNMAP order) is the transport's real code."""
    pages = 4096
    memfd = create_grant_memfd(pages, "fake-gntdev")
    with mmap.mmap(memfd, pages * PAGE_SIZE) as m:
        for ref in range(pages):
            m[ref * PAGE_SIZE : ref * PAGE_SIZE + 4] = ref.to_bytes(4, "little")
    unmapped: list[int] = []
    real_ioctl = fcntl.ioctl

    def fake_ioctl(fd: int, request: int, arg: object = 0, mutate: bool = True) -> object:
        if fd != memfd:
            return real_ioctl(fd, request, arg, mutate)  # type: ignore[call-overload]
        if request == xen_transport.IOCTL_GNTDEV_MAP_GRANT_REF:
            assert isinstance(arg, bytearray)
            count, _index, refs = xen_transport.decode_map_grant_ref(arg)
            first = refs[0][1]
            assert [r for _d, r in refs] == list(range(first, first + count))
            arg[8:16] = (first * PAGE_SIZE).to_bytes(8, "little")
            return 0
        if request == xen_transport.IOCTL_GNTDEV_UNMAP_GRANT_REF:
            assert isinstance(arg, bytes | bytearray)
            unmapped.append(int.from_bytes(bytes(arg)[:8], "little"))
            return 0
        raise AssertionError(f"unexpected gntdev ioctl {request:#x}")

    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    transport = object.__new__(xen_transport.XenTransport)
    transport._gntdev = memfd
    try:
        yield transport, memfd
    finally:
        transport.close()


def test_two_thousand_gntdev_mappings_add_no_fd(fake_gntdev: tuple[xen_transport.XenTransport, int]) -> None:
    transport, _memfd = fake_gntdev
    before = open_fds()
    mappings: list[GrantMapping] = []
    try:
        for ref in range(2000):
            mappings.append(transport.map_grants(7, [ref], writable=True))
        assert open_fds() == before, "a grant mapping must not hold a file descriptor"
        for ref in (0, 1, 999, 1999):
            assert bytes(mappings[ref].page(0)[:4]) == ref.to_bytes(4, "little")
        mappings[5].page(0)[4:8] = b"back"  # writable, and shared with the "granted" page
        ring = transport.map_grants(7, [3000, 3001, 3002, 3003], writable=True, contiguous=True)
        mappings.append(ring)
        assert bytes(ring.buffer[2 * PAGE_SIZE : 2 * PAGE_SIZE + 4]) == (3002).to_bytes(4, "little")
        ro = transport.map_grants(7, [42], writable=False)
        mappings.append(ro)
        assert ro.page(0).readonly
        assert open_fds() == before
    finally:
        for m in mappings:
            m.unmap()
    assert open_fds() == before
    with mmap.mmap(_memfd, PAGE_SIZE, offset=5 * PAGE_SIZE) as check:
        assert check[4:8] == b"back"


def test_grant_cache_of_two_thousand_pages_adds_no_fd(
    fake_gntdev: tuple[xen_transport.XenTransport, int],
) -> None:
    transport, _memfd = fake_gntdev
    cache = GrantCache(transport, 7, max_grants=2000, budget=MappingBudget(4000))
    before = open_fds()
    for first in range(0, 2000, 8):
        bufs, lease = cache.acquire(tuple(range(first, first + 8)), None, writable=False)
        assert bytes(bufs[0][:4]) == first.to_bytes(4, "little")
        for b in bufs:
            b.release()
        lease.unmap()
    assert cache.mapped == 2000
    assert open_fds() == before
    assert cache.close() == 2000


def _maps_line(addr: int) -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, _, rest = line.partition("-")
            hi = rest.split()[0]
            if int(lo, 16) <= addr < int(hi, 16):
                return line.strip()
    return ""


def test_failed_placement_leaves_the_range_ours() -> None:
    """A MAP_FIXED mmap that fails may have unmapped the range first (Linux 6.1 unmaps, then
    refuses a writable shared mapping of a write-sealed memfd; gntdev refuses a bad grant ref the
    same way). The reservation must be whole again afterwards, or a mapping another thread makes
    could land in the hole and be unmapped with the reservation later."""
    fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    good = create_grant_memfd(4)
    try:
        os.ftruncate(fd, 4 * PAGE_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        res = Reservation(3)
        addr = res.base + PAGE_SIZE
        with pytest.raises(OSError) as exc:
            res.place(1, fd, 0, 1, writable=True)
        assert exc.value.errno == errno.EPERM
        assert "/dev/zero (deleted)" in _maps_line(addr), "the failed page is our reservation again"
        res.place(1, good, 2 * PAGE_SIZE, 1, writable=True)  # still usable
        assert "memfd:xbc-grants" in _maps_line(addr)
        res.close()
    finally:
        os.close(fd)
        os.close(good)


# --- running out anyway: give back, retry, map in one piece ------------------------------------------
class _LimitedTransport(WrappedTransport):
    """The real local transport, refusing data-page mappings with EMFILE (or ENOMEM) once `limit`
    of them are live, as a process limit would (fault injection: the kernel cannot be made to fail
    one particular mapping on demand). Ring mappings (contiguous) are not limited."""

    def __init__(self, inner: LocalTransport, limit: int, err: int = errno.EMFILE) -> None:
        super().__init__(inner)
        self.limit = limit
        self.err = err
        self.live = 0
        self.refused = 0
        self.lock = threading.Lock()

    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        if contiguous:
            return self.inner.map_grants(domid, refs, writable=writable, contiguous=True)
        with self.lock:
            if self.live >= self.limit:
                self.refused += 1
                raise GrantError(f"cannot mmap grants of domain {domid}", errno=self.err)
            self.live += 1

        def one_less() -> None:
            with self.lock:
                self.live -= 1

        return self.on_unmap(self.inner.map_grants(domid, refs, writable=writable), one_less)


def _burst_lands(fe: LocalFrontend, path: Path) -> None:
    """mkfs's burst in miniature: 32 writes of 4 distinct pages pushed at once; every one
    succeeds and lands on disk."""
    writes = {fe.submit_write(i * 64, bytes([i + 1]) * 16384): i for i in range(32)}
    done = fe.collect(32)
    assert {done[r].response.status for r in writes} == {blkif.RSP_OKAY}
    for i in range(32):
        assert on_disk(path, i * 64 * 512, 16384) == bytes([i + 1]) * 16384


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENOMEM], ids=["EMFILE", "ENOMEM"])
def test_write_burst_past_the_limit_never_fails(
    local_transport: LocalTransport, disk_file: tuple[Path, int], err: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkfs's burst in miniature: 32 requests of 4 distinct pages at once, then 100-page indirect
    requests, with room for 8 live mappings (each cold request's pages are one mapping where they
    fit: GrantCache._batch; the 32 requests' 32 mappings go past it). Every request succeeds and
    lands on disk. The native pass would map the burst's pages ahead in one mapping
    (DataPlane._prefetch, tested below) and stay under the limit: here it is off, as for a burst
    spread over passes, which still goes past it."""
    monkeypatch.setattr(DataPlane, "_prefetch", lambda self, data, start, count: None)
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    limited = _LimitedTransport(local_transport, 8, err)
    with LocalFrontend(local_transport.socket_path, 51, data_pages=256, persistent=True) as fe:
        params = dataclasses.replace(ring_params_of(fe), persistent=True)
        dp = DataPlane(limited, 51, params, target, target.limits(), workers=0)
        dp.start()
        try:
            cache = dp.grant_cache
            assert cache is not None
            _burst_lands(fe, path)
            big = os.urandom(100 * PAGE_SIZE)  # more pages than can be live at once
            assert fe.write(8192, big) == blkif.RSP_OKAY
            assert fe.read(8192, len(big)) == big
            assert on_disk(path, 8192 * 512, len(big)) == big
            assert dp.stats.errors == 0
            assert limited.refused > 0, "the limit was reached (else this tests nothing)"
            assert cache.stats.shed > 0
            assert cache.stats.whole >= 2
            assert limited.live <= 8
        finally:
            assert dp.stop()
    assert limited.live == 0


@pytest.mark.parametrize("limit", [2, 1])
def test_a_burst_mapped_ahead_stays_under_the_limit_or_falls_back(
    local_transport: LocalTransport, disk_file: tuple[Path, int], limit: int
) -> None:
    """The same burst with the native pass's prefetch: its first request maps its own pages, the
    other 31 requests' pages are mapped ahead in one mapping (2 live: under a limit of 2). With room
    for 1, the prefetch's call is refused and maps nothing, and the requests map their own pages
    through the resource rules as before. Every request succeeds either way."""
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    limited = _LimitedTransport(local_transport, limit)
    with LocalFrontend(local_transport.socket_path, 52, data_pages=256, persistent=True) as fe:
        params = dataclasses.replace(ring_params_of(fe), persistent=True)
        dp = DataPlane(limited, 52, params, target, target.limits(), workers=0)
        dp.start()
        try:
            cache = dp.grant_cache
            assert cache is not None
            _burst_lands(fe, path)
            assert dp.stats.errors == 0
            if dp._fast is None:  # the pure-Python pass maps per request, as before
                return
            if limit == 2:
                assert (cache.stats.prefetches, limited.refused, limited.live) == (1, 0, 2)
            else:
                assert cache.stats.prefetches == 0
                assert limited.refused > 0
                assert cache.stats.shed > 0
            assert limited.live <= limit
        finally:
            assert dp.stop()
    assert limited.live == 0


def test_pages_of_requests_in_flight_are_waited_for(
    local_transport: LocalTransport, disk_file: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for 2 live mappings (a cold request's pages are one mapping: GrantCache._batch), two
    4-page writes pinned on slow workers: a third request waits for one of them to give its pages
    back instead of failing. The native pass's prefetch is off: it would map the second and third
    requests' pages ahead in one mapping, and this is about a request that needs one more."""
    monkeypatch.setattr(DataPlane, "_prefetch", lambda self, data, start, count: None)
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    limited = _LimitedTransport(local_transport, 2)
    gate = threading.Event()
    real = io.execute

    def slow_execute(tgt: DeviceTarget, plan: IoPlan, bufs: list[memoryview]) -> int:
        gate.wait(10)  # fault injection: I/O still running while the ring thread maps more
        return real(tgt, plan, bufs)

    monkeypatch.setattr(io, "execute", slow_execute)
    monkeypatch.setattr(io, "execute_nowait", lambda target, plan, bufs: None)
    with LocalFrontend(local_transport.socket_path, 52, data_pages=64, persistent=True) as fe:
        params = dataclasses.replace(ring_params_of(fe), persistent=True)
        dp = DataPlane(limited, 52, params, target, target.limits(), workers=2)
        dp.start()
        timer = threading.Timer(0.5, gate.set)
        try:
            ids = [fe.submit_write(i * 64, bytes([i + 1]) * 16384) for i in range(3)]
            fe.kick()
            timer.start()
            done = fe.collect(3, timeout=20)
            assert [done[r].response.status for r in ids] == [blkif.RSP_OKAY] * 3
            for i in range(3):
                assert on_disk(path, i * 64 * 512, 16384) == bytes([i + 1]) * 16384
            assert limited.refused > 0
            assert dp.stats.errors == 0
        finally:
            gate.set()
            timer.cancel()
            assert dp.stop()
    assert limited.live == 0


def test_nothing_to_give_back_is_an_error_with_its_reason(
    local_transport: LocalTransport, disk_file: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    _path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    limited = _LimitedTransport(local_transport, 0)
    with LocalFrontend(local_transport.socket_path, 53, data_pages=16, persistent=True) as fe:
        params = dataclasses.replace(ring_params_of(fe), persistent=True)
        dp = DataPlane(limited, 53, params, target, target.limits(), workers=0, name="xbc-53-1")
        dp.start()
        try:
            with caplog.at_level(logging.WARNING):
                assert fe.write(0, b"x" * 4096) == blkif.RSP_ERROR
            assert dp.stats.errors == 1
            assert any(
                "xbc-53-1" in r.getMessage() and "EMFILE" in r.getMessage() and r.levelno >= logging.WARNING
                for r in caplog.records
            ), [r.getMessage() for r in caplog.records]
            limited.limit = 64  # resources back: the next request is served
            assert fe.write(0, b"y" * 4096) == blkif.RSP_OKAY
        finally:
            assert dp.stop()


# --- one budget for every ring --------------------------------------------------------------------
@pytest.fixture
def pages_frontend(local_transport: LocalTransport) -> Iterator[LocalFrontend]:
    with LocalFrontend(local_transport.socket_path, 54, data_pages=32) as fe:
        for ref in range(fe.total_pages):
            fe.page(ref)[:] = bytes([ref]) * PAGE_SIZE
        yield fe


def test_caches_share_one_budget(local_transport: LocalTransport, pages_frontend: LocalFrontend) -> None:
    budget = MappingBudget(8)
    first = GrantCache(local_transport, 54, max_grants=1056, budget=budget)
    second = GrantCache(local_transport, 54, max_grants=1056, budget=budget)
    for cache, refs in ((first, range(0, 8)), (second, range(8, 16)), (first, range(16, 20))):
        for ref in refs:
            bufs, lease = cache.acquire((ref,), None, writable=False)
            assert bytes(bufs[0][:1]) == bytes([ref])
            for b in bufs:
                b.release()
            lease.unmap()
    assert budget.used == first.mapped + second.mapped <= 8
    assert first.mapped == 8  # its own idle pages made room for its next ones
    assert second.mapped == 0  # the budget was spent: served, never cached
    assert second.stats.transient == 8
    assert second.stats.budget_refusals == 8
    assert first.close() == 8
    assert second.close() == 0
    assert budget.used == 0
    assert local_transport.mapped_pages == 0


def test_budget_is_half_of_max_map_count(tmp_path: Path) -> None:
    node = tmp_path / "max_map_count"
    node.write_text("65530\n")
    assert MappingBudget.from_system(str(node)).limit == 32765
    assert MappingBudget.from_system(str(tmp_path / "missing")).limit == 32765


def test_a_range_someone_else_took_is_recognised() -> None:
    """After a failed placement whose hole could not be covered again, /proc/self/maps decides:
    still our shared anonymous reservation, or another mapping (then the reservation is abandoned,
    never unmapped). A private anonymous page placed in the range plays the other mapping."""
    import ctypes

    from xenblockctl.backend.transport import fixedmap

    res = Reservation(3)
    try:
        assert fixedmap._anonymous_shared(res.base, res.base + 3 * PAGE_SIZE)
        foreign = fixedmap._libc.mmap(
            res.base + PAGE_SIZE,
            PAGE_SIZE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | fixedmap.MAP_FIXED,
            -1,
            0,
        )
        assert foreign == res.base + PAGE_SIZE, ctypes.get_errno()
        assert fixedmap._anonymous_shared(res.base, res.base + PAGE_SIZE)
        assert not fixedmap._anonymous_shared(res.base, res.base + 2 * PAGE_SIZE)
        assert not fixedmap._anonymous_shared(res.base + PAGE_SIZE, res.base + 2 * PAGE_SIZE)
    finally:
        res.close()  # unmaps the whole range, the stand-in included
