"""Multi-queue (blkif.h `multi-queue-max-queues` / `multi-queue-num-queues`, `queue-N/ring-ref*`,
`queue-N/event-channel`): the engine offers queues, serves each negotiated queue with its own data
plane (own ring, event channel, grant cache, I/O workers), refuses bad queue counts with a coded
error that fails that device alone, drains every queue before it lets the device go, and fails the
device (only it) when one of its queues breaks. Real loop devices, the embedded xenstored, the
engine on a thread, and the Python blkfront doing the handshake as Linux blkfront does."""

from __future__ import annotations

import pytest

from tests.fixtures.engine import (
    InprocEngine,
    attach_disk,
    attach_guest,
    check_stuck_queue_holds_the_device,
    connect_guest,
    detach_guest,
    wait_for,
)
from tests.fixtures.kernel import FreezableFs, ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl
from xenblockctl.backend import blkif, xenbus
from xenblockctl.backend.guest import GuestError

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]

OFFERED = 4
engine_with_queues = pytest.mark.parametrize("engine_inproc", [{"max_queues": OFFERED}], indirect=True)


@engine_with_queues
@pytest.mark.parametrize("queues", [1, 2, 4])
def test_each_negotiated_queue_serves_the_disk(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory, queues: int
) -> None:
    image = make_image()
    be, guest = attach_guest(libxl, engine_inproc.transport, image, 40, queues=queues)
    try:
        assert libxl.nodes(be)["multi-queue-max-queues"] == str(OFFERED)
        assert libxl.nodes(be)["state"] == "4"
        fe_nodes = libxl.store.read_dir(be.frontend)
        if queues > 1:
            assert fe_nodes["multi-queue-num-queues"] == str(queues)
            assert "ring-ref" not in fe_nodes
            assert "event-channel" not in fe_nodes
        dev = engine_inproc.device(40)
        assert len(dev.dataplanes) == queues == len(guest.rings)
        # every queue writes its own sectors; every queue reads what every other one wrote
        for q, ring in enumerate(guest.rings):
            assert ring.write(8 * q, f"queue {q}".encode().ljust(4096, b"\0")) == blkif.RSP_OKAY
        for ring in guest.rings:
            for q in range(queues):
                assert ring.read(8 * q, 4096)[:8] == f"queue {q}".encode().ljust(8, b"\0")
        # each queue was served by its own data plane
        served = [dp.stats.requests for dp in dev.dataplanes]
        assert all(n == queues + 1 for n in served), served  # before the flush below
        assert guest.rings[-1].flush() == blkif.RSP_OKAY
        with open(image, "rb") as f:
            assert f.read(8)[:7] == b"queue 0"
    finally:
        detach_guest(libxl, be, guest)
    assert bound_loops_under(image.parent) == {}


