"""`doctor --root` checks an installation laid by `install-hooks --root`: clean when complete, and one
finding with a fix for each part broken on purpose. Every installation check is in the report every
time (a check that cannot run is `skipped`, with why)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import CliRunner
from xenblockctl.toolstack import host, hostfiles, installcheck

INSTALL_CHECKS = [
    "block-script",
    "script-import",
    "attach-script",
    "udev-rules",
    "udev-hook",
    "units",
    "blkback",
    "man-pages",
]
SCRIPT = "etc/xen/scripts/block-xenblockctl"
HOOK = "usr/libexec/xenblockctl/xenblockctl-udev"
RULES = "etc/udev/rules.d/60-xenblockctl.rules"
UNIT = "etc/systemd/system/xenblockctl-engine.service"
WANTS = "etc/systemd/system/multi-user.target.wants/xenblockctl-engine.service"


def _doctor(run_cli: CliRunner, root: Path) -> dict[str, dict[str, Any]]:
    result = run_cli("doctor", "--root", str(root), "--json")
    doc = result.json()
    checks = [f["check"] for f in doc["findings"]]
    assert [c for c in checks if c in INSTALL_CHECKS] == INSTALL_CHECKS, "every check, every time"
    return {f["check"]: f for f in doc["findings"] if f["check"] in INSTALL_CHECKS}


def _config(cli_env: dict[str, str], text: str) -> None:
    path = Path(cli_env["XENBLOCKCTL_CONFIG"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def root(run_cli: CliRunner, cli_env: dict[str, str], tmp_path: Path) -> Path:
    """A complete local-layout installation (this venv's interpreter), the engine configured as the
    consumer and its unit enabled: every installation check passes."""
    root = tmp_path / "root"
    root.mkdir()
    assert run_cli("install-hooks", "--root", str(root)).code == 0
    (root / WANTS).parent.mkdir(parents=True)
    (root / WANTS).symlink_to("/etc/systemd/system/xenblockctl-engine.service")
    _config(cli_env, '[attach]\nbackend = "engine"\n')
    return root


def _status(found: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {check: f["status"] for check, f in found.items()}


def test_a_complete_installation_is_clean(run_cli: CliRunner, root: Path) -> None:
    found = _doctor(run_cli, root)
    expected = dict.fromkeys(INSTALL_CHECKS, "ok")
    # Not a Xen domain here: the blkback check cannot mean anything and says so.
    expected["blkback"] = (
        "skipped" if not os.path.exists(installcheck.XEN_CAPABILITIES) else found["blkback"]["status"]
    )
    assert _status(found) == expected, found
    assert "imports xenblockctl.blockscript.hotplug" in found["script-import"]["message"]
    if expected["blkback"] == "skipped":
        assert found["blkback"]["message"].startswith("skipped: not a Xen domain")


def test_missing_block_script(run_cli: CliRunner, root: Path) -> None:
    (root / SCRIPT).unlink()
    found = _doctor(run_cli, root)
    assert found["block-script"]["status"] == "error"
    assert found["block-script"]["message"] == f"the block script {root / SCRIPT} does not exist"
    assert "install-hooks" in found["block-script"]["fix"]
    assert found["script-import"]["status"] == "skipped"
    assert found["script-import"]["message"] == f"skipped: {root / SCRIPT} is missing"
    assert found["attach-script"]["status"] == "error", "attach.script names the same file"


def test_block_script_not_executable(run_cli: CliRunner, root: Path) -> None:
    (root / SCRIPT).chmod(0o644)
    found = _doctor(run_cli, root)
    assert found["block-script"]["status"] == "error"
    assert found["block-script"]["message"].endswith("is not executable")
    assert found["block-script"]["fix"] == f"chmod 0755 {root / SCRIPT}"


def _shebang(path: Path, line: str) -> None:
    text = path.read_text().split("\n", 1)[1]
    path.write_text(f"{line}\n{text}")


def test_block_script_whose_interpreter_cannot_import_the_package(run_cli: CliRunner, root: Path) -> None:
    """The issue's case: the script runs a Python without xenblockctl and dies before it can say why."""
    python = "/usr/bin/python3"
    bare = subprocess.run(
        [python, "-c", "import xenblockctl"], cwd="/", env={}, capture_output=True, check=False
    )
    if bare.returncode == 0:
        pytest.skip(f"{python} imports xenblockctl on this host")
    _shebang(root / SCRIPT, f"#!{python}")
    found = _doctor(run_cli, root)
    assert found["block-script"]["status"] == "ok"
    assert found["script-import"]["status"] == "error"
    assert "ModuleNotFoundError: No module named 'xenblockctl'" in found["script-import"]["message"]
    assert "install-hooks" in found["script-import"]["fix"]

    _shebang(root / SCRIPT, "#!/nonexistent/python3")
    found = _doctor(run_cli, root)
    assert found["script-import"]["status"] == "error"
    assert "its interpreter /nonexistent/python3 does not exist" in found["script-import"]["message"]


def test_laid_block_script_is_checked_the_way_it_runs(run_cli: CliRunner, root: Path) -> None:
    """The laid script runs with -S and appends the package's directory itself: the check imports
    that way. Before, it imported with site.py, which found the package anyway (this venv's
    editable install), so a laid script pointing at the wrong directory passed."""
    found = _doctor(run_cli, root)
    assert found["script-import"]["status"] == "ok"
    assert " -S (with " in found["script-import"]["message"]
    script = root / SCRIPT
    text = script.read_text()
    packages = hostfiles.laid_packages(text)
    assert packages is not None
    script.write_text(text.replace(repr(packages), repr("/nonexistent/site-packages")))
    found = _doctor(run_cli, root)
    assert found["script-import"]["status"] == "error"
    assert "/nonexistent/site-packages" in found["script-import"]["message"]
    assert "No module named 'xenblockctl'" in found["script-import"]["message"]


def test_attach_script_naming_a_missing_script(
    run_cli: CliRunner, cli_env: dict[str, str], root: Path
) -> None:
    _config(cli_env, '[attach]\nbackend = "engine"\nscript = "block-nonexistent"\n')
    found = _doctor(run_cli, root)
    assert found["attach-script"]["status"] == "error"
    assert f"{root}/etc/xen/scripts/block-nonexistent does not exist" in found["attach-script"]["message"]
    assert "attach.script" in found["attach-script"]["fix"]
    assert found["block-script"]["status"] == "ok"


def test_udev_rules_and_hook(run_cli: CliRunner, root: Path) -> None:
    (root / HOOK).unlink()
    found = _doctor(run_cli, root)
    assert (found["udev-rules"]["status"], found["udev-hook"]["status"]) == ("ok", "error")
    assert f"{root / HOOK} does not exist" in found["udev-hook"]["message"]

    (root / RULES).unlink()
    found = _doctor(run_cli, root)
    assert found["udev-rules"]["status"] == "warning"
    assert found["udev-hook"] == {
        "check": "udev-hook",
        "status": "skipped",
        "message": "skipped: no udev rules file names a hook",
        "fix": None,
        "items": [],
    }


def test_engine_unit_when_the_engine_is_the_consumer(
    run_cli: CliRunner, cli_env: dict[str, str], root: Path
) -> None:
    (root / WANTS).unlink()
    found = _doctor(run_cli, root)
    assert found["units"]["status"] == "warning"
    assert found["units"]["fix"] == "systemctl enable --now xenblockctl-engine.service"

    (root / UNIT).unlink()
    found = _doctor(run_cli, root)
    assert found["units"]["status"] == "error"
    assert "xenblockctl-engine.service is not in" in found["units"]["message"]

    _config(cli_env, '[attach]\nbackend = "kernel"\n')
    found = _doctor(run_cli, root)
    assert found["units"]["status"] == "info"
    assert "not needed" in found["units"]["message"]


def test_checks_that_need_the_configuration_say_they_were_skipped(
    run_cli: CliRunner, cli_env: dict[str, str], root: Path
) -> None:
    _config(cli_env, "[attach]\nbackend = 3\n")
    found = _doctor(run_cli, root)
    assert found["attach-script"]["status"] == "skipped"
    assert found["units"]["status"] == "skipped"
    assert found["units"]["message"].startswith("skipped: the configuration does not load")


def test_missing_man_page(run_cli: CliRunner, root: Path) -> None:
    (root / "usr/local/share/man/man5/xenblockctl.conf.5").unlink()
    found = _doctor(run_cli, root)
    assert found["man-pages"]["status"] == "warning"
    assert found["man-pages"]["items"] == ["xenblockctl.conf.5"]


@pytest.mark.parametrize(
    "case",
    [(True, "auto", "ok"), (True, "engine", "ok"), (False, "kernel", "error"), (False, "auto", "info")],
)
def test_blkback_state_and_what_it_means(
    run_cli: CliRunner,
    cli_env: dict[str, str],
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[bool, str, str],
) -> None:
    loaded, backend, status = case
    # This host is no Xen domain and cannot load blkback: both facts are stood in for.
    capabilities = root.parent / "capabilities"
    capabilities.write_text("control_d\n")
    monkeypatch.setattr(installcheck, "XEN_CAPABILITIES", str(capabilities))
    monkeypatch.setattr(host, "blkback_loaded", lambda: loaded)
    _config(cli_env, f'[attach]\nbackend = "{backend}"\n')
    found = _doctor(run_cli, root)
    assert found["blkback"]["status"] == status, found["blkback"]
    if status == "error":
        assert found["blkback"]["fix"].startswith("modprobe xen-blkback")


def test_a_root_that_does_not_exist_is_refused(run_cli: CliRunner, tmp_path: Path) -> None:
    result = run_cli("doctor", "--root", str(tmp_path / "nonexistent"))
    assert result.code == 2
    assert "does not exist" in result.err
