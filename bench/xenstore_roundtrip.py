"""xenblockctl's xenstore client against both daemons, side by side, plus its import cost.

    .venv/bin/python -m bench.xenstore_roundtrip [--iterations 1000]

Starts Debian's C xenstored (stubbed, via tests/fixtures/cxenstored.py; skipped with a reason if
unavailable; without --trace-file, as production runs it: a trace costs ~60 us a request) and the
embedded `xenblockctl xenstored`, in the same run, and times per daemon:

- READ round trip through XenStore (deadline-guarded) over each of its links (threaded: pyxs's
  reader thread; synchronous: one socket, no thread) and through plain pyxs 0.4.1 (baseline:
  what our guard and str layer cost on top of the library); 6 READs batched (one round trip);
- a transaction of 3 writes through XenStore (start + 3 WRITE + commit = 5 round trips), and the
  same through plain pyxs.

Then the import time of `xenblockctl.xenstore.client`: `-X importtime` cumulative microseconds,
and wall time of a `python -c 'import ...'` process against `python -c pass` (same run).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pyxs

from bench.common import measure, percentile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.cxenstored import Unavailable, find_tools, start_cxenstored  # noqa: E402
from tests.fixtures.xenstore import embedded_xenstored  # noqa: E402
from xenblockctl.xenstore.client import XenStore  # noqa: E402


@contextmanager
def embedded_daemon() -> Iterator[str]:
    with embedded_xenstored() as daemon:
        yield daemon.socket_path


@contextmanager
def c_daemon() -> Iterator[str]:
    daemon = start_cxenstored(find_tools(), trace=False)
    try:
        yield str(daemon.socket)
    finally:
        daemon.stop()


def bench_daemon(sock: str, iterations: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for link, synchronous in (("threaded link", False), ("synchronous link", True)):
        with XenStore.connect(sock, timeout=10, synchronous=synchronous) as store:
            store.write("/bench/node", "physical-device-value")

            def ours_tx(store: XenStore = store) -> None:
                with store.transaction() as tx:
                    tx.write("/bench/be/physical-device", "7:0")
                    tx.write("/bench/be/physical-device-path", "/dev/loop0")
                    tx.write("/bench/be/hotplug-status", "connected")

            def ours_batch(store: XenStore = store) -> None:
                store.read_many(["/bench/node"] * 6)

            results[f"read: XenStore, {link}"] = measure(
                lambda: store.read("/bench/node"), iterations, warmup=50
            )
            results[f"6 reads batched: XenStore, {link}"] = measure(ours_batch, iterations // 2, warmup=20)
            results[f"tx + 3 writes: XenStore, {link}"] = measure(ours_tx, iterations // 2, warmup=20)

    with pyxs.Client(unix_socket_path=sock) as client:

        def pyxs_tx() -> None:
            client.transaction()
            client.write(b"/bench/be/physical-device", b"7:0")
            client.write(b"/bench/be/physical-device-path", b"/dev/loop0")
            client.write(b"/bench/be/hotplug-status", b"connected")
            if not client.commit():
                raise RuntimeError("unexpected EAGAIN")

        results["read: plain pyxs (baseline)"] = measure(
            lambda: client.read(b"/bench/node"), iterations, warmup=50
        )
        results["tx + 3 writes: plain pyxs (baseline)"] = measure(pyxs_tx, iterations // 2, warmup=20)
    return results


def import_costs(runs: int) -> dict[str, list[float]]:
    """Microseconds: -X importtime cumulative for the module; wall time of whole processes."""
    module = "xenblockctl.xenstore.client"
    cumulative: list[float] = []
    pattern = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|\s+" + re.escape(module) + r"$", re.M)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=env,
        ).stderr
        match = pattern.search(out)
        assert match is not None, out[-500:]
        cumulative.append(float(match.group(1)))

    def wall(code: str) -> list[float]:
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            samples.append((time.perf_counter() - start) * 1e6)
        return samples

    return {
        f"-X importtime cumulative {module}": cumulative,
        "process: python -c pass (baseline)": wall("pass"),
        f"process: python -c 'import {module}'": wall(f"import {module}"),
    }


def fmt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--import-runs", type=int, default=20)
    args = parser.parse_args(argv)

    daemons: dict[str, Callable[[], AbstractContextManager[str]]] = {
        "C xenstored": c_daemon,
        "embedded": embedded_daemon,
    }
    columns: dict[str, dict[str, list[float]]] = {}
    with ExitStack() as stack:
        for name, factory in daemons.items():
            try:
                sock = stack.enter_context(factory())
            except Unavailable as exc:
                print(f"skipping {name}: {exc}")
                continue
            columns[name] = bench_daemon(sock, args.iterations)

    print(
        f"\nxenstore round trips ({args.iterations} reads, {args.iterations // 2} transactions per daemon)\n"
    )
    names = list(columns)
    header = f"{'operation':<48}" + "".join(f"{n + ' p50':>18}{n + ' p90':>18}" for n in names)
    print(header)
    print("-" * len(header))
    rows = next(iter(columns.values())).keys() if columns else []
    for op in rows:
        line = f"{op:<48}"
        for n in names:
            samples = columns[n][op]
            line += f"{fmt(percentile(samples, 50)):>18}{fmt(percentile(samples, 90)):>18}"
        print(line)

    print(f"\nimport cost ({args.import_runs} runs)\n")
    for label, samples in import_costs(args.import_runs).items():
        print(f"{label:<64} p50 {fmt(percentile(samples, 50)):>10}   p90 {fmt(percentile(samples, 90)):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
