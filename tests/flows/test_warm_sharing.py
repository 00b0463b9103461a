"""Block-device sharing through the warm server's table (blockscript/sharetable.py), end to end:
real server, real C client, real loop devices, the embedded xenstored. Each add says on stderr
(XENBLOCKCTL_TEST_WARM_SHARING) whether its sharing check was answered by the table or walked.

The guarantees are the walk's: two writable adds of one device racing through two workers, one
wins and the other is refused busy; a foreign backend among 128 others is found; and when the
table's watch connection is lost, the adds walk (logged once) and still refuse."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fixtures.libxl import Backend, Libxl
from tests.fixtures.warm import WarmServer
from tests.flows.test_sharing_devices import FOREIGN_PLACES
from xenblockctl.blockscript import sharetable
from xenblockctl.environment import WARM_SHARING_ENV
from xenblockctl.kernel import loop

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]
TRACE = {WARM_SHARING_ENV: "1"}


def _attach(libxl: Libxl, domid: int, params: str, mode: str = "w") -> tuple[Backend, str]:
    be = libxl.create_backend(domid, 51712, params, mode)
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be, **TRACE)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    return be, result.stderr


def _refused(libxl: Libxl, domid: int, params: str, mode: str, *, by: str) -> str:
    be = libxl.create_backend(domid, 51712, params, mode)
    result = libxl.run("add", be, XENBLOCKCTL_HANDOFF_TIMEOUT="2", **TRACE)
    nodes = libxl.nodes(be)
    assert result.returncode == 1, result.stderr
    assert nodes.get("hotplug-status") == "busy", (nodes, result.stderr)
    assert by in nodes["hotplug-error"], nodes
    assert "physical-device" not in nodes
    return result.stderr


def test_block_device_adds_through_the_server_are_answered_by_its_table(
    warm: WarmServer, libxl: Libxl, admin_loops: list[loop.LoopDevice]
) -> None:
    params = f"/dev/loop{admin_loops[0].number}"
    first, said = _attach(libxl, 5, params)
    assert "warm-sharing: table (0 publishing)" in said, said
    said = _refused(libxl, 6, params, "w", by=first.path)
    assert "warm-sharing: table (1 publishing)" in said, said
    assert "sharing table built on" in warm.log()


@pytest.mark.parametrize("place", sorted(FOREIGN_PLACES))
def test_foreign_backend_among_128_others_is_refused_through_the_table(
    warm: WarmServer, libxl: Libxl, admin_loops: list[loop.LoopDevice], place: str
) -> None:
    """tests/flows/test_sharing_devices.py's test of the same name through the server: the 128
    others and the foreign publisher (public nodes only) are written after the table was built,
    so they reach it through watch events."""
    _attach(libxl, 3, f"/dev/loop{admin_loops[1].number}")  # the table is built by this add's query
    target = admin_loops[0]
    nodes: dict[str, str] = {}
    for i in range(128):
        domid, devid = (200 + i, 51712) if i < 118 else (250, 51712 + 16 * (i - 117))
        be = f"/local/domain/0/backend/vbd/{domid}/{devid}"
        nodes[f"{be}/physical-device"] = f"fd:{i:x}"
        nodes[f"{be}/mode"] = "w"
        if i % 2:
            nodes[f"{be}/physical-device-luid"] = f"{1000 + i:x}"
    kind, domid, devid = FOREIGN_PLACES[place]
    foreign = f"/local/domain/0/backend/{kind}/{domid}/{devid}"
    nodes[f"{foreign}/physical-device"] = target.identity.physical_device
    libxl.store.write_many(nodes)
    for domid, mode in ((5, "w"), (6, "r")):  # the foreign mode is unknown: assumed writable
        said = _refused(libxl, domid, f"/dev/loop{target.number}", mode, by=foreign)
        assert "warm-sharing: table (1 publishing)" in said, said


def test_two_writable_adds_of_one_device_racing_through_workers_one_is_refused(
    warm: WarmServer, libxl: Libxl, admin_loops: list[loop.LoopDevice]
) -> None:
    """The first add holds the per-target lock (paused there) while the second's worker is forked
    and waits for the lock; the first then publishes and lets go. A table synced at the second's
    fork would have missed the first's claim: the query after the lock must not."""
    params = f"/dev/loop{admin_loops[0].number}"
    libxl.run("add", libxl.create_backend(3, 51712, f"/dev/loop{admin_loops[1].number}", "r"))  # table
    first = libxl.create_backend(5, 51712, params, "w")
    consumer = libxl.engine_consumer(first)
    running = libxl.start("add", first, pause_at="add-locked", **TRACE)
    assert running.wait_paused() == "add-locked"
    second = libxl.create_backend(6, 51712, params, "w")
    waiting = libxl.start("add", second, XENBLOCKCTL_HANDOFF_TIMEOUT="2", **TRACE)
    time.sleep(0.5)  # its worker forked, the target opened: it waits for the lock
    assert waiting.proc.poll() is None, waiting.proc.communicate()
    running.resume()
    _out, err = running.proc.communicate(timeout=30)
    assert running.proc.returncode == 0, err
    consumer.wait_opened()
    _out, said = waiting.proc.communicate(timeout=30)
    nodes = libxl.nodes(second)
    assert waiting.proc.returncode == 1, said
    assert nodes.get("hotplug-status") == "busy", (nodes, said)
    assert first.path in nodes["hotplug-error"], nodes
    assert "warm-sharing: table (1 publishing)" in said, said


def test_a_lost_watch_connection_makes_the_adds_walk_and_still_refuse(
    warm: WarmServer, libxl: Libxl, admin_loops: list[loop.LoopDevice], tmp_path: Path
) -> None:
    params = f"/dev/loop{admin_loops[0].number}"
    first, said = _attach(libxl, 5, params)
    assert "warm-sharing: table (0 publishing)" in said, said
    libxl.store.control("drop-watching", sharetable.TOKEN)  # the embedded daemon drops the table's
    warm.wait_log("sharing table off: watch connection lost")
    for domid in (6, 7):
        said = _refused(libxl, domid, params, "w", by=first.path)
        assert "warm-sharing: walk (watch connection lost" in said, said
    assert warm.log().count("sharing table off: watch connection lost") == 1, warm.log()  # once
