"""What `remove` pays to find a vbd's loop devices by tag when its owner record is gone (issue 18,
session 23): kernel/loop.bound_loops_tagged against bound_loops filtered to the same exact tag,
in one process, on the same bound devices.

    .venv/bin/python -m bench.loop_scan [--bound 32,128] [--scans 41]

Root, real loop devices: `--bound` read-only devices on 1 MiB sparse files in a temporary
directory under /var/tmp, each tagged for another vbd (`xenblockctl:9:<devid>`); one scan of
each kind per round, alternating, looking for the first device's tag (one match). Every device
and file is released at the end, also on failure. The host's unbound loop minors count too (every
minor is looked at): printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from xenblockctl.kernel import loop


def one(bound: int, scans: int) -> str:
    work = tempfile.mkdtemp(prefix="loop-scan-", dir="/var/tmp")
    devices: list[loop.LoopDevice] = []
    try:
        for i in range(bound):
            path = os.path.join(work, f"d{i}.img")
            with open(path, "wb") as f:
                f.truncate(1 << 20)
            devices.append(loop.attach_file(path, read_only=True, tag=f"xenblockctl:9:{51712 + 16 * i}"))
        want = "xenblockctl:9:51712"
        full: list[float] = []
        tagged: list[float] = []
        for _ in range(scans):
            t = time.perf_counter()
            a = [b for b in loop.bound_loops(tag_prefix=want) if b.status.tag == want]
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = list(loop.bound_loops_tagged(want))
            tagged.append(time.perf_counter() - t)
            if a != b or len(a) != 1:
                raise SystemExit(f"the scans disagree: {a} vs {b}")
        minors = sum(1 for n in os.listdir(loop.SYS_VIRTUAL_BLOCK) if n.startswith("loop"))
        return (
            f"{bound:4d} bound, {minors} minors: bound_loops + exact filter p50 "
            f"{statistics.median(full) * 1e3:.2f} ms, bound_loops_tagged p50 "
            f"{statistics.median(tagged) * 1e3:.2f} ms, load {os.getloadavg()[0]:.1f}"
        )
    finally:
        for device in devices:
            device.close()  # AUTOCLEAR: the last close detaches
        for name in os.listdir(work):
            os.unlink(os.path.join(work, name))
        os.rmdir(work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bound", default="32,128", help="bound devices, comma-separated rows")
    parser.add_argument("--scans", type=int, default=41, help="scans of each kind a row")
    args = parser.parse_args()
    for bound in (int(n) for n in args.bound.split(",")):
        print(one(bound, args.scans), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
