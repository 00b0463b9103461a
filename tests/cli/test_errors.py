"""Error reporting: one line + hint on stderr, documented exit codes, tracebacks only with --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import CliRunner
from xenblockctl.cli import exitcodes
from xenblockctl.xenstore.client import XenStore

REPO = Path(__file__).resolve().parents[2]


def _lines(err: str) -> list[str]:
    return err.strip().splitlines()


def test_unknown_domain_is_not_found(run_cli: CliRunner, tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 4096)
    result = run_cli("attach", "nosuchguest", str(image))
    assert result.code == exitcodes.EXIT_NOT_FOUND
    assert _lines(result.err) == [
        "xenblockctl: domain-missing: no domain named 'nosuchguest'",
        "hint: list running domains with `xl list` (or `xenstore-ls /local/domain`)",
    ]


def test_missing_vbd_is_not_found(run_cli: CliRunner) -> None:
    for args in (("detach", "5", "xvdq"), ("show", "guest5", "51712")):
        result = run_cli(*args)
        assert result.code == exitcodes.EXIT_NOT_FOUND, result.err
        first, hint = _lines(result.err)
        assert first.startswith("xenblockctl: vbd-missing: domain 5 has no vbd")
        assert hint == "hint: see `xenblockctl list` for the attached devices"


def test_bad_target_is_refused_before_anything_is_written(run_cli: CliRunner) -> None:
    result = run_cli("attach", "5", "/srv/../etc/shadow")
    assert result.code == exitcodes.EXIT_ERROR
    assert _lines(result.err)[0].startswith("xenblockctl: bad-params: params must not contain . or ..")
    assert run_cli("list", "--json").json()["vbds"] == []


def test_bad_vdev_and_usage(run_cli: CliRunner) -> None:
    """A vdev outside xen-vbd-interface(7) is a bad command line: exit 2 like click's usage errors
    (it was 1, the status of errors found while working)."""
    for args in (("show", "5", "xvd"), ("detach", "guest5", "hda0"), ("attach", "5", "/x", "--vdev", "xvd")):
        result = run_cli(*args)
        assert result.code == exitcodes.EXIT_USAGE, (args, result.err)
        assert _lines(result.err)[0].startswith("xenblockctl: vdev-invalid:")
    usage = run_cli("attach", "5")
    assert usage.code == exitcodes.EXIT_USAGE
    assert "Missing argument 'TARGET'" in usage.err
    assert run_cli("attach", "5", "/x", "--mode", "rwx").code == exitcodes.EXIT_USAGE


def test_no_xenstored_gives_a_hint(run_cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENSTORED_PATH", f"/tmp/no-such-xenstored-{os.getpid()}")
    result = run_cli("list")
    assert result.code == exitcodes.EXIT_ERROR
    first, hint = _lines(result.err)
    assert first == (
        f"xenblockctl: xenstore-unavailable: cannot reach xenstored at socket:/tmp/no-such-xenstored-"
        f"{os.getpid()} nor at xenbus:/dev/xen/xenbus (ENOENT: No such file or directory)"
    ) or (
        # on a Xen host /dev/xen/xenbus exists and fails differently: each place says why
        first.startswith("xenblockctl: xenstore-unavailable: cannot reach xenstored (socket:")
        and "ENOENT: No such file or directory" in first
    )
    assert "(2, '" not in first  # pyxs's tuple repr
    assert "[Errno" not in first
    assert "ECONNREFUSED" not in first  # nothing refused a connection: nothing was there
    assert hint.startswith("hint: is xenstored running? set XENSTORED_PATH")


def test_traceback_only_with_debug(cli_env: dict[str, str]) -> None:
    env = {**os.environ, **cli_env, "XENSTORED_PATH": f"/tmp/no-such-xenstored-{os.getpid()}"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "xenblockctl", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    plain = run("list")
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 2
    debug = run("--debug", "list")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "XenstoreUnavailable" in debug.stderr


def test_exit_codes_are_documented() -> None:
    text = (REPO / "man" / "xenblockctl.1.md").read_text()
    section = text.split("# EXIT STATUS", 1)[1].split("\n# ", 1)[0]
    for name in dir(exitcodes):
        if name.startswith("EXIT_"):
            assert f"**{getattr(exitcodes, name)}**" in section, f"{name} is not in EXIT STATUS"


def stderr_on_tty_and_piped(argv: list[str], env: dict[str, str], exit_status: int) -> tuple[str, str]:
    """Run `argv` twice, stdout on a pseudo-terminal and then piped: the two stderr texts (bytes
    decoded: text mode would turn a progress line's \\r into \\n). Both runs must exit `exit_status`."""
    import pty

    def run(stdout: int) -> str:
        proc = subprocess.run(
            argv, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=60, check=False
        )
        assert proc.returncode == exit_status
        return proc.stderr.decode()

    main_fd, tty_fd = pty.openpty()
    try:
        on_tty = run(tty_fd)
    finally:
        os.close(main_fd)
        os.close(tty_fd)
    return on_tty, run(subprocess.PIPE)


def test_progress_only_when_stdout_is_a_terminal(cli_env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "p.img"
    image.write_bytes(b"\0" * 4096)
    argv = [sys.executable, "-m", "xenblockctl", "attach", "5", str(image), "--wait", "1"]
    on_tty, piped = stderr_on_tty_and_piped(argv, {**os.environ, **cli_env}, exitcodes.EXIT_ERROR)
    assert "\rwaiting for a backend: backend 1 (Initialising), frontend 1 (Initialising)" in on_tty
    assert "waiting for" not in piped
    assert piped.startswith("xenblockctl: no-backend:")


def test_detach_progress_only_on_a_terminal(cli_env: dict[str, str], cli_store: XenStore) -> None:
    """detach --wait shows where it is on a terminal and nothing when piped (a script reads stderr
    for the error line only)."""

    from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd
    from xenblockctl.xenstore.vdev import Vdev

    written = write_vbd(cli_store, DiskSpec(5, Vdev.parse("xvdb"), "/srv/b.img", "w"))
    cli_store.write(f"{written.location.backend}/state", "4")  # Connected, and nobody to close it
    argv = [sys.executable, "-m", "xenblockctl", "detach", "guest5", "xvdb", "--wait", "1"]
    # nobody serves it: it never reaches Closed
    on_tty, piped = stderr_on_tty_and_piped(argv, {**os.environ, **cli_env}, exitcodes.EXIT_BUSY)
    assert "\rwaiting for Closed: " in on_tty
    assert "waiting for" not in piped
    assert piped.startswith("xenblockctl: detach-stuck:")
