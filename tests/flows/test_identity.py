"""The published identity end to end (xenstore/identity.py): what add publishes and withdraws,
what the engine accepts, and the one liveness verdict as inventory reports it (the hand-off's
device check and remove's newer-owner guard: tests/flows/test_add_remove.py). Real loop devices, the embedded
xenstored, the block script as libxl runs it, the engine as a process."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.engine import EngineProc
from tests.fixtures.kernel import EmptyLoop, ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.environment import Environment
from xenblockctl.kernel import loop
from xenblockctl.toolstack import inventory
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.identity import PUBLISHED

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_add_publishes_diskseq_with_the_luid_and_remove_withdraws_it(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    """The kernel diskseq patch reads `diskseq`: it is written in the publishing transaction
    itself (seen at the first pause after it), with the luid's value, and withdrawn with it."""
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    running = libxl.start("add", be, pause_at="add-published")
    assert running.wait_paused() == "add-published"
    nodes = libxl.nodes(be)
    running.kill()
    assert nodes["diskseq"] == nodes["physical-device-luid"], nodes
    assert set(PUBLISHED) <= set(nodes), nodes
    assert bound_loops_under(image.parent) == {}

    be = libxl.create_backend(6, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be)
    assert libxl.run("add", be).returncode == 0
    device = consumer.wait_opened()
    nodes = libxl.nodes(be)
    assert nodes["diskseq"] == nodes["physical-device-luid"] == device.identity.luid
    consumer.release()
    libxl.store.write_many({be.node("online"): "0", be.node("state"): "6"})
    assert libxl.run("remove", be).returncode == 0
    left = libxl.nodes(be)
    assert not set(PUBLISHED) & set(left), left


def _engine_backend(libxl: Libxl, domid: int, image: str) -> Backend:
    be = libxl.create_backend(domid, 51712, image, "w", engine=False)
    _wait(lambda: libxl.nodes(be).get("opened") == "0", 10, "engine InitWait")
    return be


def test_engine_refuses_a_diskseq_that_disagrees_with_the_luid(
    libxl: Libxl, engine: EngineProc, make_image: ImageFactory
) -> None:
    """The luid matches the device; the `diskseq` node names another binding. The kernel patch
    would fail this device, so the engine must too: every identity node present is checked."""
    dev = loop.attach_file(str(make_image("disk.img")), read_only=False, tag="xenblockctl:test-ident")
    try:
        ident = dev.identity
        be = _engine_backend(libxl, 8, str(make_image("unused.img")))
        libxl.store.write_many(
            {
                be.node("physical-device-luid"): ident.luid,
                be.node("diskseq"): f"{ident.diskseq + 1:x}",
                be.node("physical-device"): ident.physical_device,
            }
        )
        error_node = f"/local/domain/0/error/{be.relative}/error"
        _wait(lambda: libxl.store.read_optional(error_node) is not None, 10, "engine refusal")
        message = libxl.store.read_optional(error_node) or ""
        assert "disagree" in message, message
        assert libxl.nodes(be)["state"] == "5"
        assert libxl.nodes(be).get("opened") == "0", "never signals opened for an unproven disk"
    finally:
        dev.close()


def test_engine_verifies_a_device_published_only_by_diskseq(
    libxl: Libxl, engine: EngineProc, make_image: ImageFactory
) -> None:
    """Qubes' block script writes `diskseq` and no luid, and may spell it in uppercase (the patch
    accepts that): the engine verifies it against that node and serves the device; a wrong one
    is refused as a replaced device."""
    dev = loop.attach_file(str(make_image("disk.img")), read_only=False, tag="xenblockctl:test-ident")
    try:
        ident = dev.identity
        good = _engine_backend(libxl, 9, str(make_image("a.img")))
        libxl.store.write_many(
            {good.node("diskseq"): f"{ident.diskseq:X}", good.node("physical-device"): ident.physical_device}
        )
        _wait(lambda: libxl.nodes(good).get("opened") == "1", 10, f"engine opened: {libxl.nodes(good)}")
        bad = _engine_backend(libxl, 10, str(make_image("b.img")))
        libxl.store.write_many(
            {
                bad.node("diskseq"): f"{ident.diskseq - 1:x}",
                bad.node("physical-device"): ident.physical_device,
            }
        )
        error_node = f"/local/domain/0/error/{bad.relative}/error"
        _wait(lambda: libxl.store.read_optional(error_node) is not None, 10, "engine refusal")
        assert "diskseq mismatch" in (libxl.store.read_optional(error_node) or "")
        for be in (good, bad):
            libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
        _wait(lambda: libxl.nodes(good).get("state") == "6", 15, "engine released the device")
    finally:
        dev.close()


def test_an_empty_device_with_the_published_diskseq_is_reported_live(
    libxl: Libxl, empty_loop: EmptyLoop
) -> None:
    """inventory once called any device of size 0 gone; the verdict is by diskseq (identity.judge)."""
    now = empty_loop.now
    be = libxl.create_backend(5, 51712, "/unused", "w", engine=False)
    with XenStore.connect(libxl.xenstored.socket_path) as store:
        store.write_many(
            {be.node("physical-device"): now.physical_device, be.node("physical-device-luid"): now.luid}
        )
        assert inventory.inspect(store, be, env=Environment({})).identity == inventory.IDENTITY_MATCH
        store.write(be.node("physical-device-luid"), empty_loop.bound.luid)  # the binding that went away
        assert inventory.inspect(store, be, env=Environment({})).identity == inventory.IDENTITY_GONE
