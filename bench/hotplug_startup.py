"""Start-up cost of the hotplug entry point (paid on every VM start), against the bare interpreter.

    .venv/bin/python -m bench.hotplug_startup [--runs 30]

Rows (fresh processes, same interpreter and flags): `python -c pass`; importing everything `add`
needs; then the slowest imports of one run (python -X importtime), to show where the time goes."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.common import percentile, row

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = (
    "import xenblockctl.blockscript.hotplug, xenblockctl.blockscript.add, xenblockctl.blockscript.remove"
)


def timed(argv: list[str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs + 3):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
        samples.append((time.perf_counter() - start) * 1e6)
    return samples[3:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    py = sys.executable
    bare = timed([py, "-c", "pass"], args.runs)
    ours = timed([py, "-c", IMPORTS], args.runs)
    count = subprocess.run(
        [py, "-c", IMPORTS + "; import sys; print(len(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"hotplug start-up, {args.runs} fresh processes each")
    print(row("python -c pass", bare))
    print(row("python -c 'import <hotplug add/remove path>'", ours))
    extra_ms = (percentile(ours, 50) - percentile(bare, 50)) / 1e3
    print(f"import cost over the bare interpreter (p50): {extra_ms:.1f} ms, {count} modules in sys.modules")
    trace = subprocess.run(
        [py, "-X", "importtime", "-c", IMPORTS], cwd=ROOT, capture_output=True, text=True, check=True
    ).stderr
    rows = []
    for line in trace.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        rows.append((int(cumulative), int(self_us), name))
    print("slowest top-level imports (cumulative us, self us):")
    for cumulative, self_us, name in sorted(rows, reverse=True)[:12]:
        print(f"  {cumulative:>8} {self_us:>8}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
