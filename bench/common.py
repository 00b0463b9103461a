"""Shared helpers for benchmarks: percentiles, a fixed table format, and a process's CPU."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def measure(fn: Callable[[], object], iterations: int, warmup: int = 5) -> list[float]:
    """Wall time of each call in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def row(name: str, samples: list[float]) -> str:
    return (
        f"{name:<44} p50 {percentile(samples, 50):>10.1f} us   p90 {percentile(samples, 90):>10.1f} us"
        f"   mean {statistics.fmean(samples):>10.1f} us"
    )


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys) time of one child process, in µs: on a loaded machine the CPU time
    is what the run itself costs, the wall time what it cost this time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True)
    wall = (time.perf_counter() - start) * 1e6
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e6


def process_cpu(pid: int) -> float:
    """CPU seconds (user + sys, every thread) a live process has used so far, from
    /proc/<pid>/stat; OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # the command name may hold ')' or spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
