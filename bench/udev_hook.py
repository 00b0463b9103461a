"""The udev hook's cost per event (issue 18 round 11), against another checkout's, same xenstored.

    sudo .venv/bin/python -m bench.udev_hook [--runs 30] [--python /usr/bin/python3] [--baseline OLD]
        [--backends 0]
        # OLD: another checkout, e.g. `git worktree add --detach /tmp/base main`

The hook (hotplug/xenblockctl-udev) runs on every block event (a loop or dm device changing, any
disk going away) and every vbd backend's. Each contestant is laid as `install-hooks` lays it for
`--python`: this checkout's with `-S` and the checkout appended to its path; a baseline whose shim
lacks the `where the package is` lines as its install-hooks laid it (`#!<python>`, site.py), run
in place so that it finds its checkout. Events, fresh processes, alternating contestants so load changes hit
all alike (2 warm-up rounds; wall and CPU of the child, p50):
  * `block change`: a loop device that is not there, as for a detach's change event of a device no
    vbd uses: sysfs is read, xenstored connected, the backends walked (`--backends` of them, none
    using the device), nothing written;
  * `backend add, hooks off`: the default (`[udev] enabled` false; the config file missing);
and the bare interpreter (`python -S -c pass`, `python -c pass`) for reference. Needs root only
for the C xenstored's private run directory (tests/fixtures/cxenstored.py)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.common import percentile, run_once
from tests.fixtures.cxenstored import find_tools, start_cxenstored
from xenblockctl import config
from xenblockctl.toolstack import hostfiles
from xenblockctl.xenstore.client import XenStore

ROOT = Path(__file__).resolve().parents[1]


def laid_hook(work: Path, python: str, checkout: Path, name: str) -> list[str]:
    """How to run `checkout`'s hook as its install-hooks lays it (see the module docstring)."""
    shim = checkout / "hotplug" / hostfiles.HOOK_NAME
    where = hostfiles.local_layout()._replace(python=python, packages=str(checkout))
    try:
        text = hostfiles.udev_hook(shim.read_text(), where)
    except hostfiles.InstallError:
        # a shim without the where-lines, which install-hooks laid with its #! only: run in place
        # by `python`, it finds its checkout as the laid copy found the installed package
        return [python, str(shim)]
    laid = work / name
    laid.write_text(text)
    laid.chmod(0o755)
    return [str(laid)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument(
        "--backends", type=int, default=0, help="vbd backends in the store (none uses the device)"
    )
    args = parser.parse_args()

    daemon = start_cxenstored(find_tools())
    try:
        with tempfile.TemporaryDirectory(prefix="bench-udev-") as tmp:
            work = Path(tmp)
            with XenStore.connect(str(daemon.socket)) as store:
                home = store.home()
                store.write_many(
                    {
                        f"{home}/backend/vbd/{1 + i // 4}/{51712 + 16 * (i % 4)}/physical-device": "fe:0"
                        for i in range(args.backends)
                    }
                )
            hooks = {"ours": laid_hook(work, args.python, ROOT, "ours")}
            if args.baseline is not None:
                hooks["baseline"] = laid_hook(work, args.python, args.baseline.resolve(), "baseline")
            base_env = {"PATH": "/usr/bin:/bin", "XENSTORED_PATH": str(daemon.socket)}
            events = {
                "block change": (
                    "block",
                    {**base_env, "SUBSYSTEM": "block", "ACTION": "change", "MAJOR": "7", "MINOR": "1048000"},
                ),
                "backend add, hooks off": (
                    "backend",
                    {
                        **base_env,
                        "SUBSYSTEM": "xen-backend",
                        "ACTION": "add",
                        "XENBUS_PATH": "backend/vbd/1/51712",
                        config.PATH_ENV: str(work / "missing.conf"),
                    },
                ),
            }
            argvs: dict[str, tuple[list[str], dict[str, str]]] = {
                "python -S -c pass": ([args.python, "-S", "-c", "pass"], base_env),
                "python -c pass": ([args.python, "-c", "pass"], base_env),
            }
            for event, (what, env) in events.items():
                for label, hook in hooks.items():
                    argvs[f"{event}: {label}"] = ([*hook, what], env)
            samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in argvs}
            for i in range(args.runs + 2):
                for key, (argv, env) in argvs.items():
                    wall, cpu = run_once(argv, env, Path("/"))
                    if i >= 2:
                        samples[key][0].append(wall)
                        samples[key][1].append(cpu)
            print(
                f"udev hook, {args.runs} runs, {args.python}, {args.backends} backends, "
                f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
            )
            print(f"{'':<40} {'wall p50':>10} {'CPU p50':>10} {'CPU p90':>10}")
            for key, (walls, cpus) in samples.items():
                print(
                    f"{key:<40} {percentile(walls, 50) / 1e3:>8.2f}ms {percentile(cpus, 50) / 1e3:>8.2f}ms "
                    f"{percentile(cpus, 90) / 1e3:>8.2f}ms"
                )
            if "baseline" in hooks:
                for event in events:
                    ours = percentile(samples[f"{event}: ours"][1], 50)
                    base = percentile(samples[f"{event}: baseline"][1], 50)
                    print(
                        f"{event}: CPU p50 ours / baseline {ours / base:.2f}x ({(ours - base) / 1e3:+.2f} ms)"
                    )
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
