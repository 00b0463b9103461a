"""The --json documents are a published interface: compared key for key with golden files in
tests/cli/golden/. Values that differ per run (temp paths, loop numbers, diskseqs) are replaced by
placeholders first; everything else must match exactly. After an intended change (adding a key),
regenerate with XENBLOCKCTL_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import CliRunner, Engine
from tests.fixtures.kernel import ImageFactory
from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vdev import Vdev

GOLDEN = Path(__file__).with_name("golden")
UPDATE_ENV = "XENBLOCKCTL_UPDATE_GOLDEN"
#: Read at import: the cli_env fixture clears every XENBLOCKCTL_* variable for the commands.
UPDATE = bool(os.environ.get(UPDATE_ENV))
SCRIPT = "/etc/xen/scripts/block-xenblockctl"


def _normalize(value: Any, tmp: str, volatile: frozenset[str], key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _normalize(v, tmp, volatile, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v, tmp, volatile, key) for v in value]
    if key in volatile and value is not None:
        return f"<{key}>"
    if isinstance(value, str):
        return value.replace(tmp, "<tmp>")
    return value


def check_golden(name: str, doc: Any, tmp: Path, volatile: frozenset[str] = frozenset()) -> None:
    normalized = _normalize(doc, str(tmp), volatile)
    path = GOLDEN / f"{name}.json"
    text = json.dumps(normalized, indent=2, sort_keys=True) + "\n"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with {UPDATE_ENV}=1"
    assert json.loads(path.read_text()) == normalized, f"{name}: differs from {path}"


@pytest.fixture
def scene(cli_store: XenStore) -> None:
    """vbds in every state `list` distinguishes, written by hand (no devices needed):
    5/xvda published for a device number that does not exist (broken), 5/xvdb a failed attach,
    5/xvdc pending, 8/xvda of a dead domain (stale), and a frontend of 5 without its backend."""
    cli_store.write("/local/domain/8/name", "doomed")
    specs = [
        DiskSpec(5, Vdev.parse("xvda"), "/srv/a.img", "w", script=SCRIPT),
        DiskSpec(5, Vdev.parse("xvdb"), "/srv/b.img", "r", script=SCRIPT),
        DiskSpec(5, Vdev.parse("xvdc"), "/srv/c.img", "w", kind="vbd3", script=SCRIPT),
        DiskSpec(8, Vdev.parse("xvda"), "/srv/d.img", "w", script="/etc/xen/scripts/block"),
        DiskSpec(5, Vdev.parse("xvde"), "/srv/e.img", "w", script=SCRIPT),
    ]
    written = [write_vbd(cli_store, spec) for spec in specs]
    a, b, _c, _d, e = (w.location for w in written)
    cli_store.write_many(
        {
            f"{a.backend}/state": "4",
            f"{a.frontend}/state": "4",
            f"{a.backend}/physical-device": "103:1869f",
            f"{a.backend}/physical-device-luid": "1f",
            f"{a.backend}/physical-device-path": "/dev/nosuch",
            f"{a.backend}/hotplug-status": "connected",
            f"{a.backend}/xenblockctl-owner": "v1 kind=device dev=103:1869f seq=1f mode=w autoclear=0",
            f"{a.backend}/xenblockctl-error-responses": "grant-map=2 io=1 invalid=0 unsupported=0",
            f"{b.backend}/state": "2",
            f"{b.backend}/hotplug-status": "error",
            f"{b.backend}/hotplug-error": "target-missing: /srv/b.img: no such file or device",
        }
    )
    cli_store.rm(e.backend)
    cli_store.rm("/local/domain/8")


@pytest.mark.usefixtures("scene")
def test_list_and_show(run_cli: CliRunner, tmp_path: Path) -> None:
    listed = run_cli("list", "--json")
    assert listed.code == 0, listed.err
    check_golden("list", listed.json(), tmp_path)
    healths = [(v["domid"], v["vdev"], v["health"]) for v in listed.json()["vbds"]]
    assert healths == [
        (5, "xvda", "broken"),
        (5, "xvdb", "failed"),
        (5, "xvdc", "pending"),
        (5, "xvde", "orphan-frontend"),
        (8, "xvda", "stale"),
    ]
    shown = run_cli("show", "guest5", "xvda", "--json")
    assert shown.code == 0, shown.err
    check_golden("show", shown.json(), tmp_path)
    only5 = run_cli("list", "--domain", "guest5", "--json").json()["vbds"]
    assert [v["domid"] for v in only5] == [5, 5, 5, 5]


@pytest.mark.usefixtures("scene")
def test_gc_dry_run_and_detach(run_cli: CliRunner, tmp_path: Path) -> None:
    dry = run_cli("gc", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    doc = dry.json()
    doc["notes"] = [n for n in doc["notes"] if not n.startswith("device-mapper not checked")]
    check_golden("gc-dry-run", doc, tmp_path)
    detached = run_cli("detach", "5", "xvdc", "--json")
    assert detached.code == 0, detached.err
    check_golden("detach", detached.json(), tmp_path)


def test_config(run_cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENBLOCKCTL_HANDOFF_TIMEOUT")
    monkeypatch.setenv("XENBLOCKCTL_ATTACH_WAIT", "3")
    result = run_cli("config", "show", "--json")
    assert result.code == 0, result.err
    check_golden("config", result.json(), tmp_path)


def test_doctor_shape(run_cli: CliRunner, tmp_path: Path) -> None:
    """Messages depend on the host; the document's shape and check names do not."""
    doc = run_cli("doctor", "--json").json()
    shape = {
        "schema": doc["schema"],
        "keys": sorted(doc),
        "checks": [f["check"] for f in doc["findings"] if f["check"] != "orphan-dm"],
        "finding_keys": sorted({k for f in doc["findings"] for k in f}),
        "statuses_valid": all(
            f["status"] in ("ok", "info", "skipped", "warning", "error") for f in doc["findings"]
        ),
    }
    check_golden("doctor-shape", shape, tmp_path)


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_attach(run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory, tmp_path: Path) -> None:
    image = make_image()
    result = run_cli("attach", "guest5", str(image), "--wait", "0", "--json")
    assert result.code == 0, result.err
    check_golden("attach", result.json(), tmp_path, frozenset({"physical_device", "luid", "device_path"}))
    assert run_cli("detach", "5", "xvda").code == 0
