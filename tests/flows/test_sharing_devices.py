"""The block-device sharing rules end to end, on real loop devices used as the block device a
backend is given (`params` = /dev/loopN): another backend's claim, a backend the stock script
published (no luid), a mounted filesystem, and a dm/md holder. The same rules on in-memory claims
are unit tests (tests/unit/test_blockscript_sharing.py); the dm lane also checks them on real dm
devices (tests/dm/scenarios.py: script_named_forms, script_loop_under_dm_refused)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Libxl
from xenblockctl.blockscript import add, sharing
from xenblockctl.blockscript.settings import Settings
from xenblockctl.environment import Environment
from xenblockctl.journal import Journal
from xenblockctl.kernel import dm, loop, sysfs
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vbd import BackendPath

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


@pytest.fixture
def admin_loop(make_image: ImageFactory, loop_devices: list[loop.LoopDevice]) -> loop.LoopDevice:
    """A block device an admin set up (not ours: remove never detaches it)."""
    device = loop.attach_file(str(make_image("admin.img")), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(device)
    return device


def assert_busy(libxl: Libxl, domid: int, params: str, mode: str, *, by: str) -> None:
    be = libxl.create_backend(domid, 51712, params, mode)
    # a short hand-off: a refusal comes before it, and where the rule is switched off
    # (tests/mutation) the attach that should have been refused gives up soon
    result = libxl.run("add", be, XENBLOCKCTL_HANDOFF_TIMEOUT="2")
    assert result.returncode == 1, result.stderr
    nodes = libxl.nodes(be)
    assert nodes["hotplug-status"] == "busy", nodes
    assert nodes["hotplug-error"].startswith("busy: target already in use "), nodes
    assert by in nodes["hotplug-error"], nodes
    assert "physical-device" not in nodes


def test_device_given_writable_to_one_backend_is_refused_to_another(
    libxl: Libxl, admin_loop: loop.LoopDevice
) -> None:
    params = f"/dev/loop{admin_loop.number}"
    first = libxl.create_backend(5, 51712, params, "w")
    consumer = libxl.engine_consumer(first)
    result = libxl.run("add", first)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    assert_busy(libxl, 6, params, "w", by=first.path)
    assert_busy(libxl, 7, params, "r", by=first.path)
    consumer.release()


def test_device_shared_read_only_by_backends(libxl: Libxl, admin_loop: loop.LoopDevice) -> None:
    params = f"/dev/loop{admin_loop.number}"
    consumers = []
    for domid in (5, 6):
        be = libxl.create_backend(domid, 51712, params, "r")
        consumers.append(libxl.engine_consumer(be))
        result = libxl.run("add", be)
        assert result.returncode == 0, result.stderr
    for consumer in consumers:
        consumer.wait_opened()
    assert_busy(libxl, 7, params, "w", by="read-only by ")
    for consumer in consumers:
        consumer.release()


def test_stock_script_backend_without_luid_counts(libxl: Libxl, admin_loop: loop.LoopDevice) -> None:
    """Xen's own block script publishes physical-device and no luid: its claim cannot be proven
    stale, so it forbids a writer like any live one."""
    params = f"/dev/loop{admin_loop.number}"
    stock = libxl.create_backend(9, 51712, params, "w", engine=False)
    libxl.store.write(stock.node("physical-device"), admin_loop.identity.physical_device)
    assert_busy(libxl, 5, params, "w", by=stock.path)


#: Where the foreign publisher sits among the others (domains 200-317, one disk each, and 250 with
#: ten more): (kind, its frontend domain, its devid).
FOREIGN_PLACES = {
    "vbd-second-disk-of-the-first-domain": ("vbd", 200, 51712 + 16 * 20),
    "vbd-a-domain-of-its-own-listed-last": ("vbd", 400, 51712),
    "vbd-last-disk-of-the-busy-domain": ("vbd", 250, 51712 + 16 * 11),
    "vbd3": ("vbd3", 400, 51712),
}


@pytest.mark.parametrize("place", sorted(FOREIGN_PLACES))
def test_foreign_backend_among_128_others_is_refused(
    libxl: Libxl, admin_loop: loop.LoopDevice, place: str
) -> None:
    """The walk lists every backend directory and reads every physical-device whoever wrote it
    (bench/README.md, issue 18: the pipelined walk): a backend another tool made, with nothing but
    the public nodes (no owner record, no luid, no mode: Xen's stock script's shape, or less), is
    found among 128 others, one per guest plus a guest with ten disks, and refuses the writer."""
    params = f"/dev/loop{admin_loop.number}"
    nodes: dict[str, str] = {}
    for i in range(128):
        domid, devid = (200 + i, 51712) if i < 118 else (250, 51712 + 16 * (i - 117))
        be = f"/local/domain/0/backend/vbd/{domid}/{devid}"
        nodes[f"{be}/physical-device"] = f"fd:{i:x}"  # other devices
        nodes[f"{be}/mode"] = "w"
        if i % 2:  # half with our identity nodes, half in the stock script's shape
            nodes[f"{be}/physical-device-luid"] = f"{1000 + i:x}"
    kind, domid, devid = FOREIGN_PLACES[place]
    foreign = f"/local/domain/0/backend/{kind}/{domid}/{devid}"
    nodes[f"{foreign}/physical-device"] = admin_loop.identity.physical_device
    libxl.store.write_many(nodes)
    others = {
        f"/local/domain/0/backend/vbd/{d}/{n}"
        for d in range(200, 318)
        for n in libxl.store.ls(f"/local/domain/0/backend/vbd/{d}")
    }
    assert len(others - {foreign}) == 128
    assert_busy(libxl, 5, params, "w", by=foreign)
    assert_busy(libxl, 6, params, "r", by=foreign)  # the foreign mode is unknown: assumed writable


def test_stale_backend_claim_on_an_older_binding_does_not_count(
    libxl: Libxl, admin_loop: loop.LoopDevice
) -> None:
    """A backend left behind with the luid of an earlier binding of this loop number names a disk
    that no longer exists: it must not keep the number's new disk from being attached."""
    params = f"/dev/loop{admin_loop.number}"
    old = libxl.create_backend(9, 51712, params, "w", engine=False)
    libxl.store.write_many(
        {
            old.node("physical-device"): admin_loop.identity.physical_device,
            old.node("physical-device-luid"): f"{admin_loop.identity.diskseq - 1:x}",
        }
    )
    be = libxl.create_backend(5, 51712, params, "w")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    consumer.release()


