"""doctor and gc against real leftovers: loop devices tagged ours, stale backend directories.

gc is scoped to this test's tmp_path (XENBLOCKCTL_TEST_GC_SCOPE, set by cli_env) so it never
touches another test run's loop devices on the same machine."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.cli import CliRunner, Engine
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from xenblockctl.blockscript.owner import OwnerRecord
from xenblockctl.kernel import loop
from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.identity import OWNER as OWNER_NODE
from xenblockctl.xenstore.vdev import Vdev

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def _finding(doc: dict[str, object], check: str) -> dict[str, object]:
    findings = doc["findings"]
    assert isinstance(findings, list)
    return next(f for f in findings if f["check"] == check)


@pytest.fixture
def leaked(make_image: ImageFactory, loop_devices: list[loop.LoopDevice]) -> loop.LoopDevice:
    """What the kernel-blkback path leaks when libxl deletes a backend without running remove:
    our tag, AUTOCLEAR off, no backend. Closing our fd leaves it bound."""
    dev = loop.attach_file(
        str(make_image("leak.img")), read_only=False, tag=loop.make_tag(9, 51712), autoclear=False
    )
    loop_devices.append(dev)
    return dev


def test_doctor_reports_and_gc_removes_a_leaked_loop(
    run_cli: CliRunner, cli_engine: Engine, leaked: loop.LoopDevice, make_image: ImageFactory
) -> None:
    leaked.close()
    image_dir = make_image("x.img").parent
    assert len(bound_loops_under(image_dir)) == 1
    # A complete installation under --root: this host has none, and its errors are not this test's.
    root = image_dir / "root"
    assert run_cli("install-hooks", "--root", str(root)).code == 0
    doctor = run_cli("doctor", "--root", str(root), "--json")
    assert doctor.code == 0, doctor.out + doctor.err  # warnings do not fail without --strict
    doc = doctor.json()
    assert doc["healthy"] is True
    orphans = _finding(doc, "orphan-loops")
    assert orphans["status"] == "warning"
    assert orphans["items"] == [
        f"/dev/loop{leaked.number}: tag xenblockctl:9:51712, backing {image_dir}/leak.img: no backend uses it"
    ]
    assert orphans["fix"] == "xenblockctl gc"
    assert _finding(doc, "backend")["status"] == "ok"
    assert run_cli("doctor", "--root", str(root), "--strict").code == 6

    dry = run_cli("gc", "--dry-run", "--json")
    assert dry.code == 0
    assert [i["result"] for i in dry.json()["items"]] == ["would remove"]
    assert len(bound_loops_under(image_dir)) == 1, "--dry-run removes nothing"
    done = run_cli("gc")
    assert done.code == 0, done.err
    assert f"/dev/loop{leaked.number}: removed (detached)" in done.out
    assert bound_loops_under(image_dir) == {}
    assert run_cli("gc").out.strip().endswith("nothing to collect")


def test_gc_leaves_devices_a_backend_uses_and_autoclear_ones(
    run_cli: CliRunner,
    cli_store: XenStore,
    leaked: loop.LoopDevice,
    make_image: ImageFactory,
    loop_devices: list[loop.LoopDevice],
) -> None:
    # A backend (domain 5 is alive) whose owner record names the device: in use, not garbage.
    spec = write_vbd(cli_store, DiskSpec(5, Vdev.parse("xvdc"), "/x.img", "w", script="/s/block-xenblockctl"))
    be = spec.location.backend
    owner = OwnerRecord.for_device(leaked, writable=True).with_autoclear(False)
    cli_store.write_many(
        {
            f"{be}/physical-device": leaked.identity.physical_device,
            f"{be}/physical-device-luid": leaked.identity.luid,
            f"{be}/{OWNER_NODE}": owner.format(),
        }
    )
    held = loop.attach_file(str(make_image("held.img")), read_only=True, tag=loop.make_tag(5, 1))
    loop_devices.append(held)  # AUTOCLEAR on: delete-on-close, never garbage
    result = run_cli("gc", "--json")
    assert result.code == 0
    assert result.json()["items"] == []
    assert len(bound_loops_under(make_image("y.img").parent)) == 2
    # Once the backend is gone (remove skipped by libxl), the same device becomes garbage.
    cli_store.rm(be)
    again = run_cli("gc", "--json").json()["items"]
    assert [(i["kind"], i["name"]) for i in again] == [("loop", f"/dev/loop{leaked.number}")]
    leaked.close()


def test_stale_backends_of_ours_are_collected_and_foreign_ones_are_not(
    run_cli: CliRunner, cli_store: XenStore
) -> None:
    cli_store.write("/local/domain/8/name", "doomed")
    ours = write_vbd(
        cli_store, DiskSpec(8, Vdev.parse("xvda"), "/a.img", "w", script="/etc/xen/scripts/block-xenblockctl")
    )
    foreign = write_vbd(
        cli_store, DiskSpec(8, Vdev.parse("xvdb"), "/b.img", "w", script="/etc/xen/scripts/block")
    )
    failed = write_vbd(
        cli_store, DiskSpec(5, Vdev.parse("xvdd"), "/c.img", "w", script="/x/block-xenblockctl")
    )
    cli_store.write_many(
        {
            f"{failed.location.backend}/hotplug-status": "error",
            f"{failed.location.backend}/hotplug-error": "target-missing: /c.img: no such file or device",
        }
    )
    cli_store.rm("/local/domain/8")  # the domain died; libxl never cleaned up
    listed = {v["vdev"] + str(v["domid"]): v["health"] for v in run_cli("list", "--json").json()["vbds"]}
    assert listed == {"xvda8": "stale", "xvdb8": "stale", "xvdd5": "failed"}
    vbds = _finding(run_cli("doctor", "--json").json(), "vbds")
    assert vbds["status"] == "warning"
    items = vbds["items"]
    assert isinstance(items, list)
    assert len(items) == 3
    result = run_cli("gc", "--json")
    assert result.code == 0, result.err
    names = sorted(i["name"] for i in result.json()["items"])
    assert names == sorted([ours.location.backend, failed.location.backend])
    assert cli_store.read_optional(ours.location.backend) is None
    assert cli_store.read_optional(failed.location.backend) is None
    assert cli_store.read_optional(foreign.location.backend) is not None, "not ours: left alone"


def test_doctor_fails_when_nothing_can_serve_a_disk(run_cli: CliRunner) -> None:
    result = run_cli("doctor")
    assert result.code == 6
    assert "error    backend       nothing serves backend/vbd" in result.out
    assert "fix: modprobe xen-blkback (Xen dom0), or systemctl start xenblockctl-engine" in result.out


def test_doctor_without_xenstored(run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENSTORED_PATH", f"/tmp/no-such-xenstored-{os.getpid()}")
    doc = run_cli("doctor", "--json").json()
    assert doc["healthy"] is False
    assert _finding(doc, "xenstored")["status"] == "error"
    assert "XENSTORED_PATH" in str(_finding(doc, "xenstored")["fix"])
