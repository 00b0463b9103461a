"""Target forms whose identity is checked on the opened device: by-diskseq links and dm names.

udev does not run here, so the tests make the links udev would make (and remove them after)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl
from xenblockctl.kernel import loop

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


@pytest.fixture
def dev_links() -> Iterator[list[Path]]:
    """Symlinks (and directories) created under /dev by the test, removed afterwards."""
    created: list[Path] = []
    yield created
    for path in reversed(created):
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()


def make_link(created: list[Path], link: Path, target: str) -> None:
    for parent in reversed(link.parents):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    os.symlink(target, link)
    created.append(link)


def test_by_diskseq_target(
    libxl: Libxl, make_image: ImageFactory, dev_links: list[Path], loop_devices: list[loop.LoopDevice]
) -> None:
    admin = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(admin)
    seq = admin.identity.diskseq
    link = Path(f"/dev/disk/by-diskseq/{seq}")
    make_link(dev_links, link, f"../../loop{admin.number}")
    be = libxl.create_backend(5, 51712, str(link), "w")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    assert libxl.nodes(be)["physical-device-luid"] == f"{seq:x}"
    consumer.release()


def test_stale_by_diskseq_link_is_refused(
    libxl: Libxl, make_image: ImageFactory, dev_links: list[Path], loop_devices: list[loop.LoopDevice]
) -> None:
    """After a detach the old link stays and points at whatever the number is now (kernel-devices §5)."""
    first = loop.attach_file(str(make_image("a.img")), read_only=False, tag="xenblockctl:admin")
    old_seq, number = first.identity.diskseq, first.number
    link = Path(f"/dev/disk/by-diskseq/{old_seq}")
    make_link(dev_links, link, f"../../loop{number}")
    first.close()
    be = libxl.create_backend(5, 51712, str(link), "w")
    result = libxl.run("add", be)
    assert result.returncode == 1
    nodes = libxl.nodes(be)
    assert nodes["hotplug-error"].startswith("identity-mismatch: ")
    assert "physical-device" not in nodes


def test_mapper_name_must_be_a_dm_device_of_that_name(
    libxl: Libxl, make_image: ImageFactory, dev_links: list[Path], loop_devices: list[loop.LoopDevice]
) -> None:
    admin = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(admin)
    link = Path(f"/dev/mapper/xbc-test-{os.getpid()}")
    make_link(dev_links, link, f"../loop{admin.number}")
    be = libxl.create_backend(5, 51712, str(link), "w")
    result = libxl.run("add", be)
    assert result.returncode == 1
    error = libxl.nodes(be)["hotplug-error"]
    assert error.startswith("identity-mismatch: "), error
    assert "dm name" in error


def test_by_diskseq_link_to_a_regular_file_is_refused(
    libxl: Libxl, make_image: ImageFactory, dev_links: list[Path]
) -> None:
    """A by-diskseq target promises a block device with that diskseq: a link that leads to an image
    file must not quietly become a fresh loop device (whose diskseq nobody promised)."""
    image = make_image("planted.img")
    link = Path("/dev/disk/by-diskseq/4294967291")
    make_link(dev_links, link, str(image))
    be = libxl.create_backend(5, 51712, str(link), "w")
    result = libxl.run("add", be, XENBLOCKCTL_HANDOFF_TIMEOUT="2")  # refused long before
    assert result.returncode == 1, result.stderr
    nodes = libxl.nodes(be)
    assert nodes["hotplug-error"].startswith("identity-mismatch: "), nodes
    assert "is a regular file, expected a block device" in nodes["hotplug-error"]
    assert "physical-device" not in nodes
    assert bound_loops_under(image.parent) == {}
