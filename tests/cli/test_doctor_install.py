"""`doctor --root` checks an installation laid by `install-hooks --root`: clean when complete, and one
finding with a fix for each part broken on purpose. Every installation check is in the report every
time (a check that cannot run is `skipped`, with why)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import CliRunner
from xenblockctl.blockscript import warm
from xenblockctl.toolstack import host, hostfiles, installcheck

INSTALL_CHECKS = [
    "block-script",
    "script-import",
    "hotplug-client",
    "hotplug-server",
    "attach-script",
    "udev-rules",
    "udev-hook",
    "units",
    "blkback",
    "man-pages",
]
SCRIPT = "etc/xen/scripts/block-xenblockctl"  # the hotplug client (install-hooks lays it)
PYTHON_SCRIPT = "etc/xen/scripts/block-xenblockctl.py"  # the Python script beside it
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
    # a running process of this host, not of a --root
    expected["hotplug-server"] = "skipped"
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
    assert found["hotplug-client"]["status"] == "skipped"
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
    _shebang(root / PYTHON_SCRIPT, f"#!{python}")
    found = _doctor(run_cli, root)
    assert found["block-script"]["status"] == "ok"
    assert found["script-import"]["status"] == "error"
    assert "ModuleNotFoundError: No module named 'xenblockctl'" in found["script-import"]["message"]
    assert "install-hooks" in found["script-import"]["fix"]

    _shebang(root / PYTHON_SCRIPT, "#!/nonexistent/python3")
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
    script = root / PYTHON_SCRIPT
    text = script.read_text()
    packages = hostfiles.laid_packages(text)
    assert packages is not None
    script.write_text(text.replace(repr(packages), repr("/nonexistent/site-packages")))
    found = _doctor(run_cli, root)
    assert found["script-import"]["status"] == "error"
    assert "/nonexistent/site-packages" in found["script-import"]["message"]
    assert "No module named 'xenblockctl'" in found["script-import"]["message"]


def test_hotplug_client_and_the_python_script_beside_it(run_cli: CliRunner, root: Path) -> None:
    """The client at the script path runs the `.py` beside it when no server answers: the import
    check is that script's, and a client without it is an error (every such VM start fails)."""
    found = _doctor(run_cli, root)
    assert found["hotplug-client"]["status"] == "ok"
    assert found["hotplug-client"]["message"].startswith(f"{root / SCRIPT} is the hotplug client; ")
    assert str(root / PYTHON_SCRIPT) in found["script-import"]["message"]

    python_script = (root / PYTHON_SCRIPT).read_bytes()
    (root / PYTHON_SCRIPT).unlink()
    found = _doctor(run_cli, root)
    assert found["hotplug-client"]["status"] == "error"
    assert f"{root / PYTHON_SCRIPT} does not exist" in found["hotplug-client"]["message"]
    assert found["script-import"] == {
        "check": "script-import",
        "status": "skipped",
        "message": f"skipped: {root / PYTHON_SCRIPT} is missing",
        "fix": None,
        "items": [],
    }

    # as install-hooks lays it without a client (a package built without a compiler)
    (root / SCRIPT).write_bytes(python_script)
    found = _doctor(run_cli, root)
    assert found["hotplug-client"]["status"] == "info"
    assert "no hotplug client is laid" in found["hotplug-client"]["message"]
    assert found["script-import"]["status"] == "ok"
    assert found["block-script"]["status"] == "ok"


def _server_check(monkeypatch: pytest.MonkeyPatch, path: Path, client: bool = True) -> dict[str, Any]:
    monkeypatch.setenv(warm.SOCKET_ENV, str(path))
    monkeypatch.setattr(installcheck, "is_client", lambda _path: client)
    return installcheck.check_hotplug_server("/").to_json()


def test_hotplug_server_answers_or_is_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connected and closed with nothing sent; a missing or refused socket is a warning (VM starts
    still work, in process), not an error, and only `info` where no client would ask."""
    path = tmp_path / "hotplug.sock"
    missing = _server_check(monkeypatch, path)
    assert missing["status"] == "warning"
    assert missing["message"].startswith(f"hotplug server not running ({path}: No such file or directory)")
    assert missing["message"].endswith("VM starts use the in-process path (slower)")
    assert missing["fix"] == "systemctl enable --now xenblockctl-hotplug.service"
    assert _server_check(monkeypatch, path, client=False)["status"] == "info"

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))  # bound, not listening: a dead server's socket
        refused = _server_check(monkeypatch, path)
        assert refused["status"] == "warning"
        assert "Connection refused" in refused["message"]

        listener.listen(1)
        up = _server_check(monkeypatch, path)
        assert up["status"] == "ok", up
        assert up["message"] == f"the hotplug server answers on {path}: VM starts go through it"
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(4096) == b"", "doctor sent something: a request would run a worker"
        assert _server_check(monkeypatch, path, client=False)["status"] == "info"
        listener.accept()[0].close()


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
