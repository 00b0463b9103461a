"""The --json documents are a published interface: compared key for key with golden files in
tests/cli/golden/. Values that differ per run (temp paths, loop numbers, diskseqs) are replaced by
placeholders first; everything else must match exactly. After an intended change (adding a key),
regenerate with XENBLOCKCTL_UPDATE_GOLDEN=1 and review the diff.

The human output is golden too (*.txt): device numbers there are what lsblk and sysfs print
(decimal MAJ:MIN, decimal diskseq), never xenstore's hex spelling without a label saying so. Where a
real device is involved the numbers are first checked against stat(2), sysfs and lsblk, then
replaced by placeholders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import CliRunner, Engine
from tests.fixtures.kernel import ImageFactory
from tests.support import jsonschema_lite
from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.identity import parse_physical_device
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


def check_golden_text(name: str, text: str, replace: dict[str, str] | None = None) -> None:
    for value, placeholder in (replace or {}).items():
        text = text.replace(value, placeholder)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with {UPDATE_ENV}=1"
    assert text == path.read_text(), f"{name}: differs from {path}:\n{text}"


def shipped_schema(name: str) -> dict[str, Any]:
    """A JSON Schema as the installed package carries it (package data, not the checkout's path)."""
    text = resources.files("xenblockctl").joinpath("schemas", f"{name}.json").read_text()
    schema = json.loads(text)
    assert isinstance(schema, dict)
    return schema


def check_schema(doc: Any, *, wildcards: bool = False) -> None:
    """Every document names its schema; the document must be valid under it."""
    assert isinstance(doc, dict)
    assert "schema" in doc, "a --json document without its schema key"
    problems = jsonschema_lite.errors(
        shipped_schema(doc["schema"].removeprefix("xenblockctl.")), doc, wildcards=wildcards
    )
    assert problems == [], "\n".join(problems)


def check_golden(name: str, doc: Any, tmp: Path, volatile: frozenset[str] = frozenset()) -> None:
    if name != "doctor-shape":  # a summary of a doctor document, not one
        check_schema(doc)
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
def test_list_and_show_human(run_cli: CliRunner, tmp_path: Path) -> None:
    """xvda of guest5 is published as xenstore's `103:1869f` with luid `1f`: a person reads
    259:99999 and diskseq 31, as lsblk and /sys/block/*/diskseq would print that device."""
    listed = run_cli("list")
    assert listed.code == 0, listed.err
    check_golden_text("list", listed.out)
    assert "259:99999" in listed.out
    assert "103:1869f" not in listed.out
    assert " 1f " not in listed.out
    hexcols = run_cli("list", "--no-headings", "-o", "dom,vdev,maj:min,physdev-hex,diskseq,luid-hex")
    assert hexcols.code == 0, hexcols.err
    check_golden_text("list-hex-columns", hexcols.out)
    shown = run_cli("show", "guest5", "xvda")
    assert shown.code == 0, shown.err
    check_golden_text("show", shown.out)
    assert "True" not in shown.out
    assert "None" not in shown.out


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
    check_schema(doc)
    shape = {
        "schema": doc["schema"],
        "keys": sorted(doc),
        "checks": [f["check"] for f in doc["findings"] if f["check"] != "orphan-dm"],
        "finding_keys": sorted({k for f in doc["findings"] for k in f}),
        "statuses_valid": all(f["status"] in ("ok", "info", "warning", "error") for f in doc["findings"]),
    }
    check_golden("doctor-shape", shape, tmp_path)


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_attach(run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory, tmp_path: Path) -> None:
    image = make_image()
    result = run_cli("attach", "guest5", str(image), "--wait", "0", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    volatile = frozenset({"physical_device", "luid", "device_path", "major", "minor", "diskseq"})
    check_golden("attach", doc, tmp_path, volatile)
    assert (doc["major"], doc["minor"]) == parse_physical_device(doc["physical_device"])
    assert doc["diskseq"] == int(doc["luid"], 16)
    assert run_cli("detach", "5", "xvda").code == 0


def _lsblk_view(device: str) -> tuple[str, int]:
    """MAJ:MIN as stat(2) and lsblk print it, and the diskseq as sysfs prints it."""
    rdev = os.stat(device).st_rdev
    numbers = f"{os.major(rdev)}:{os.minor(rdev)}"
    diskseq = int(Path(f"/sys/dev/block/{numbers}/diskseq").read_text())
    lsblk = shutil.which("lsblk")
    if lsblk is not None:
        shown = subprocess.run(
            [lsblk, "-dno", "MAJ:MIN", device], capture_output=True, text=True, check=True, timeout=30
        )
        assert shown.stdout.strip() == numbers
    return numbers, diskseq


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_attach_human_numbers_are_lsblks(
    run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory, tmp_path: Path
) -> None:
    image = make_image()
    result = run_cli("attach", "guest5", str(image), "--wait", "0")
    assert result.code == 0, result.err
    doc = run_cli("show", "5", "xvda", "--json").json()["vbd"]
    device = doc["device_path"]
    numbers, diskseq = _lsblk_view(device)
    assert f"{device} ({numbers}, diskseq {diskseq})" in result.out
    check_golden_text(
        "attach",
        result.out,
        {device: "<device>", f"({numbers},": "(<maj:min>,", f"diskseq {diskseq})": "diskseq <diskseq>)"},
    )
    listed = run_cli("list", "-n", "-o", "DEVICE,MAJ:MIN,DISKSEQ,LIVE-DISKSEQ")
    assert listed.out.split() == [device, numbers, str(diskseq), str(diskseq)]
    identified = run_cli("identify", device)
    assert identified.code == 0, identified.err
    assert any(line.split() == ["maj:min", numbers] for line in identified.out.splitlines())
    assert any(line.split() == ["diskseq", str(diskseq)] for line in identified.out.splitlines())
    assert run_cli("detach", "5", "xvda").code == 0


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_identify_human_and_json(run_cli: CliRunner, make_image: ImageFactory, tmp_path: Path) -> None:
    image = make_image(size=1 << 20)
    human = run_cli("identify", str(image))
    assert human.code == 0, human.err
    doc = run_cli("identify", str(image), "--json")
    assert doc.code == 0, doc.err
    record = doc.json()
    assert record["schema"] == "xenblockctl.identify.v1"
    assert record["diskseq"] == int(record["luid"], 16)
    check_golden(
        "identify",
        record,
        tmp_path,
        frozenset({"device", "major", "minor", "physical_device", "diskseq", "luid"}),
    )
    lines = dict(
        line.split(None, 1)
        for line in human.out.splitlines()
        if not line.startswith(("physical_device", "luid"))
    )
    assert lines["loop"] == "yes"
    assert lines["dm_name"] == "-"
    assert "True" not in human.out
    assert "None" not in human.out
    # the loop device identify made is gone with the command: the hex line must be the same numbers
    hex_numbers = human.out.split("physical_device (xenstore, hex)", 1)[1].split()[0]
    assert parse_physical_device(hex_numbers) == tuple(int(n) for n in lines["maj:min"].split(":"))
    hex_luid = human.out.split("luid (xenstore, hex)", 1)[1].split()[0]
    assert int(lines["diskseq"]) == int(hex_luid, 16)
    per_run = {
        "path",
        "device",
        "maj:min",
        "physical_device (xenstore, hex)",
        "diskseq",
        "luid (xenstore, hex)",
    }
    normalized = "".join(
        f"{line[: len(line) - len(line.split()[-1])]}<per run>\n"
        if any(line.startswith(f"{label}  ") for label in per_run)
        else line + "\n"
        for line in human.out.splitlines()
    )
    check_golden_text("identify", normalized)


def test_every_golden_file_is_valid_under_its_shipped_schema() -> None:
    """Golden files keep `<name>` placeholders for per-run values: those match anything; every
    other value, every key and every missing key is checked."""
    documents = sorted(p for p in GOLDEN.glob("*.json") if p.name != "doctor-shape.json")
    assert [p.stem for p in documents] == [
        "attach",
        "config",
        "detach",
        "error",
        "gc-dry-run",
        "identify",
        "list",
        "show",
    ]
    for path in documents:
        check_schema(json.loads(path.read_text()), wildcards=True)
    shipped = sorted(p.name for p in resources.files("xenblockctl").joinpath("schemas").iterdir())
    assert shipped == [
        f"{n}.v1.json"
        for n in (
            "attach",
            "config",
            "detach",
            "doctor",
            "error",
            "gc",
            "identify",
            "list",
            "sandbox",
            "show",
        )
    ]


def test_the_validator_refuses_what_the_schemas_forbid() -> None:
    """The checks above mean something: a hex major, a missing key and an extra key all fail."""
    doc = json.loads((GOLDEN / "list.json").read_text())
    vbd = doc["vbds"][0]
    schema = shipped_schema("list.v1")
    assert jsonschema_lite.errors(schema, doc) == []
    for change in ({"major": "103"}, {"diskseq": "1f"}, {"physical_device": "259:99999x"}, {"extra": 1}):
        bad = {**doc, "vbds": [{**vbd, **change}]}
        assert jsonschema_lite.errors(schema, bad), change
    missing = {**doc, "vbds": [{k: v for k, v in vbd.items() if k != "luid"}]}
    assert jsonschema_lite.errors(schema, missing) == ["$.vbds[0]: missing key 'luid'"]


def test_error_document(run_cli: CliRunner, tmp_path: Path) -> None:
    result = run_cli("show", "guest5", "xvdq", "--json")
    assert result.code == 3
    check_golden("error", result.json(), tmp_path)
