"""What one TAB costs: the bash completion function runs `xenblockctl` with _XENBLOCKCTL_COMPLETE set,
a fresh process each time, against the interpreter alone and click's own import in the same run.

    .venv/bin/python -m bench.cli_completion [--runs 30]

An embedded xenstored (subprocess) holds domains 0 and 5 (named) and two vbds of 5. Rows, run
alternately so load changes hit every row alike (wall time of the child):
  * `python -c pass` and `python -c 'import click'`: the floor any click program pays;
  * completing a command name (`xenblockctl de<TAB>`): the group only;
  * a domain (`attach g<TAB>`): plus the command module, the xenstore client and one connection;
  * a vdev (`detach guest5 <TAB>`): plus three directory listings;
  * a file name (`attach guest5 /tm<TAB>`): click answers `file`, bash lists the files."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import percentile, row, run_once

ROOT = Path(__file__).resolve().parents[1]
LINES = {
    "command name (de<TAB>)": ("xenblockctl de", 1),
    "domain (attach g<TAB>)": ("xenblockctl attach g", 2),
    "vdev (detach guest5 <TAB>)": ("xenblockctl detach guest5 ", 3),
    "file name (attach guest5 /tm<TAB>)": ("xenblockctl attach guest5 /tm", 3),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    py = sys.executable
    script = str(Path(py).with_name("xenblockctl"))
    with tempfile.TemporaryDirectory(prefix="xbc-bench-tab-") as work:
        sock = f"{work}/xenstored.sock"
        daemon = subprocess.Popen(
            [py, "-m", "xenblockctl", "xenstored", "--socket", sock, "--exit-with-parent"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert daemon.stdout is not None
            assert daemon.stdout.readline().startswith("xenstored ready")
            env = {**os.environ, "XENSTORED_PATH": sock}
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            setup = (
                "from xenblockctl.xenstore.client import XenStore\n"
                "from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd\n"
                "from xenblockctl.xenstore.vdev import Vdev\n"
                f"s = XenStore.connect({sock!r})\n"
                "s.write('/local/domain/0/name', 'Domain-0'); s.write('/local/domain/5/name', 'guest5')\n"
                "for v in ('xvda', 'xvdb'): write_vbd(s, DiskSpec(5, Vdev.parse(v), '/srv/' + v, 'w'))\n"
            )
            subprocess.run([py, "-c", setup], cwd=ROOT, env=env, check=True)
            cases: dict[str, tuple[list[str], dict[str, str]]] = {
                "python -c pass": ([py, "-c", "pass"], env),
                "python -c 'import click'": ([py, "-c", "import click"], env),
            }
            for name, (words, cword) in LINES.items():
                tab = {**env, "_XENBLOCKCTL_COMPLETE": "bash_complete", "COMP_WORDS": words}
                cases[name] = ([script], {**tab, "COMP_CWORD": str(cword)})
            samples: dict[str, list[float]] = {name: [] for name in cases}
            cpus: dict[str, list[float]] = {name: [] for name in cases}
            for i in range(args.runs + 3):
                for name, (argv, case_env) in cases.items():
                    wall, cpu = run_once(argv, case_env, ROOT)
                    if i >= 3:  # the first runs write bytecode caches
                        samples[name].append(wall)
                        cpus[name].append(cpu)
        finally:
            daemon.terminate()
            daemon.wait(30)
            if daemon.stdout is not None:
                daemon.stdout.close()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"TAB completion, {args.runs} fresh processes each, load average {load}")
    for name, values in samples.items():
        print(row(name, values))
        print(row("  CPU (user+sys)", cpus[name]))
    floor = percentile(samples["python -c 'import click'"], 50)
    cpu_floor = percentile(cpus["python -c 'import click'"], 50)
    for name in LINES:
        print(
            f"{name}: p50 = {percentile(samples[name], 50) / floor:.2f} x click's import (wall), "
            f"{percentile(cpus[name], 50) / cpu_floor:.2f} x (CPU)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
