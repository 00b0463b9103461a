"""Shared helpers for benchmarks: percentiles and a fixed table format."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