@engine_with_queues
def test_multi_page_rings_per_queue(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    """ring-page-order is top-level and applies to every queue: queue-N/ring-ref0..3 each."""
    be, guest = attach_guest(libxl, engine_inproc.transport, make_image(), 48, queues=2, ring_page_order=2)
    try:
        fe_nodes = libxl.store.read_dir(be.frontend)
        assert fe_nodes["ring-page-order"] == "2"
        dev = engine_inproc.device(48)
        assert [len(dp.params.ring_refs) for dp in dev.dataplanes] == [4, 4]  # type: ignore[union-attr]
        for q, ring in enumerate(guest.rings):
            # more requests in flight than one ring page holds (32 slots)
            rids = [ring.submit_write(8 * (64 * q + i), bytes([q + 1]) * 4096) for i in range(48)]
            done = ring.collect(len(rids), timeout=30)
            assert all(done[r].response.status == blkif.RSP_OKAY for r in rids)
        assert guest.rings[0].read(8 * 64, 4096) == b"\x02" * 4096
    finally:
        detach_guest(libxl, be, guest)


@engine_with_queues
def test_frontend_asking_more_than_offered_gets_the_offer(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    """As Linux blkfront: min(wanted, multi-queue-max-queues)."""
    be, guest = attach_guest(libxl, engine_inproc.transport, make_image(), 41, queues=OFFERED + 3)
    try:
        assert len(engine_inproc.device(41).dataplanes) == OFFERED
    finally:
        detach_guest(libxl, be, guest)


#: num-queues values a hostile guest may write: out of range, or not exactly a decimal number
HOSTILE_QUEUES = ["0", str(OFFERED + 1), "65536", "99999999999", "-1", "01", "2 ", "٣", "0x2", ""]


@engine_with_queues
def test_hostile_queue_counts_fail_that_device_alone(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    by_be, bystander = attach_guest(libxl, engine_inproc.transport, make_image("bystander.img"), 42, queues=2)
    try:
        for n, value in enumerate(HOSTILE_QUEUES):
            devid = 51728 + 16 * n
            be = attach_disk(libxl, make_image(f"hostile-{n}.img"), 43, devid=devid)
            with pytest.raises(GuestError, match="multi-queue-num-queues") as caught:
                connect_guest(
                    libxl,
                    engine_inproc.transport,
                    be,
                    queues=2,
                    extra_nodes={"multi-queue-num-queues": value},
                )
            assert libxl.nodes(be)["state"] == "5", value
            error = libxl.store.read_optional(f"/local/domain/0/error/{be.relative}/error") or ""
            assert "multi-queue-num-queues" in error, (value, error)
            assert engine_inproc.device(43, devid).dataplanes == [], "a refused device serves no queue"
            assert "Traceback" not in str(caught.value)
            # the other device's queues go on serving
            assert bystander.ring is not None
            for ring in bystander.rings:
                assert ring.write(8 * n, b"b" * 512) == blkif.RSP_OKAY
            libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
            assert wait_for(lambda: libxl.nodes(be).get("state") == "6"), libxl.nodes(be)  # noqa: B023
            assert libxl.run("remove", be).returncode == 0
    finally:
        detach_guest(libxl, by_be, bystander)


@engine_with_queues
def test_a_missing_queue_directory_is_refused(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    """num-queues 3 with only queue-0 and queue-1 published: refused naming the queue."""
    be = attach_disk(libxl, make_image(), 44)
    with pytest.raises(GuestError, match="queue 2"):
        connect_guest(
            libxl, engine_inproc.transport, be, queues=2, extra_nodes={"multi-queue-num-queues": "3"}
        )
    assert engine_inproc.device(44).dataplanes == []
    libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
    assert wait_for(lambda: libxl.nodes(be).get("state") == "6"), libxl.nodes(be)
    assert libxl.run("remove", be).returncode == 0


@engine_with_queues
def test_one_broken_queue_fails_its_device_only(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory
) -> None:
    be, guest = attach_guest(libxl, engine_inproc.transport, make_image(), 45, queues=2)
    by_be, bystander = attach_guest(libxl, engine_inproc.transport, make_image("bystander.img"), 46, queues=2)
    try:
        broken = guest.rings[1]
        broken.ring.poke_index("req_prod", broken.ring.req_prod + 1000)
        broken.evtchn.notify()
        error_node = f"/local/domain/0/error/{be.relative}/error"
        assert wait_for(lambda: libxl.store.read_optional(error_node) is not None), libxl.nodes(be)
        assert "queue 1" in (libxl.store.read_optional(error_node) or "")
        assert wait_for(lambda: libxl.nodes(be).get("state") == "5"), libxl.nodes(be)
        assert engine_inproc.device(45).dataplanes == [], "every queue of the failed device is stopped"
        for ring in bystander.rings:
            assert ring.write(0, b"still here".ljust(512, b"\0")) == blkif.RSP_OKAY
            assert ring.read(0, 512)[:10] == b"still here"
    finally:
        guest.close()
        guest.store.close()
        libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
        assert wait_for(lambda: libxl.nodes(be).get("state") == "6"), libxl.nodes(be)
        assert libxl.run("remove", be).returncode == 0
        detach_guest(libxl, by_be, bystander)


@engine_with_queues
def test_teardown_drains_every_queue(
    libxl: Libxl,
    engine_inproc: InprocEngine,
    freezable_fs: FreezableFs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request stuck on queue 1 holds the device, queue 1's ring and pages, and Closed, while
    queue 0, idle, is drained and released at once; the answer still reaches the guest."""
    monkeypatch.setattr(xenbus, "DRAIN_TIMEOUT", 0.5)  # the drain deadline passes while held
    monkeypatch.setattr(xenbus, "FRONTEND_CLOSE_GRACE", 0.2)
    check_stuck_queue_holds_the_device(libxl, engine_inproc, freezable_fs, 47)
