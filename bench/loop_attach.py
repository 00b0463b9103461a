"""Loop attach + identity + detach, in process, against the raw ioctls in the same run.

    sudo .venv/bin/python -m bench.loop_attach [--iterations 200]

Rows: the raw path (GET_FREE + open + LOOP_CONFIGURE + close, no checks) is the floor; our
attach_file adds opening the file, verification (LOOP_GET_STATUS64), identity ioctls and the
bounded retry. `losetup` (util-linux, what Xen's bash script runs) is shown when installed."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

from bench.common import measure, percentile, row
from xenblockctl.kernel import loop
from xenblockctl.kernel.loop_abi import LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LoopConfig, LoopFlags, LoopInfo64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="xbc-bench-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        tag = loop.make_tag("bench", os.getpid())

        def ours() -> None:
            with loop.attach_file(image, read_only=False, tag=tag) as dev:
                assert dev.identity.diskseq > 0

        backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        ctl = os.open(loop.LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        raw_config = LoopConfig(
            fd=backing, block_size=512, info=LoopInfo64(lo_flags=int(LoopFlags.AUTOCLEAR))
        ).pack()
        configure_only: list[float] = []

        def raw() -> None:
            import time

            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            fd = os.open(f"/dev/loop{n}", os.O_RDWR | os.O_CLOEXEC)
            start = time.perf_counter()
            fcntl.ioctl(fd, LOOP_CONFIGURE, raw_config)
            configure_only.append((time.perf_counter() - start) * 1e6)
            os.close(fd)

        ours_samples = measure(ours, args.iterations)
        raw_samples = measure(raw, args.iterations)
        configure_only[:] = configure_only[-args.iterations :]
        os.close(ctl)
        os.close(backing)
        print(f"loop attach benchmark, {args.iterations} iterations, 64 MiB sparse image in {tmp}")
        print(row("LOOP_CONFIGURE ioctl alone", configure_only))
        print(row("raw: GET_FREE+open+CONFIGURE+close", raw_samples))
        print(row("xenblockctl attach+identity+detach", ours_samples))
        ratio = percentile(ours_samples, 50) / percentile(raw_samples, 50)
        print(f"ratio ours/raw (p50): {ratio:.2f}x")
        losetup = shutil.which("losetup")
        if losetup:
            n = max(20, args.iterations // 10)

            def util_linux() -> None:
                dev = subprocess.run(
                    [losetup, "--find", "--show", image], check=True, capture_output=True, text=True
                ).stdout.strip()
                subprocess.run([losetup, "-d", dev], check=True)

            lo_samples = measure(util_linux, n, warmup=2)
            print(row(f"losetup --find --show + losetup -d ({n}x)", lo_samples))
            print(
                f"ratio losetup/ours (p50): {percentile(lo_samples, 50) / percentile(ours_samples, 50):.1f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
