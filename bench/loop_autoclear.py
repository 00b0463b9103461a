"""What turning AUTOCLEAR off costs on the kernel-blkback path, and what moving it off that path costs.

    sudo .venv/bin/python -m bench.loop_autoclear [--iterations 40]

Rows, each on a fresh 16 MiB loop device held open by a second fd (as blkback holds it):
LOOP_CONFIGURE with AUTOCLEAR (the attach itself, for scale); LOOP_SET_STATUS64 clearing AUTOCLEAR
(what `add` does after a kernel-blkback hand-off: the kernel freezes the queue, i.e. waits for an
RCU grace period); the same ioctl on a device nobody did I/O on; and `os.fork()` (the parent's side) of
this process after importing the hotplug path (the price of doing the ioctl in a detached child
instead, bench/README.md "kernel-blkback path").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench.common import percentile, row
from xenblockctl.kernel import loop


def _attach(image: str) -> loop.LoopDevice:
    return loop.attach_file(image, read_only=False, tag="xenblockctl:bench-autoclear")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices)", file=sys.stderr)
        return 2
    # fork cost with the hotplug graph loaded, as the script would fork
    import xenblockctl.blockscript.add
    import xenblockctl.blockscript.remove  # noqa: F401

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    configure: list[float] = []
    clear_after_io: list[float] = []
    clear_idle: list[float] = []
    fork: list[float] = []
    with tempfile.TemporaryDirectory(prefix="xbc-autoclear-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        for i in range(args.iterations + 2):
            for idle, samples in ((False, clear_after_io), (True, clear_idle)):
                start = time.perf_counter()
                device = _attach(image)
                attach_us = (time.perf_counter() - start) * 1e6
                holder = os.open(f"/dev/loop{device.number}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if not idle:
                        os.pread(holder, 4096, 0)
                    start = time.perf_counter()
                    device.set_autoclear(False)
                    elapsed = (time.perf_counter() - start) * 1e6
                    device.set_autoclear(True)  # so the last close below detaches it
                finally:
                    device.close()
                    os.close(holder)
                if i >= 2:
                    samples.append(elapsed)
                    if idle:
                        configure.append(attach_us)
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            forked = (time.perf_counter() - start) * 1e6  # the parent's cost: it exits right after
            os.waitpid(pid, 0)
            if i >= 2:
                fork.append(forked)
    print(row("attach (open + LOOP_CONFIGURE, AUTOCLEAR)", configure))
    print(row("LOOP_SET_STATUS64 AUTOCLEAR off, after I/O", clear_after_io))
    print(row("LOOP_SET_STATUS64 AUTOCLEAR off, no I/O yet", clear_idle))
    print(row("fork(), parent side (hotplug graph imported)", fork))
    ratio = percentile(clear_after_io, 50) / percentile(fork, 50)
    print(f"ratio SET_STATUS64 / fork (p50): {ratio:.1f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
