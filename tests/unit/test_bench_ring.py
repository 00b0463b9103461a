"""The data-plane benchmarks still run against the current engine (they reach into it: a quick smoke run
each, so an API change breaks a test here rather than the next person's measurement)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xenblockctl.backend import fastpath

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_ring_cpu_runs_both_modes() -> None:
    out = _run("bench.ring_cpu", "--rounds", "6", "--only", "1,2")
    assert "4 KiB random read" in out
    assert "frontend" in out
    assert "64 KiB random read" in out
    assert out.count("per-request") == 2  # each workload
    passes = 2 if fastpath.available() else 1  # python, and native where it is built
    assert out.count("persistent ") == 2 * passes  # each workload, on each ring pass
    assert out.count("persistent  python") == 2
    assert out.count("persistent  native") == 2 * (passes - 1)
    assert "grant maps" in out
    out = _run("bench.ring_cpu", "--rounds", "6", "--only", "3", "--engine-only")
    assert "1 MiB sequential read" in out
    assert "frontend" not in out


def test_ring_throughput_runs_in_a_child_frontend() -> None:
    out = _run(
        "bench.ring_throughput",
        "--seconds",
        "0.2",
        "--size-mib",
        "8",
        "--only",
        "1",
        "--workers",
        "0,2",
        "--frontend-process",
    )
    passes = 2 if fastpath.available() else 1
    assert out.count("ratio") == 2 * (1 + passes)  # 2 worker counts x (per-request, persistent x passes)
    assert "engine, 2 workers, persistent, python" in out
    assert ("engine, 2 workers, persistent, native" in out) is fastpath.available()
    assert "engine, inline I/O, per-request" in out


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_ring_write_runs_both_write_paths() -> None:
    out = _run("bench.ring_write", "--seconds", "0.2", "--size-mib", "8")
    passes = 2 if fastpath.available() else 1
    assert out.count("pwritev loop, O_DIRECT") == out.count("pwritev loop, buffered") == 3
    assert out.count(", buffered writes") == out.count(", O_DIRECT inline") == 3 * passes
    assert out.count("engine (python), O_DIRECT on the pool") == 3
    assert "not used" not in out  # the native rows ran on the native pass
