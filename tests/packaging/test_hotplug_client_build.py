"""setup.py's build of the hotplug client (hotplug/block-xenblockctl.c -> xenblockctl/libexec/):
optional like the C extensions. Built into a temporary directory, never into the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROGRAM = "xenblockctl/libexec/block-xenblockctl"


def _build(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    lib = tmp_path / "lib"
    argv = [
        sys.executable,
        "setup.py",
        "build_ext",
        "--build-lib",
        str(lib),
        "--build-temp",
        str(tmp_path / "t"),
    ]
    ran = subprocess.run(
        argv,
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return ran, lib


def test_setup_builds_the_client_into_the_package(tmp_path: Path) -> None:
    ran, lib = _build(tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    client = lib / PROGRAM
    assert client.read_bytes()[:4] == b"\x7fELF"
    assert os.access(client, os.X_OK)
    assert "hotplug client" not in ran.stderr, ran.stderr


def test_setup_without_a_compiler_says_so_and_goes_on(tmp_path: Path) -> None:
    """No compiler: the build succeeds without the client (install-hooks then lays the Python
    script at the script path) and says why, as it does for the extensions."""
    ran, lib = _build(tmp_path, CC="/nonexistent/cc")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert not (lib / PROGRAM).exists()
    said = ran.stdout + ran.stderr
    assert f"building the hotplug client {PROGRAM} failed" in said, said
    assert "the Python block script is laid at the script path instead" in said