@pytest.fixture
def mounted(admin_loop: loop.LoopDevice, tmp_path: Path) -> Iterator[Path]:
    """An ext4 on the admin's loop device, mounted read-write on this host."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4")
    device = f"/dev/loop{admin_loop.number}"
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
    where = tmp_path / "mnt"
    where.mkdir()
    subprocess.run(["mount", device, str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


def test_device_mounted_on_this_host_is_refused(
    libxl: Libxl, admin_loop: loop.LoopDevice, mounted: Path
) -> None:
    params = f"/dev/loop{admin_loop.number}"
    assert_busy(libxl, 5, params, "w", by=f"mount {mounted}")
    assert_busy(libxl, 6, params, "r", by=f"mount {mounted}")


def test_device_under_a_dm_table_is_refused_writable(
    libxl: Libxl, admin_loop: loop.LoopDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dm (or md) device stacked on the disk owns it: writing behind its back corrupts it.
    Fault injection: this host's kernel has neither dm nor md, so nothing can hold a device here;
    sysfs's holders/ view (and the dm name lookup) is played for the admin's real loop device. The
    dm lane (script_loop_under_dm_refused) refuses under a real dm table."""
    held = (7, admin_loop.number)
    real_holders = sysfs.holders
    monkeypatch.setattr(
        sysfs,
        "holders",
        lambda major, minor: ["dm-7"] if (major, minor) == held else real_holders(major, minor),
    )
    monkeypatch.setattr(dm, "dm_holders", lambda major, minor: ["vg0-data"] if (major, minor) == held else [])
    env = Environment({"XENBLOCKCTL_LOCK_DIR": str(libxl.lock_dir)})
    params = f"/dev/loop{admin_loop.number}"
    be = libxl.create_backend(5, 51712, params, "w")
    path = BackendPath("vbd", 5, 51712)
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10) as store:
        with pytest.raises(sharing.SharingConflict, match="held by dm device 'vg0-data'"):
            add.run_add(
                store, path, Settings(handoff_timeout=2.0), Journal("test-sharing", stderr=False), env=env
            )
        nodes = libxl.nodes(be)
        assert nodes["hotplug-status"] == "busy", nodes
        assert "physical-device" not in nodes
        # reading it is fine: the table does not change what is on the disk
        reader = libxl.create_backend(6, 51712, params, "r")
        consumer = libxl.engine_consumer(reader)
        add.run_add(
            store,
            BackendPath("vbd", 6, 51712),
            Settings(handoff_timeout=10.0),
            Journal("test-sharing", stderr=False),
            env=env,
        )
        consumer.wait_opened()
        consumer.release()
