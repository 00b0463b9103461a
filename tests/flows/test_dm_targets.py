"""dm target forms on the host: parsing, the `kind=dm` owner record, sharing with a volatile disk's
base, and what happens where the kernel has no device-mapper (this host). The dm paths themselves
run in the dm lane's guest (tests/dm/scenarios.py, script_*)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.backend import engine
from xenblockctl.blockscript.owner import OwnerRecord, OwnerRecordError
from xenblockctl.blockscript.target import TargetSyntaxError, parse_target
from xenblockctl.journal import Journal
from xenblockctl.kernel import dm, loop
from xenblockctl.kernel.blockdev import BlockIdentity

REPO = Path(__file__).resolve().parents[2]
HOST_HAS_DM = os.path.exists(dm.CONTROL_PATH) or os.path.exists(dm.MISC_SYSFS)
no_dm_here = pytest.mark.skipif(HOST_HAS_DM, reason="this host has device-mapper: the dm lane covers it")

# --- parsing ---------------------------------------------------------------------------------------


def test_uuid_and_snapshot_forms_parse() -> None:
    t = parse_target("uuid:LVM-abc123")
    assert (t.dm_uuid, t.snapshot, t.expect_dm_name) == ("LVM-abc123", False, None)
    t = parse_target("snapshot:/var/lib/xen/images/base.img")
    assert (t.path, t.snapshot, t.dm_uuid) == ("/var/lib/xen/images/base.img", True, None)
    # a file under /dev (tmpfs) is a valid base: the regular-file check happens on the fd
    assert parse_target("snapshot:/dev/shm/base.img").snapshot
    assert parse_target("/dev/mapper/vg0-lv--data").expect_dm_name == "vg0-lv--data"


@pytest.mark.parametrize(
    "params",
    [
        "uuid:",
        "uuid:has space",
        "uuid:with/slash",
        "uuid:" + "u" * 129,
        "snapshot:",
        "snapshot:relative.img",
        "snapshot:/a/../b.img",
        "snapshot:/a\nb",
        "/dev/mapper/control",
        "/dev/mapper/" + "n" * 128,
        "/dev/mapper/sp ace",
    ],
)
def test_bad_dm_forms_are_syntax_errors(params: str) -> None:
    with pytest.raises(TargetSyntaxError):
        parse_target(params)


# --- the owner record ------------------------------------------------------------------------------

IDENT = BlockIdentity(254, 3, 0x1DD, 8 << 20, 512, 512, False)


def test_dm_owner_record_round_trips() -> None:
    uuid = dm.make_owned_uuid("snap")
    rec = OwnerRecord.for_dm(IDENT, uuid=uuid, backing=(0xFE00, 0x20C0F6), writable=True)
    text = rec.format()
    assert text == f"v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 backing=fe00:20c0f6 uuid={uuid}"
    assert OwnerRecord.parse(text) == rec
    assert rec.devt == os.makedev(254, 3)


def test_records_written_before_kind_dm_still_parse() -> None:
    text = "v1 kind=loop dev=7:3 seq=1db mode=w autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712"
    rec = OwnerRecord.parse(text)
    assert (rec.kind, rec.uuid, rec.tag) == ("loop", None, "xenblockctl:5:51712")
    assert OwnerRecord.parse("v1 kind=device dev=fe:0 seq=5 mode=r autoclear=0").kind == "device"


@pytest.mark.parametrize(
    "text",
    [
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1",  # no uuid: ownership unprovable
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 uuid=LVM-someone-elses",
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 uuid=XENBLOCKCTL-",
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 uuid=XENBLOCKCTL-1-2-3 tag=xenblockctl:5:1",
        "v1 kind=device dev=fe:3 seq=1dd mode=w autoclear=0 uuid=XENBLOCKCTL-1-2-3",
        "v1 kind=dmx dev=fe:3 seq=1dd mode=w autoclear=1 uuid=XENBLOCKCTL-1-2-3",
    ],
)
def test_malformed_dm_records_are_refused(text: str) -> None:
    with pytest.raises(OwnerRecordError):
        OwnerRecord.parse(text)


def test_owner_record_knows_our_dm_uuid_prefix() -> None:
    """owner.py repeats the prefix so the hotplug path need not import the dm module: keep in step."""
    uuid = dm.make_owned_uuid("snap")
    assert uuid.startswith(dm.OWNED_UUID_PREFIX)
    OwnerRecord.parse(f"v1 kind=dm dev=fe:3 seq=1 mode=w autoclear=1 uuid={uuid}")
    with pytest.raises(OwnerRecordError):
        OwnerRecord.parse(f"v1 kind=dm dev=fe:3 seq=1 mode=w autoclear=1 uuid=X{uuid}")


def test_plain_targets_do_not_import_the_dm_code() -> None:
    """The dm modules cost ~25 ms of imports: only dm targets pay for them (every VM start runs us)."""
    probe = (
        "import json, sys\n"
        "import xenblockctl.blockscript.hotplug, xenblockctl.blockscript.add\n"
        "import xenblockctl.blockscript.remove\n"
        "from xenblockctl.blockscript.target import maybe_dm, parse_target\n"
        "for p in ('/var/lib/xen/disk.img', '/dev/loop0', '/dev/shm/disk.img', '/dev/disk/by-diskseq/9'):\n"
        "    assert not maybe_dm(parse_target(p)), p\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('xenblockctl'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert not [m for m in loaded if m.endswith((".dm", ".dm_abi", ".dmtargets"))], loaded


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
