"""Persistent grants through the whole engine: xenbus negotiation of `feature-persistent`, the data
plane's grant cache, and what a reconnect, a detach and a hostile frontend do to it. The engine runs
on a thread of the test (engine_inproc) so the local transport's live mapping count can be read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Unpack

import pytest

from tests.fixtures.engine import AttachOptions, InprocEngine, attach_guest, wait_for
from tests.fixtures.engine import detach_guest as detach
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.backend import blkif, fastpath, io
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.guest import XenbusFrontend
from xenblockctl.backend.io import DeviceTarget

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def attach(
    libxl: Libxl, engine: InprocEngine, image: Path, domid: int, **options: Unpack[AttachOptions]
) -> tuple[Backend, XenbusFrontend]:
    return attach_guest(libxl, engine.transport, image, domid, **options)


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=lambda a: a.protocol)
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-request"])
def test_negotiation_and_data_both_modes(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory, abi: blkif.Abi, persistent: bool
) -> None:
    image = make_image()
    be, guest = attach(libxl, engine_inproc, image, 30, abi=abi, persistent=persistent, ring_page_order=1)
    try:
        assert libxl.nodes(be)["feature-persistent"] == "1", "we offer it"
        assert guest.persistent_negotiated is persistent
        dp = engine_inproc.device(30).dataplane
        assert isinstance(dp, DataPlane)
        assert (dp.grant_cache is not None) is persistent
        ring = guest.ring
        assert ring is not None
        for i in range(4):  # the guest's pool comes round again: hits when persistent
            data = os.urandom(128 * 1024)  # 32 segments: indirect
            assert ring.write(2048 * i, data) == blkif.RSP_OKAY
            assert ring.read(2048 * i, len(data)) == data
            small = os.urandom(4096)
            assert ring.write(8 * i + 1, small) == blkif.RSP_OKAY
            assert ring.read(8 * i + 1, 4096) == small
        assert ring.flush() == blkif.RSP_OKAY
        with open(image, "rb") as f:
            f.seek(2048 * 3 * 512)
            assert f.read(len(data)) == data
        ring_pages = len(dp.params.ring_refs)
        if dp.grant_cache is not None:
            g = dp.grant_cache.stats
            assert g.hits > g.misses, g
            assert engine_inproc.local.mapped_pages == ring_pages + dp.grant_cache.mapped
        else:
            assert engine_inproc.local.mapped_pages == ring_pages  # data pages: whole-table slices
    finally:
        detach(libxl, be, guest)
    assert engine_inproc.local.mapped_pages == 0
    assert bound_loops_under(image.parent) == {}


def test_reconnect_starts_empty_and_detach_unmaps_everything(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    image = make_image()
    be, guest = attach(libxl, engine_inproc, image, 31, persistent=True)
    local = engine_inproc.local
    device = engine_inproc.device(31)
    caches = []
    try:
        for boot in range(3):
            dp = device.dataplane
            assert isinstance(dp, DataPlane)
            cache = dp.grant_cache
            assert cache is not None
            assert cache not in caches, "a reconnect builds a new cache"
            assert cache.stats.maps == 0, "a new connection starts with nothing mapped"
            assert local.mapped_pages == 1, "only the ring is mapped right after connect"
            ring = guest.ring
            assert ring is not None
            for j in range(boot):  # what earlier boots wrote, read into this boot's fresh pages
                assert ring.read(j * 8, 4096)[:6] == f"boot {j}".encode()
            assert ring.write(boot * 8, f"boot {boot}".encode().ljust(4096, b"\0")) == blkif.RSP_OKAY
            assert ring.read(0, 64 * 1024)[:6] == b"boot 0"
            assert cache.mapped > 0
            assert local.mapped_pages == 1 + cache.mapped
            caches.append(cache)
            guest.reboot()
            assert cache.mapped == 0, "disconnect unmapped the previous connection's grants"
            assert cache.stats.unmaps == cache.stats.maps
    finally:
        detach(libxl, be, guest)
    assert device.dataplane is None
    assert local.mapped_pages == 0, "teardown unmapped the ring and every persistent grant"


def test_detach_with_requests_in_flight_drains_then_unmaps(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    image = make_image()
    be, guest = attach(libxl, engine_inproc, image, 32, persistent=True)
    ring = guest.ring
    assert ring is not None
    dp = engine_inproc.device(32).dataplane
    assert isinstance(dp, DataPlane)
    cache = dp.grant_cache
    assert cache is not None
    payload = b"persistent in flight".ljust(4096, b"!")
    ids = [ring.submit_write(i * 8, payload) for i in range(24)]
    libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
    done = ring.collect(len(ids), timeout=30)
    assert sorted(done) == sorted(ids)
    assert all(c.response.status == blkif.RSP_OKAY for c in done.values())
    guest.disconnect()
    guest.close()
    guest.store.close()
    assert wait_for(lambda: libxl.nodes(be).get("state") == "6"), libxl.nodes(be)
    assert libxl.run("remove", be).returncode == 0
    assert cache.mapped == 0
    assert cache.stats.maps > 0
    assert cache.stats.unmaps == cache.stats.maps
    assert engine_inproc.local.mapped_pages == 0
    data = image.read_bytes()
    for i in range(24):
        assert data[i * 4096 : i * 4096 + 20] == b"persistent in flight"


@pytest.mark.parametrize(
    "value", ["", "2", " 1", "1 ", "01", "1\n", "true", "-1", "0x1", "١", "9" * 40, "yes"]
)
def test_hostile_feature_persistent_is_off(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory, value: str
) -> None:
    """Garbage in the frontend's feature-persistent: served, without persistent grants."""
    image = make_image(fill=b"ok")
    be, guest = attach(
        libxl, engine_inproc, image, 33, persistent=True, extra_nodes={"feature-persistent": value}
    )
    try:
        assert libxl.nodes(be)["state"] == "4"
        dp = engine_inproc.device(33).dataplane
        assert isinstance(dp, DataPlane)
        assert dp.grant_cache is None
        assert dp.params.persistent is False
        assert guest.ring is not None
        assert guest.ring.read(0, 512)[:2] == b"ok"
    finally:
        detach(libxl, be, guest)


