"""dm target forms on the host: sharing with a volatile disk's base, and what happens where the
kernel has no device-mapper (this host). Parsing and the `kind=dm` owner record are unit tests
(tests/unit/test_blockscript_targets.py, test_blockscript_owner.py); the dm paths themselves run in
the dm lane's guest (tests/dm/scenarios.py, script_*)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.backend import engine
from xenblockctl.blockscript.owner import OwnerRecord
from xenblockctl.journal import Journal
from xenblockctl.kernel import dm, loop

HOST_HAS_DM = os.path.exists(dm.CONTROL_PATH) or os.path.exists(dm.MISC_SYSFS)
no_dm_here = pytest.mark.skipif(HOST_HAS_DM, reason="this host has device-mapper: the dm lane covers it")

# --- where the kernel has no device-mapper ----------------------------------------------------------


@no_dm_here
@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
@pytest.mark.parametrize("form", ["snapshot", "uuid"])
def test_dm_forms_without_dm_fail_coded_and_allocate_nothing(
    libxl: Libxl, make_image: ImageFactory, form: str
) -> None:
    image = make_image()
    params = f"snapshot:{image}" if form == "snapshot" else "uuid:LVM-whatever"
    be = libxl.create_backend(5, 51712, params, "w")
    result = libxl.run("add", be)
    assert result.returncode == 1, result.stderr
    nodes = libxl.nodes(be)
    assert nodes["hotplug-error"].startswith("dm-unavailable: "), nodes
    assert nodes["hotplug-status"] == "error"
    assert "physical-device" not in nodes
    assert bound_loops_under(image.parent) == {}, "a snapshot: attach without dm allocated a loop device"


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_snapshot_base_must_be_a_regular_file(
    libxl: Libxl, loop_devices: list[loop.LoopDevice], make_image: ImageFactory
) -> None:
    admin = loop.attach_file(str(make_image()), read_only=True, tag="xenblockctl:admin")
    loop_devices.append(admin)
    be = libxl.create_backend(5, 51712, f"snapshot:/dev/loop{admin.number}", "w")
    assert libxl.run("add", be).returncode == 1
    assert libxl.nodes(be)["hotplug-error"].startswith("target-type: "), libxl.nodes(be)


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    """A /dev/X directory of our own (as LVM's /dev/VG), removed afterwards."""
    path = Path(f"/dev/xbctest{os.getpid()}")
    path.mkdir()
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_dev_x_y_that_is_not_dm_stays_a_plain_device(
    libxl: Libxl, make_image: ImageFactory, loop_devices: list[loop.LoopDevice], dev_dir: Path
) -> None:
    """/dev/X/Y looks like LVM's /dev/VG/LV, but so do /dev/md/NAME and friends: only a dm device
    of the LVM name takes the dm route, anything else is opened by path as before."""
    admin = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(admin)
    link = dev_dir / "disk"
    link.symlink_to(f"/dev/loop{admin.number}")
    be = libxl.create_backend(5, 51712, str(link), "w")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    nodes = libxl.nodes(be)
    assert nodes["physical-device"] == f"7:{admin.number:x}"
    assert OwnerRecord.parse(nodes["xenblockctl-owner"]).kind == "device"
    consumer.release()


# --- sharing with a volatile disk, and remove ------------------------------------------------------


def _fake_volatile_backend(libxl: Libxl, domid: int, image: Path, live: loop.LoopDevice) -> Backend:
    """A backend whose owner record says: our dm device (here a live loop stands in for its devt +
    diskseq, which is all the sharing check looks at), reading `image` as its base."""
    be = libxl.create_backend(domid, 51712, f"snapshot:{image}", "w")
    st = os.stat(image)
    record = OwnerRecord.for_dm(
        live.identity, uuid=dm.make_owned_uuid("snap"), backing=(st.st_dev, st.st_ino), writable=True
    )
    libxl.store.write(be.node("xenblockctl-owner"), record.format())
    libxl.store.write(be.node("physical-device"), live.identity.physical_device)
    libxl.store.write(be.node("physical-device-luid"), live.identity.luid)
    return be


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_volatile_disk_claims_its_base_read_only(
    libxl: Libxl, make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    """A volatile disk reads its base through a read-only loop device (the snapshot's origin), which
    is what the sharing check sees: writers are refused, readers share, and once the volatile disk
    is gone (its loops with it) the base is free again."""
    image = make_image("base.img")
    stand_in = loop.attach_file(str(make_image("standin.img")), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(stand_in)
    base = loop.attach_file(str(image), read_only=True, tag="xenblockctl:7:51712:base")
    loop_devices.append(base)
    _fake_volatile_backend(libxl, 7, image, stand_in)
    writer = libxl.create_backend(8, 51712, str(image), "w")
    result = libxl.run("add", writer)
    assert result.returncode == 1
    nodes = libxl.nodes(writer)
    assert nodes["hotplug-status"] == "busy", nodes
    assert f"/dev/loop{base.number}" in nodes["hotplug-error"], nodes
    reader = libxl.create_backend(9, 51712, str(image), "r")
    consumer = libxl.engine_consumer(reader)
    result = libxl.run("add", reader)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    consumer.release()
    # once the volatile disk is gone (dm device and its base loop) the base is free again
    base.close()
    stand_in.close()
    writer2 = libxl.create_backend(10, 51712, str(image), "w")
    consumer = libxl.engine_consumer(writer2)
    result = libxl.run("add", writer2)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    consumer.release()


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_remove_of_a_volatile_disk_withdraws_and_touches_nothing(
    libxl: Libxl, make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    stand_in = loop.attach_file(str(make_image("standin.img")), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(stand_in)
    backend = _fake_volatile_backend(libxl, 7, make_image("base.img"), stand_in)
    result = libxl.run("remove", backend)
    assert result.returncode == 0, result.stderr
    assert "removed (not-a-loop)" in result.stderr
    nodes = libxl.nodes(backend)
    assert not [n for n in nodes if n.startswith("physical-device") or n == "xenblockctl-owner"], nodes
    assert stand_in.number in bound_loops_under(Path(stand_in.backing_path).parent), "remove touched a device"


# --- the engine's start-up sweep -------------------------------------------------------------------


@no_dm_here
def test_engine_sweep_without_dm_is_a_quiet_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine.sweep_dm_leftovers(Journal("test")) == []
    assert "no device-mapper sweep: dm-unavailable" in capsys.readouterr().err


def test_engine_sweep_failure_never_stops_the_engine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fault injection: dm present but the sweep fails (EACCES on control, or a list that errors)."""

    def refused(*args: object, **kwargs: object) -> dm.DmControl:
        raise dm.DmError("cannot open /dev/mapper/control", errno=errno.EACCES)

    monkeypatch.setattr(dm.DmControl, "open", refused)
    assert engine.sweep_dm_leftovers(Journal("test")) == []
    assert "EACCES" in capsys.readouterr().err

    class Control:
        def __enter__(self) -> Control:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def broken_sweep(ctl: object) -> list[str]:
        raise dm.DmError("DM_LIST_DEVICES failed", errno=errno.EIO)

    monkeypatch.setattr(dm.DmControl, "open", lambda *a, **k: Control())
    monkeypatch.setattr(dm, "sweep_owned", broken_sweep)
    assert engine.sweep_dm_leftovers(Journal("test")) == []
    assert "device-mapper sweep failed: dm-error" in capsys.readouterr().err
