"""Linters as tests (as mkosi does): a ruff or mypy finding fails the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: What ruff checks and formats (mypy's list is pyproject's [tool.mypy] `files`): the package, its tests
#: and its benchmarks hold to one standard.
RUFF_PATHS = ("xenblockctl", "tests", "bench")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_check() -> None:
    result = _run(sys.executable, "-m", "ruff", "check", "--no-cache", *RUFF_PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_stable() -> None:
    result = _run(sys.executable, "-m", "ruff", "format", "--check", "--no-cache", *RUFF_PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    """The package, its tests and its benchmarks: pyproject's [tool.mypy] `files` says which."""
    result = _run(sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir=/dev/null")
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_parse() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    for script in [ROOT / "dev", ROOT / ".ci" / "run", *sorted((ROOT / "hotplug").glob("*"))]:
        if script.is_file() and script.read_text().startswith("#!/usr/bin/env bash"):
            result = _run(bash, "-n", str(script))
            assert result.returncode == 0, f"{script}: {result.stderr}"


def test_numbers_are_parsed_in_one_place() -> None:
    """str.isdigit() accepts '²' and '٣' (and int() then raises or misreads them): a guest's node
    value once killed the engine that way. Numbers from outside go through xenstore/numbers.py."""
    allowed = ROOT / "xenblockctl" / "xenstore" / "numbers.py"
    offenders = [
        f"{path.relative_to(ROOT)}:{lineno}"
        for path in sorted((ROOT / "xenblockctl").rglob("*.py"))
        if path != allowed
        for lineno, line in enumerate(path.read_text().splitlines(), 1)
        if ".isdigit()" in line or ".isdecimal()" in line or ".isnumeric()" in line
    ]
    assert not offenders, f"parse numbers with xenblockctl.xenstore.numbers, not str.isdigit(): {offenders}"