@pytest.mark.parametrize("engine_inproc", [{"persistent_grants": False}], indirect=True)
def test_engine_configured_without_persistent_grants(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    image = make_image(fill=b"ok")
    be, guest = attach(libxl, engine_inproc, image, 34, persistent=True)
    try:
        assert libxl.nodes(be)["feature-persistent"] == "0"
        assert guest.persistent_negotiated is False
        dp = engine_inproc.device(34).dataplane
        assert isinstance(dp, DataPlane)
        assert dp.grant_cache is None
        assert guest.ring is not None
        assert guest.ring.read(0, 512)[:2] == b"ok"
    finally:
        detach(libxl, be, guest)


@pytest.mark.parametrize(
    "engine_inproc", [{"native": True}, {"native": False}], indirect=True, ids=["native", "no-native"]
)
def test_engine_native_option_reaches_the_data_plane(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    """EngineConfig.native (`backend --no-native`) decides whether a persistent ring gets the native
    fast path; either way the guest's data is served."""
    native = engine_inproc.engine.config.native
    if native and not fastpath.available():
        pytest.skip("the native fast path (xenblockctl/backend/_fastpass.c) is not built here")
    image = make_image(fill=b"ok")
    be, guest = attach(libxl, engine_inproc, image, 35, persistent=True)
    try:
        dp = engine_inproc.device(35).dataplane
        assert isinstance(dp, DataPlane)
        assert (dp._fast is not None) is native
        assert guest.ring is not None
        for _ in range(3):
            assert guest.ring.read(0, 512)[:2] == b"ok"
    finally:
        detach(libxl, be, guest)


@pytest.mark.parametrize(
    "engine_inproc", [{}, {"native_loop": False}], indirect=True, ids=["native-loop", "no-native-loop"]
)
def test_engine_native_loop_option_reaches_the_data_plane(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    """EngineConfig.native_loop (`backend --no-native-loop`) reaches each ring's data plane (the
    grant-copy path's wait-and-serve loop: tests/unit/test_grantcopy_loop.py)."""
    image = make_image(fill=b"ok")
    be, guest = attach(libxl, engine_inproc, image, 36, persistent=False)
    try:
        dp = engine_inproc.device(36).dataplane
        assert isinstance(dp, DataPlane)
        assert dp._native_loop is engine_inproc.engine.config.native_loop
        assert guest.ring is not None
        assert guest.ring.read(0, 512)[:2] == b"ok"
    finally:
        detach(libxl, be, guest)


@pytest.mark.parametrize(
    ("engine_inproc", "direct", "on_pool", "reads"),
    [
        ({}, False, False, False),
        ({"direct_writes": True}, True, False, False),
        ({"direct_writes": True, "direct_writes_on_pool": True}, True, True, False),
        ({"direct_writes": True, "direct_reads": True}, True, False, True),
    ],
    ids=["default", "direct-writes", "direct-writes-on-pool", "direct-reads"],
    indirect=["engine_inproc"],
)
def test_the_engine_config_decides_how_writes_go_out(
    libxl: Libxl,
    engine_inproc: InprocEngine,
    make_image: ImageFactory,
    *,
    direct: bool,
    on_pool: bool,
    reads: bool,
) -> None:
    """Issue 20 through the whole engine: by default a device's data plane writes buffered on the fd
    it verified; `backend --direct-writes` writes with O_DIRECT on a second fd of that device
    (`--direct-writes-on-pool`: on the I/O threads; `--direct-reads`: reads through it too), and the
    data lands and reads back either way."""
    image = make_image()
    be, guest = attach(libxl, engine_inproc, image, 33, persistent=True)
    try:
        dp = engine_inproc.device(33).dataplane
        assert isinstance(dp, DataPlane)
        executor = dp.executor
        assert isinstance(executor, io.Executor)
        target = engine_inproc.device(33).target
        assert isinstance(target, DeviceTarget)
        assert (executor.write_fd != target.fd) is direct
        assert executor.inline_direct_writes is not on_pool
        assert (executor.read_fd == executor.write_fd != target.fd) is reads
        if direct:
            assert os.fstat(executor.write_fd).st_rdev == os.fstat(target.fd).st_rdev
        ring = guest.ring
        assert ring is not None
        data = os.urandom(256 * 1024)
        assert ring.write(4096, data) == blkif.RSP_OKAY
        assert ring.flush() == blkif.RSP_OKAY
        with open(image, "rb") as f:
            f.seek(4096 * 512)
            assert f.read(len(data)) == data
        assert ring.read(4096, len(data)) == data
    finally:
        detach(libxl, be, guest)
    assert bound_loops_under(image.parent) == {}  # the O_DIRECT fd closed with the rest
