"""The admin CLI speaks its users' conventions (issue 19): xl's spellings (ro/rw, domain names, -f,
disk specs), qvm-block's and lsblk's (bare command lists, short aliases, -o, --noheadings), a JSON
error document with --json, and messages that say a thing once and whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.cli import CliRunner, Engine
from tests.fixtures.kernel import ImageFactory
from xenblockctl.cli import exitcodes
from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vdev import Vdev

SCRIPT = "/etc/xen/scripts/block-xenblockctl"


@pytest.fixture
def two_vbds(cli_store: XenStore) -> None:
    for vdev in ("xvda", "xvdc"):
        write_vbd(cli_store, DiskSpec(5, Vdev.parse(vdev), f"/srv/{vdev}.img", "w", script=SCRIPT))


def _error_doc(out: str) -> dict[str, object]:
    doc = json.loads(out)
    assert isinstance(doc, dict)
    assert doc["schema"] == "xenblockctl.error.v1"
    assert sorted(doc) == ["code", "errno", "exit_status", "hint", "message", "schema"]
    return doc


def test_json_error_object_keeps_the_exit_status(run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = run_cli("show", "guest5", "xvdq", "--json")
    assert missing.code == exitcodes.EXIT_NOT_FOUND
    doc = _error_doc(missing.out)
    assert doc["code"] == "vbd-missing"
    assert doc["exit_status"] == exitcodes.EXIT_NOT_FOUND
    assert doc["message"] == "domain 5 has no vbd xvdq (268439552)"
    assert doc["hint"] == "see `xenblockctl list` for the attached devices"
    assert missing.err.startswith("xenblockctl: vbd-missing: ")  # stderr says it as without --json

    usage = run_cli("list", "--json", "-o", "DOM")
    assert usage.code == exitcodes.EXIT_USAGE
    assert _error_doc(usage.out)["code"] == "usage"

    monkeypatch.setenv("XENSTORED_PATH", f"/tmp/no-such-xenstored-{os.getpid()}")
    gone = run_cli("list", "--json")
    assert gone.code == exitcodes.EXIT_ERROR
    doc = _error_doc(gone.out)
    assert doc["code"] == "xenstore-unavailable"
    assert doc["errno"] == "ENOENT"
    # without --json, stdout stays empty; `--json` after `--` is an argument, not the option
    assert run_cli("list").out == ""


def test_doctor_does_not_cut_the_xenstore_error(run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    long_path = "/tmp/" + "x" * 90 + str(os.getpid())
    monkeypatch.setenv("XENSTORED_PATH", long_path)
    result = run_cli("doctor")
    line = next(line for line in result.out.splitlines() if line.split()[1:2] == ["xenstored"])
    assert long_path in line
    assert line.rstrip().endswith("(ENOENT: No such file or directory)"), line


def test_modes_domains_and_exclusive_options(run_cli: CliRunner, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(b"\0" * 4096)
    both = run_cli("attach", "guest5", str(image), "--engine", "--kernel")
    assert both.code == exitcodes.EXIT_USAGE
    assert "--engine and --kernel are mutually exclusive" in both.err
    nobody = run_cli("attach", "guest5", str(image), "--backend-domain", "nosuch")
    assert nobody.code == exitcodes.EXIT_NOT_FOUND
    assert "no domain named 'nosuch'" in nobody.err
    assert run_cli("list", "--json").json()["vbds"] == []  # refused before anything was written


def test_a_spec_given_as_target_is_named(run_cli: CliRunner) -> None:
    result = run_cli("attach", "guest5", "format=raw,vdev=xvdb,access=rw,target=/srv/a.img")
    assert result.code == exitcodes.EXIT_USAGE
    assert "looks like an xl disk spec: give it as --spec" in result.err
    twice = run_cli("attach", "guest5", "/srv/a.img", "--spec", "/srv/a.img,,xvdb")
    assert twice.code == exitcodes.EXIT_USAGE
    assert "does not go with TARGET" in twice.err
    cdrom = run_cli("attach", "guest5", "--spec", "/root/image.iso,,hdc,cdrom")
    assert cdrom.code == exitcodes.EXIT_USAGE
    assert "disk-spec-invalid: cdrom devices are not supported" in cdrom.err
    assert run_cli("list", "--json").json()["vbds"] == []


@pytest.mark.usefixtures("two_vbds")
def test_bare_command_and_aliases_list(run_cli: CliRunner) -> None:
    """qvm-block and lsblk list when given nothing; qvm-device's short names work."""
    listed = run_cli("list")
    assert listed.code == 0
    assert "xvdc" in listed.out
    for args in ((), ("ls",), ("l",)):
        result = run_cli(*args)
        assert (result.code, result.out) == (0, listed.out), args
    assert run_cli("i", "guest5", "xvdc", "--json").json()["vbd"]["vdev"] == "xvdc"
    assert run_cli("info", "5", "xvdc").code == 0
    help_text = run_cli("--help").out
    assert " ls " not in help_text  # aliases are accepted, not advertised
    headless = run_cli("list", "-n", "-o", "vdev,health")
    assert headless.out.split() == ["xvda", "pending", "xvdc", "pending"]
    appended = run_cli("list", "--no-headings", "-o", "+MODE").out.splitlines()[0].split()
    assert appended[-1] == "w"
    assert appended[-2] == "/srv/xvda.img"
    bad = run_cli("list", "-o", "DOM,NOPE")
    assert bad.code == exitcodes.EXIT_USAGE
    assert "unknown column NOPE" in bad.err


@pytest.mark.usefixtures("two_vbds")
def test_detach_takes_a_name_and_dash_f(run_cli: CliRunner) -> None:
    result = run_cli("dt", "guest5", "xvdc", "-f", "--wait", "1", "--json")
    assert result.code == 0, result.err
    assert result.json()["gone"] is True
    assert [v["vdev"] for v in run_cli("list", "--json").json()["vbds"]] == ["xvda"]


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_attach_with_an_xl_spec_and_xl_spellings(
    run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory
) -> None:
    image = make_image()
    spec = f"format=raw, vdev=xvdb, access=ro, no-discard, backend=Domain-0, target={image}"
    result = run_cli("attach", "guest5", "--spec", spec, "--wait", "0", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert (doc["vdev"], doc["mode"], doc["backend_domid"]) == ("xvdb", "r", 0)
    shown = run_cli("show", "guest5", "xvdb", "--json").json()["vbd"]
    assert shown["params"] == str(image)
    positional = run_cli(
        "attach", "guest5", str(image), "--mode", "ro", "--vdev", "xvdc", "--wait", "0", "--json"
    )
    assert positional.code == 0, positional.err
    assert positional.json()["mode"] == "r"
    for vdev in ("xvdb", "xvdc"):
        assert run_cli("detach", "guest5", vdev).code == 0


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_frontend_timeout_is_said_once(
    run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory
) -> None:
    """No guest answers: stdout says what is attached, stderr why the wait ended, each once."""
    image = make_image()
    result = run_cli("attach", "guest5", str(image), "--wait", "0.5")
    assert result.code == exitcodes.EXIT_TIMEOUT, result.err
    reason = result.err.splitlines()[0].removeprefix("xenblockctl: wait-timeout: ")
    assert reason != result.err.splitlines()[0]
    assert reason not in result.out
    assert result.out.startswith("xvda of domain 5: /dev/loop")
    assert run_cli("detach", "guest5", "xvda", "-f", "--wait", "1").code == 0
