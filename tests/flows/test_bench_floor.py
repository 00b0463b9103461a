"""bench/floor_block.py, the stdlib floor blockscript_add measures ours against, on a block-device
target: it must do the work ours does on that path, or its numbers say nothing about ours
(bench/README.md, issue 18, session 16). Its walk must find a publisher among many backends, and
what it publishes must be what ours publishes; its remove must never detach a device it only
opened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.blockscript_add import laid_floor
from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.kernel import blockdev, loop
from xenblockctl.xenstore import identity

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


@pytest.fixture
def floor(tmp_path: Path) -> Path:
    work = tmp_path / "floor-work"
    work.mkdir()
    return laid_floor(work, sys.executable)


def run_floor(libxl: Libxl, floor: Path, action: str, be: Backend) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-S", str(floor), action],
        env=libxl.env(action, be, XENBLOCKCTL_HANDOFF_TIMEOUT="5"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def published(libxl: Libxl, be: Backend) -> dict[str, str]:
    nodes = libxl.nodes(be)
    return {name: nodes[name] for name in identity.PUBLISHED if name in nodes}


def test_the_floor_publishes_a_block_device_as_ours_does_and_never_detaches_it(
    libxl: Libxl, floor: Path, admin_loops: list[loop.LoopDevice]
) -> None:
    ours_dev, floor_dev = admin_loops
    ours = libxl.create_backend(5, 51712, f"/dev/loop{ours_dev.number}", "w")
    consumer = libxl.engine_consumer(ours)
    assert libxl.run("add", ours).returncode == 0
    consumer.wait_opened()
    theirs = libxl.create_backend(6, 51712, f"/dev/loop{floor_dev.number}", "w")
    consumer = libxl.engine_consumer(theirs)
    result = run_floor(libxl, floor, "add", theirs)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    mine, its = published(libxl, ours), published(libxl, theirs)
    assert sorted(its) == sorted(mine) == sorted(identity.PUBLISHED)
    record = identity.OwnerRecord.parse(its[identity.OWNER])
    want = floor_dev.identity
    assert record == identity.OwnerRecord.parse(mine[identity.OWNER])._replace(
        major=want.major, minor=want.minor, diskseq=want.diskseq
    )
    assert identity.PublishedIdentity.from_nodes(its) == identity.PublishedIdentity(
        want.major, want.minor, want.diskseq
    )
    assert libxl.nodes(theirs)["hotplug-status"] == "connected"
    consumer.release()
    libxl.store.write(theirs.node("state"), "6")
    assert run_floor(libxl, floor, "remove", theirs).returncode == 0
    assert published(libxl, theirs) == {}
    still = blockdev.open_devt(want.devt, writable=False)
    try:  # still bound: the same device, the same diskseq
        assert still.identity == want
    finally:
        still.close()


@pytest.mark.parametrize("publisher", ["none", "vbd", "vbd3"])
def test_the_floors_walk_finds_a_publisher_among_128_backends(
    libxl: Libxl, floor: Path, admin_loops: list[loop.LoopDevice], publisher: str
) -> None:
    """Ours refuses a device another backend publishes (tests/flows/test_sharing_devices.py); the
    floor must read every backend to do the same, or its 128-backend row measures less work."""
    device = admin_loops[0]
    nodes = {}
    for i in range(128):
        other = f"/local/domain/0/backend/vbd/{200 + i}/51712"
        nodes[f"{other}/physical-device"] = f"fd:{i:x}"
        nodes[f"{other}/mode"] = "w"
    if publisher != "none":
        foreign = f"/local/domain/0/backend/{publisher}/400/51712"
        nodes[f"{foreign}/physical-device"] = device.identity.physical_device
    libxl.store.write_many(nodes)
    be = libxl.create_backend(5, 51712, f"/dev/loop{device.number}", "w")
    if publisher == "none":
        consumer = libxl.engine_consumer(be)
        result = run_floor(libxl, floor, "add", be)
        assert result.returncode == 0, result.stderr
        consumer.wait_opened()
        assert published(libxl, be)[identity.PHYSICAL_DEVICE] == device.identity.physical_device
        consumer.release()
    else:
        result = run_floor(libxl, floor, "add", be)
        assert result.returncode == 1
        assert "failed at check 13" in result.stderr
        assert identity.PHYSICAL_DEVICE not in libxl.nodes(be)


def test_the_floors_file_scan_finds_a_loop_backed_by_the_file_among_unbound_minors(
    libxl: Libxl, floor: Path, make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    """A file bound by any loop device is refused for a writable attach (ours: sharing.loop_claims);
    the floor skips unbound minors by their sysfs directory, and must still find a bound one."""
    image = make_image("shared.img")
    loop_devices.append(loop.attach_file(str(image), read_only=False, tag="xenblockctl:admin"))
    be = libxl.create_backend(5, 51712, str(image), "w")
    result = run_floor(libxl, floor, "add", be)
    assert result.returncode == 1
    assert "failed at check 4" in result.stderr
    assert identity.PHYSICAL_DEVICE not in libxl.nodes(be)
