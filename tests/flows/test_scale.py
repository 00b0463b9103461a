"""Many backends at once: no global lock, the sharing scan copes with a full host, and one engine
serves hundreds of disks (and several disks of one domain) with each guest reading its own data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.fixtures.engine import EngineProc, wait_for
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.guest import XenbusFrontend
from xenblockctl.blockscript.owner import OwnerRecord
from xenblockctl.kernel.loop import LoopDevice
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.paths import join

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop"), pytest.mark.slow]

PARALLEL = 32
PREEXISTING = 128


def test_parallel_adds_with_many_existing_backends(libxl: Libxl, make_image: ImageFactory) -> None:
    # 128 backends that already have a published disk (as if attached by earlier adds): the
    # sharing scan must read them all and still let distinct targets through.
    for i in range(PREEXISTING):
        be = libxl.create_backend(100 + i // 16, 51712 + 16 * (i % 16), f"/srv/existing-{i}.img", "w")
        libxl.store.write_many(
            {
                be.node("physical-device"): f"fd:{i:x}",
                be.node("physical-device-luid"): f"{1000 + i:x}",
                be.node("hotplug-status"): "connected",
            }
        )
    images = [make_image(f"guest-{i}.img", size=8 << 20) for i in range(PARALLEL)]
    backends = [libxl.create_backend(10 + i, 51712, str(images[i]), "w") for i in range(PARALLEL)]
    consumers = [libxl.engine_consumer(be) for be in backends]
    running = [libxl.start("add", be) for be in backends]
    for r in running:
        r.proc.wait(120)
    failures = []
    for be, r in zip(backends, running, strict=True):
        if r.proc.returncode != 0:
            assert r.proc.stderr is not None
            failures.append((be.relative, r.proc.returncode, r.proc.stderr.read()))
    assert not failures, failures
    seen = set()
    for be, consumer in zip(backends, consumers, strict=True):
        consumer.wait_opened()
        nodes = libxl.nodes(be)
        owner = OwnerRecord.parse(nodes["xenblockctl-owner"])
        assert nodes["hotplug-status"] == "connected"
        assert consumer.device is not None
        assert consumer.device.identity.diskseq == owner.diskseq
        seen.add((owner.major, owner.minor))
    assert len(seen) == PARALLEL, "every backend got its own loop device"
    for consumer in consumers:
        consumer.release()
    assert bound_loops_under(images[0].parent) == {}


def test_same_file_twice_writable_is_busy(libxl: Libxl, make_image: ImageFactory) -> None:
    image = make_image()
    first = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(first)
    assert libxl.run("add", first).returncode == 0
    consumer.wait_opened()
    for mode in ("w", "r"):
        second = libxl.create_backend(6, 51712 + (16 if mode == "r" else 0), str(image), mode)
        result = libxl.run("add", second)
        assert result.returncode == 1
        nodes = libxl.nodes(second)
        assert nodes["hotplug-status"] == "busy"
        assert nodes["hotplug-error"].startswith("busy: target already in use writable by ")
        assert "physical-device" not in nodes
    consumer.release()
    assert bound_loops_under(image.parent) == {}


def test_read_only_sharing_is_allowed(libxl: Libxl, make_image: ImageFactory) -> None:
    image = make_image()
    consumers = []
    for domid in (5, 6, 7):
        be = libxl.create_backend(domid, 51712, str(image), "r")
        consumers.append(libxl.engine_consumer(be))
        result = libxl.run("add", be)
        assert result.returncode == 0, result.stderr
    writer = libxl.create_backend(8, 51712, str(image), "w")
    result = libxl.run("add", writer)
    assert result.returncode == 1
    assert libxl.nodes(writer)["hotplug-status"] == "busy"
    for consumer in consumers:
        consumer.wait_opened()
        consumer.release()


def test_loop_set_up_by_hand_blocks_writable_attach(
    libxl: Libxl, make_image: ImageFactory, loop_devices: list[LoopDevice]
) -> None:
    from xenblockctl.kernel import loop

    image = make_image()
    loop_devices.append(loop.attach_file(str(image), read_only=False, tag="xenblockctl:by-hand"))
    be = libxl.create_backend(5, 51712, str(image), "w")
    result = libxl.run("add", be)
    assert result.returncode == 1
    assert "busy: target already in use writable by /dev/loop" in libxl.nodes(be)["hotplug-error"]


# --- one engine, many disks -------------------------------------------------------------------------
DISKS = 256
DISKS_PER_DOMAIN = 16  # xvda..xvdp: the engine sees several disks of every domain
BATCH = 16  # block scripts run at once


def engine_fds(pid: int) -> dict[str, int]:
    """The engine's open fds by kind (eventfd, memfd, socket, ...)."""
    kinds: dict[str, int] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        if "eventfd" in target:
            kind = "eventfd"
        elif "/memfd:" in target:
            kind = "memfd"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def engine_memfd_maps(pid: int) -> tuple[int, int]:
    """(mappings of frontend memfds, their size in KiB) in the engine."""
    count = size = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/memfd:" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                count += 1
                size += (hi - lo) // 1024
    return count, size


def wait_opened(libxl: Libxl, backends: Sequence[Backend]) -> None:
    """The engine has seen each backend (it writes `opened`=0 and goes to InitWait)."""
    for be in backends:
        assert wait_for(lambda: libxl.nodes(be).get("opened") == "0", 30), libxl.nodes(be)  # noqa: B023 (waited on at once)


def run_scripts(libxl: Libxl, action: str, backends: Sequence[Backend]) -> None:
    for i in range(0, len(backends), BATCH):
        batch = backends[i : i + BATCH]
        running = [libxl.start(action, be) for be in batch]
        for be, r in zip(batch, running, strict=True):
            r.proc.wait(120)
            assert r.proc.returncode == 0, (be.relative, r.proc.stderr.read() if r.proc.stderr else "")


