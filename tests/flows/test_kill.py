"""SIGKILL the block script at every named step, as libxl does after 40 s.

Invariants afterwards: xenstore never shows physical-device without physical-device-luid and
diskseq, and no loop device of ours stays bound unless a consumer holds it."""

from __future__ import annotations

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl
from xenblockctl.blockscript.faults import ADD_POINTS, REMOVE_POINTS

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def assert_consistent(nodes: dict[str, str]) -> None:
    assert ("physical-device" in nodes) == ("physical-device-luid" in nodes), nodes
    assert ("physical-device" in nodes) == ("diskseq" in nodes), nodes  # the kernel patch's node
    if "physical-device" in nodes:
        assert "xenblockctl-owner" in nodes


ADD_CASES = [(p, True) for p in ADD_POINTS] + [
    (p, False)
    for p in ADD_POINTS
    if p not in ("add-consumer-ready", "add-done")  # need a consumer
]


@pytest.mark.parametrize(
    ("point", "with_consumer"), ADD_CASES, ids=[f"{p}-{'consumer' if c else 'alone'}" for p, c in ADD_CASES]
)
def test_kill_during_add(libxl: Libxl, make_image: ImageFactory, point: str, with_consumer: bool) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be) if with_consumer else None
    running = libxl.start("add", be, pause_at=point)
    assert running.wait_paused() == point
    running.kill()
    assert_consistent(libxl.nodes(be))
    if consumer is not None and consumer.device is not None:
        # The consumer holds it, so it may stay bound; it must go as soon as the consumer lets go.
        consumer.release()
    elif consumer is not None:
        consumer.release()
    assert bound_loops_under(image.parent) == {}, f"killed at {point}: loop device leaked"
    # libxl then tears the device down: remove must cope with whatever the kill left behind.
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    nodes = libxl.nodes(be)
    assert "physical-device" not in nodes or "xenblockctl-owner" not in nodes


@pytest.mark.parametrize("point", REMOVE_POINTS)
def test_kill_during_remove(libxl: Libxl, make_image: ImageFactory, point: str) -> None:
    """Kernel-blkback style (AUTOCLEAR off after hand-off), so remove has a real detach to do."""
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    assert libxl.run("add", be).returncode == 0
    consumer.wait_opened()
    consumer.release()
    assert len(bound_loops_under(image.parent)) == 1
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    running = libxl.start("remove", be, pause_at=point)
    assert running.wait_paused() == point
    running.kill()
    assert_consistent(libxl.nodes(be))
    # A re-run (libxl does not, but an admin or gc may) finishes the job.
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    assert bound_loops_under(image.parent) == {}
    assert "physical-device" not in libxl.nodes(be)
