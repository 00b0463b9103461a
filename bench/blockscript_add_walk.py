"""The block script's own CPU in the block-device sharing walk (issue 18: 128 existing backends).

    sudo .venv/bin/python -m bench.blockscript_add_walk [--backends 128] [--walks 500] [--fresh 30]
        [--checkout OTHER ...]   # e.g. `git archive main xenblockctl | tar -x -C OTHER`

`sharing.backend_claims` for a device nobody publishes, over the synchronous link, against Debian's
C xenstored without its trace file holding `--backends` one-disk guests. Per checkout, interleaved
so that load hits each alike (thread CPU, ms):

  warm     one process, `--walks` walks after 20 unmeasured: min and p50 per walk, user and
           system time per walk (getrusage), voluntary context switches per walk
  fresh    `--fresh` fresh processes (/usr/bin/python3, GC off as the laid script runs), each
           timing its first walk only, as an add does: p50 and min; `lanes first` opens the
           spread connections before the clock starts (what their connects cost)
  no I/O   the client's logic alone: the same walk over a link that answers from a dict in this
           process (its own answering is included, ~0.15-0.2 ms of it)

The daemon's CPU is not ours to cut and is not shown (bench.blockscript_add shows it per add)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.fixtures.cxenstored import find_tools, start_cxenstored

ROOT = Path(__file__).resolve().parents[1]
OWN = "backend/vbd/7/51712"  # the add's own backend (the walk skips it)

#: Run in the checkout measured (cwd), so that its xenblockctl is the one imported.
_CHILD = r"""
import gc, json, os, resource, sys, time
gc.disable()
sys.path.insert(0, os.getcwd())
from xenblockctl.blockscript import sharing
from xenblockctl.xenstore import wire
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.link import Link

socket_path, mode, backends, walks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
devt = os.makedev(7, 77)  # a device nobody publishes: every backend is read, none matches


class Answering(Link):
    # Answers from dicts shaped like the daemon's store: level by level (Link's default stream).
    def __init__(self, home):
        base = f"{home}/backend/vbd"
        self.dirs = {base: [str(200 + i) for i in range(backends)] + ["7"], f"{base}/7": ["51712"]}
        self.values = {}
        for i in range(backends):
            self.dirs[f"{base}/{200 + i}"] = ["51712"]
            self.values[f"{base}/{200 + i}/51712/physical-device"] = f"fd:{i:x}"

    def exchange(self, requests, deadline):
        replies = []
        for op, req_id, _tx, payload in requests:
            path = payload[:-1].decode()
            if op == wire.DIRECTORY and path in self.dirs:
                body = b"".join(name.encode() + b"\0" for name in self.dirs[path])
            elif op == wire.READ and path in self.values:
                body = self.values[path].encode()
            else:
                op, body = wire.ERROR, b"ENOENT\0"
            replies.append(wire.Frame(op, req_id, 0, body))
        return replies

    @property
    def closed(self):
        return False

    def close(self, timeout=0.0):
        pass


if mode == "noio":
    home = "/local/domain/0"
    store = XenStore(Answering(home), None, 10.0, 0)
else:
    store = XenStore.connect(socket_path, timeout=10, synchronous=True)
    home = store.home()
    if mode == "lanes":
        store._link._open_lanes()


def walk():
    return list(sharing.backend_claims(store, home, f"{home}/backend/vbd/7/51712", devt=devt))


out = {}
if mode == "warm":
    for _ in range(20):
        walk()
    cpu = []
    r0 = resource.getrusage(resource.RUSAGE_THREAD)
    for _ in range(walks):
        t0 = time.thread_time()
        walk()
        cpu.append(time.thread_time() - t0)
    r1 = resource.getrusage(resource.RUSAGE_THREAD)
    out = {
        "cpu": cpu,
        "user": (r1.ru_utime - r0.ru_utime) / walks,
        "system": (r1.ru_stime - r0.ru_stime) / walks,
        "nvcsw": (r1.ru_nvcsw - r0.ru_nvcsw) / walks,
    }
else:
    t0 = time.thread_time()
    walk()
    out = {"cpu": [time.thread_time() - t0]}
print(json.dumps(out))
"""


def populate(socket_path: str, backends: int) -> None:
    from xenblockctl.xenstore.client import XenStore

    with XenStore.connect(socket_path, timeout=10, synchronous=True) as store:
        home = store.home()
        nodes = {f"{home}/{OWN}/params": "/dev/loop77"}
        for i in range(backends):
            be = f"{home}/backend/vbd/{200 + i}/51712"
            nodes[f"{be}/physical-device"] = f"fd:{i:x}"
            nodes[f"{be}/params"] = f"/srv/existing-{i}.img"
            nodes[f"{be}/hotplug-status"] = "connected"
        store.write_many(nodes)


def child(checkout: Path, socket_path: str, mode: str, backends: int, walks: int) -> dict[str, object]:
    done = subprocess.run(
        ["/usr/bin/python3", "-c", _CHILD, socket_path, mode, str(backends), str(walks)],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", type=int, default=128)
    parser.add_argument("--walks", type=int, default=500, help="walks in the warm process")
    parser.add_argument("--fresh", type=int, default=30, help="fresh processes per fresh mode")
    parser.add_argument(
        "--checkout", type=Path, action="append", default=[], help="another checkout to compare"
    )
    args = parser.parse_args()
    checkouts = [ROOT, *args.checkout]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    daemon = start_cxenstored(find_tools(), trace=False)
    try:
        socket_path = str(daemon.socket)
        populate(socket_path, args.backends)
        for checkout in checkouts:  # warm: one process each, one after the other, twice
            for _ in range(2):
                warm = child(checkout, socket_path, "warm", args.backends, args.walks)
                cpu = warm["cpu"]
                assert isinstance(cpu, list)
                low, mid = ms(cpu, 0), ms(cpu, 0.5)
                print(
                    f"{checkout}: warm walk of {args.backends}: CPU min {low:.3f} p50 {mid:.3f} ms; "
                    f"user {float(warm['user']) * 1e3:.3f} system {float(warm['system']) * 1e3:.3f} ms, "  # type: ignore[arg-type]
                    f"{float(warm['nvcsw']):.1f} sleeps per walk"  # type: ignore[arg-type]
                )
        fresh: dict[tuple[Path, str], list[float]] = {}
        started = time.monotonic()
        for _ in range(args.fresh):
            for checkout in checkouts:
                for mode in ("fresh", "lanes", "noio"):
                    cpu = child(checkout, socket_path, mode, args.backends, 1)["cpu"]
                    assert isinstance(cpu, list)
                    fresh.setdefault((checkout, mode), []).extend(cpu)
        labels = {"fresh": "fresh process", "lanes": "fresh, lanes first", "noio": "fresh, no I/O"}
        for (checkout, mode), cpu in fresh.items():
            mid, low = statistics.median(cpu) * 1e3, min(cpu) * 1e3
            print(f"{checkout}: {labels[mode]}: CPU p50 {mid:.3f} min {low:.3f} ms ({len(cpu)} processes)")
        print(f"fresh rows took {time.monotonic() - started:.0f} s")
    finally:
        daemon.stop()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