def detach(libxl: Libxl, be: Backend, guest: XenbusFrontend) -> None:
    """As libxl: online=0 + backend Closing, the guest closes, wait for Closed."""
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "5")
    guest.disconnect()
    guest.close()
    assert wait_for(lambda: libxl.nodes(be).get("state") == "6", 20), libxl.nodes(be)


def test_one_engine_serves_256_disks_and_gives_everything_back(
    libxl: Libxl, engine: EngineProc, make_image: ImageFactory
) -> None:
    """256 disks (16 domains x 16 disks) on real loop devices through one engine over the local
    transport: each guest reads its own disk's data; after every disk is detached the engine holds
    no more fds and no more guest mappings than before the first attach. Before the registry used
    epoll, its select() died near disk 100 and the next guest's registration hung forever."""
    pid = engine.proc.pid
    with open(f"/proc/{pid}/limits") as f:
        limits = next(line.split() for line in f if line.startswith("Max open files"))
    assert limits[3] == limits[4], f"engine did not raise its soft fd limit to the hard one: {limits}"
    baseline = engine_fds(pid)
    assert engine_memfd_maps(pid)[0] == 0
    images: list[Path] = []
    backends: list[Backend] = []
    for i in range(DISKS):
        domid, slot = 10 + i // DISKS_PER_DOMAIN, i % DISKS_PER_DOMAIN
        images.append(make_image(f"disk-{i}.img", size=1 << 20, fill=f"disk {i:03d}".encode()))
        backends.append(libxl.create_backend(domid, 51712 + 16 * slot, str(images[i]), "w", engine=False))
    wait_opened(libxl, backends)
    run_scripts(libxl, "add", backends)
    store = XenStore.connect(libxl.xenstored.socket_path, timeout=30)
    guests: list[XenbusFrontend] = []
    try:
        for be in backends:
            guest = XenbusFrontend(
                store,
                frontend_path=be.frontend,
                backend_path=be.path,
                domid=be.domid,
                transport_socket=engine.transport,
                data_pages=8,
            )
            guests.append(guest)
            guest.connect()
        for i, guest in enumerate(guests):
            assert guest.ring is not None
            assert guest.ring.read(0, 512)[:8] == f"disk {i:03d}".encode(), f"disk {i} read another disk"
        peak = engine_fds(pid)
        per_disk = (sum(peak.values()) - sum(baseline.values())) / DISKS
        print(
            f"engine fds: {sum(baseline.values())} before, {sum(peak.values())} with {DISKS} disks "
            f"({per_disk:.1f} per disk): {peak}; memfd mappings {engine_memfd_maps(pid)}"
        )
        for be, guest in zip(backends, guests, strict=True):
            detach(libxl, be, guest)
        run_scripts(libxl, "remove", backends)
    finally:
        for guest in guests:
            guest.close()
        store.close()
    assert bound_loops_under(images[0].parent) == {}, "every loop device released and auto-cleared"
    assert wait_for(lambda: engine_fds(pid) == baseline and engine_memfd_maps(pid)[0] == 0, 30), (
        f"engine still holds fds {engine_fds(pid)} (before: {baseline}), "
        f"memfd mappings {engine_memfd_maps(pid)}"
    )


def test_three_disks_of_one_domain_registering_before_their_handshakes(
    libxl: Libxl, engine: EngineProc, make_image: ImageFactory
) -> None:
    """A guest bringing up three blkfronts at once: all three grant their rings and allocate
    their event channels before any handshake. Before grant refs and ports were unique per domain,
    two disks were never answered and the third read another disk's data."""
    fills = [b"first disk", b"second disk", b"third disk"]
    images = [make_image(f"disk-{i}.img", size=1 << 20, fill=fill) for i, fill in enumerate(fills)]
    backends = [
        libxl.create_backend(5, 51712 + 16 * i, str(img), "w", engine=False) for i, img in enumerate(images)
    ]
    wait_opened(libxl, backends)
    run_scripts(libxl, "add", backends)
    store = XenStore.connect(libxl.xenstored.socket_path, timeout=30)
    guests = [
        XenbusFrontend(
            store, frontend_path=be.frontend, backend_path=be.path, domid=5, transport_socket=engine.transport
        )
        for be in backends
    ]
    rings: list[LocalFrontend] = []
    try:
        for guest in guests:
            guest.wait_backend((2,), 20)
        rings = [LocalFrontend(engine.transport, 5, data_pages=8) for _ in backends]
        for guest, ring in zip(guests, rings, strict=True):  # the handshakes, one after the other

            def publish(tx: Transaction, guest: XenbusFrontend = guest, ring: LocalFrontend = ring) -> None:
                for name, value in ring.xenstore_nodes().items():
                    tx.write(join(guest.frontend_path, name), value)
                tx.write(join(guest.frontend_path, "state"), "3")

            store.run_transaction(publish)
            guest.wait_backend((4,), 20)
            store.write(join(guest.frontend_path, "state"), "4")
            guest.ring = ring
        for ring, fill in zip(rings, fills, strict=True):
            got = ring.read(0, 512, timeout=5)[: len(fill)]
            assert got == fill, f"{fill!r} read {got!r}"
        for be, guest in zip(backends, guests, strict=True):
            detach(libxl, be, guest)
        rings = []
        run_scripts(libxl, "remove", backends)
    finally:
        handed = {id(guest.ring) for guest in guests}
        for ring in rings:
            if id(ring) not in handed:  # registered, never handed to its guest
                ring.close()
        for guest in guests:
            guest.close()
        store.close()
    assert bound_loops_under(images[0].parent) == {}
