"""Configuration: file < drop-ins < environment, sources reported, strict parsing, and the hotplug
path reading files only when they exist (no tomllib import otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import CliRunner
from xenblockctl import config
from xenblockctl.blockscript.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def etc(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("XENBLOCKCTL_HANDOFF_TIMEOUT")  # cli_env's; these tests set their own
    main = Path(cli_env["XENBLOCKCTL_CONFIG"])
    (main.parent / "conf.d").mkdir(parents=True)
    return main.parent


def test_defaults_without_any_file(run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENBLOCKCTL_HANDOFF_TIMEOUT")
    result = run_cli("config", "show", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["schema"] == "xenblockctl.config.v1"
    assert doc["files"] == []
    assert {k: v["source"] for k, v in doc["options"].items()} == {o.key: "default" for o in config.OPTIONS}
    assert doc["options"]["hotplug.handoff_timeout"] == {
        "value": 30.0,
        "default": 30.0,
        "source": "default",
        "env": "XENBLOCKCTL_HANDOFF_TIMEOUT",
    }


def test_dropins_override_the_file_and_the_environment_overrides_both(
    run_cli: CliRunner, etc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (etc / "xenblockctl.conf").write_text(
        '[hotplug]\nhandoff_timeout = 20\nlock_timeout = 5\n[attach]\nbackend = "kernel"\n'
    )
    (etc / "conf.d" / "10-a.conf").write_text("[hotplug]\nhandoff_timeout = 12.5\n")
    (etc / "conf.d" / "20-b.conf").write_text("[hotplug]\nhandoff_timeout = 15\n[udev]\nenabled = true\n")
    (etc / "conf.d" / "30-ignored.conf.disabled").write_text("not toml at all [")
    monkeypatch.setenv("XENBLOCKCTL_LOCK_TIMEOUT", "7")
    doc = run_cli("config", "show", "--json").json()
    opts = doc["options"]
    assert doc["files"] == [
        str(etc / "xenblockctl.conf"),
        str(etc / "conf.d/10-a.conf"),
        str(etc / "conf.d/20-b.conf"),
    ]
    assert (opts["hotplug.handoff_timeout"]["value"], opts["hotplug.handoff_timeout"]["source"]) == (
        15.0,
        str(etc / "conf.d/20-b.conf"),
    )
    assert (opts["hotplug.lock_timeout"]["value"], opts["hotplug.lock_timeout"]["source"]) == (
        7.0,
        "env XENBLOCKCTL_LOCK_TIMEOUT",
    )
    assert opts["attach.backend"]["value"] == "kernel"
    assert opts["udev.enabled"]["value"] is True
    table = run_cli("config", "show").out
    assert "hotplug.handoff_timeout   15.0" in table
    # The hotplug path sees the same values through Settings.from_env.
    import os

    settings = Settings.from_env(os.environ)
    assert (settings.handoff_timeout, settings.lock_timeout) == (15.0, 7.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hotplug]\nhandof_timeout = 3\n", "unknown option hotplug.handof_timeout"),
        ("[hotplug]\nhandoff_timeout = 60\n", "60.0 outside 0.1..35 s"),
        ('[hotplug]\ndirect_io = "yes"\n', "expected true or false, got str"),
        ("[attach]\nbackend = 'qemu'\n", "'qemu' is not one of auto, kernel, engine"),
        ("handoff_timeout = 3\n", "top-level key 'handoff_timeout' must be a [section]"),
        ("[hotplug\n", "not valid TOML"),
    ],
)
def test_bad_files_are_refused_with_a_coded_error(
    run_cli: CliRunner, etc: Path, text: str, message: str
) -> None:
    (etc / "xenblockctl.conf").write_text(text)
    result = run_cli("config", "show")
    assert result.code == 1
    first, hint = result.err.splitlines()
    assert first.startswith(f"xenblockctl: bad-config: {etc / 'xenblockctl.conf'}")
    assert message in first
    assert hint.startswith("hint: see xenblockctl.conf(5)")


def _probe(env: dict[str, str]) -> dict[str, object]:
    code = (
        "import json, os, sys\n"
        "from xenblockctl.blockscript.settings import Settings\n"
        "s = Settings.from_env(os.environ)\n"
        "print(json.dumps({'handoff': s.handoff_timeout, 'tomllib': 'tomllib' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_hotplug_path_parses_config_only_when_a_file_exists(cli_env: dict[str, str], etc: Path) -> None:
    import os

    env = {**os.environ, **cli_env}
    assert _probe(env) == {"handoff": 10.0, "tomllib": False}  # cli_env sets the variable
    del env["XENBLOCKCTL_HANDOFF_TIMEOUT"]
    assert _probe(env) == {"handoff": 30.0, "tomllib": False}
    (etc / "conf.d" / "50-x.conf").write_text("[hotplug]\nhandoff_timeout = 3.5\n")
    assert _probe(env) == {"handoff": 3.5, "tomllib": True}
