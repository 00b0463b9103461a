"""Where one `block-xenblockctl add` (and `remove`) spends its time, phase by phase.

    sudo .venv/bin/python -m bench.blockscript_add_breakdown [--runs 10] [--python /path/to/python3]
        [--checkout OTHER]   # another checkout (e.g. `git archive OLD xenblockctl | tar -x -C OTHER`)

Runs the add as libxl does (fresh process, libxl's environment, an engine-like consumer thread in
this process standing in for the backend that opens the device), but through a child that does
what that checkout's hotplug/block-xenblockctl does around main() (now: GC off, os._exit after
flushing; older shims: GC on, interpreter teardown), with monotonic time stamps in between and the
xenstore client's request method wrapped to count round trips (a batch is one).
Phases (p50 over the runs, ms):

  spawn+interpreter+site   fork/exec in the parent until the child's first statement
  imports                  everything `add` and `remove` import (what main() would import lazily)
  connect                  XenStore.connect (socket + reader thread)
  run_add                  the whole flow, of which: xenstore round trips (count, time), the
                           sharing check (bound loop scan), the loop attach, the hand-off wait
  exit                     from main()'s return until the parent has reaped the child

The clock is CLOCK_MONOTONIC, shared by parent and child."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import percentile
from tests.fixtures.libxl import Libxl
from tests.fixtures.xenstore import _start

ROOT = Path(__file__).resolve().parents[1]

#: The child: the shim's steps, instrumented. argv: action, checkout, GC off (0/1), os._exit (0/1).
CHILD = r"""
import time
T0 = time.monotonic()
import gc, json, os, sys
if sys.argv[3] == "1":
    gc.disable()
sys.dont_write_bytecode = False
sys.path.insert(0, sys.argv[2])
from xenblockctl.blockscript import hotplug, add, remove, handoff, sharing
from xenblockctl.kernel import loop
from xenblockctl.xenstore import client
T1 = time.monotonic()
phases = {}
trips = [0, 0.0, 0]

def timed(owner, name, label):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            phases[label] = phases.get(label, 0.0) + time.monotonic() - start
    setattr(owner, name, wrapper)

if hasattr(client.XenStore, "_send_many"):
    original_send_many = client.XenStore._send_many
    def send_many(self, requests, tx_id):
        start = time.monotonic()
        try:
            return original_send_many(self, requests, tx_id)
        finally:
            trips[0] += 1
            trips[1] += time.monotonic() - start
            trips[2] += len(requests)
    client.XenStore._send_many = send_many
else:  # a checkout from before batching: one request per round trip
    original_send = client.XenStore._send
    def send(self, op, payload, tx_id, what):
        start = time.monotonic()
        try:
            return original_send(self, op, payload, tx_id, what)
        finally:
            trips[0] += 1
            trips[1] += time.monotonic() - start
            trips[2] += 1
    client.XenStore._send = send
timed(client.XenStore, "connect", "connect")
timed(add, "run_add", "run_add")
timed(remove, "run_remove", "run_remove")
timed(sharing, "check", "sharing")
timed(loop, "attach_fd", "attach")
timed(handoff, "wait_for_consumer", "handoff")
status = hotplug.main([sys.argv[0], sys.argv[1]])
T2 = time.monotonic()
record = {"t0": T0, "imports": T1 - T0, "t2": T2, "trips": trips[0], "trip_time": trips[1],
          "requests": trips[2], **phases}
print("BREAKDOWN " + json.dumps(record), file=sys.stderr)
sys.stdout.flush()
sys.stderr.flush()
if sys.argv[4] == "1":
    os._exit(status)
sys.exit(status)
"""


def run_child(python: str, checkout: Path, action: str, env: dict[str, str]) -> dict[str, float]:
    # Do what that checkout's shim does around main() (older shims kept the GC and tore down).
    shim = (checkout / "hotplug" / "block-xenblockctl").read_text()
    gc_off, fast_exit = ("gc.disable()" in shim), ("os._exit(" in shim)
    spawn = time.monotonic()
    result = subprocess.run(
        [python, "-c", CHILD, action, str(checkout), str(int(gc_off)), str(int(fast_exit))],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    reaped = time.monotonic()
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("BREAKDOWN "))
    record: dict[str, float] = json.loads(line.removeprefix("BREAKDOWN "))
    record["spawn+interpreter+site"] = record.pop("t0") - spawn
    record["exit"] = reaped - record.pop("t2")
    record["total"] = reaped - spawn
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose block script runs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    daemon = _start()
    work = Path(tempfile.mkdtemp(prefix="xbc-breakdown-"))
    libxl = Libxl(daemon.info, work)
    adds: list[dict[str, float]] = []
    removes: list[dict[str, float]] = []
    try:
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        for i in range(args.runs + 2):
            be = libxl.create_backend(5, 51712 + 16 * i, str(image), "w")
            consumer = libxl.engine_consumer(be)
            added = run_child(args.python, args.checkout, "add", libxl.env("add", be))
            consumer.wait_opened()
            consumer.release()
            libxl.store.write(be.node("state"), "6")
            removed = run_child(args.python, args.checkout, "remove", libxl.env("remove", be))
            libxl.store.rm(be.path)
            if i >= 2:
                adds.append(added)
                removes.append(removed)
    finally:
        libxl.close()
        problems = daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        if problems:
            print("xenstored:", problems, file=sys.stderr)
    load = " ".join(f"{a:.2f}->{b:.2f}" for a, b in zip(load_before, os.getloadavg(), strict=True))
    print(
        f"block script breakdown, {args.runs} runs, checkout {args.checkout}, python {args.python}, "
        f"load average {load}"
    )
    for action, records in (("add", adds), ("remove", removes)):
        print(f"{action}: p50 ms (p90)")
        keys = ["total", "spawn+interpreter+site", "imports", "connect", f"run_{action}"]
        keys += ["trip_time", "sharing", "attach", "handoff", "exit"]
        for key in keys:
            values = [r.get(key, 0.0) * 1e3 for r in records]
            if not any(values):
                continue
            extra = ""
            if key == "trip_time":
                trips = percentile([r["trips"] for r in records], 50)
                requests = percentile([r["requests"] for r in records], 50)
                extra = f"   ({trips:.0f} round trips carrying {requests:.0f} requests)"
            label = "  xenstore round trips" if key == "trip_time" else f"  {key}"
            print(f"{label:<26} {percentile(values, 50):7.1f} ({percentile(values, 90):6.1f}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
