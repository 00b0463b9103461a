"""Many backends at once: no global lock, and the sharing scan copes with a full host."""

from __future__ import annotations

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl
from xenblockctl.blockscript.owner import OwnerRecord

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
    failures = [
        (be.relative, r.proc.returncode, r.proc.stderr.read())
        for be, r in zip(backends, running, strict=True)
        if r.proc.returncode != 0
    ]  # type: ignore[union-attr]
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
    libxl: Libxl, make_image: ImageFactory, loop_devices: list
) -> None:  # type: ignore[type-arg]
    from xenblockctl.kernel import loop

    image = make_image()
    loop_devices.append(loop.attach_file(str(image), read_only=False, tag="xenblockctl:by-hand"))
    be = libxl.create_backend(5, 51712, str(image), "w")
    result = libxl.run("add", be)
    assert result.returncode == 1
    assert "busy: target already in use writable by /dev/loop" in libxl.nodes(be)["hotplug-error"]
