"""The floor under ring_throughput's large reads: direct preadv into the shapes the engine reads into.

    .venv/bin/python -m bench.preadv_shapes [--seconds 1] [--rounds 3] [--size-mib 64] [--only 2,3]

ring_throughput's `ratio` is against one thread reading into one warm buffer with one iovec. The
engine reads each request into that request's grant pages: on the local transport with the batch
frontend a request's pages are neighbours in the memfd (the native pass merges them into one
iovec), but a Linux blkfront's persistent pool hands out pages in any order, so on Xen a 1 MiB
request is 256 one-page iovecs over scattered pages. This measures plain `os.preadv` loops, one
thread, page cache warm, same offsets as ring_throughput, into:

- `1 buffer, 1 iovec`: ring_throughput's direct row (the issue's "direct preadv");
- `QD buffers, 1 iovec each`: ring_throughput's footprint row, and the local engine's shape;
- `QD buffers, an iovec per page`: the same memory cut into page iovecs (neighbours);
- `pool pages in random order, an iovec per page`: QD x pages pages of a memfd, shuffled, each
  request the next `pages` of them: what a blkfront's pool gives on Xen.

The rows alternate within each round (`--rounds`), so the load other processes put on the machine
falls on all of them alike; CPU µs per request (thread time) is the figure that load moves least.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.ring_throughput import PAGE, WORKLOADS, Workload, _offsets, scattered_pages


def _shapes(w: Workload) -> tuple[list[tuple[str, Callable[[int], list[memoryview]]]], Callable[[], None]]:
    """(name, request index -> its iovecs) per shape, and what releases their memory."""
    pages = w.block // PAGE
    fd = os.memfd_create("preadv-shapes", os.MFD_CLOEXEC)
    total = (1 + 2 * w.qd) * w.block
    os.ftruncate(fd, total)
    area = mmap.mmap(fd, total)
    os.close(fd)
    area.write(b"\1" * total)  # every page faulted in before timing
    view = memoryview(area)
    one = [view[: w.block]]
    base = w.block
    per_buffer = [[view[base + i * w.block : base + (i + 1) * w.block]] for i in range(w.qd)]
    per_page = [[b[0][p * PAGE : (p + 1) * PAGE] for p in range(pages)] for b in per_buffer]
    pool_at = base + w.qd * w.block
    pool = scattered_pages(view[pool_at:], w.qd, pages)
    shapes: list[tuple[str, Callable[[int], list[memoryview]]]] = [
        ("1 buffer, 1 iovec", lambda i: one),
        (f"{w.qd} buffers, 1 iovec each", lambda i: per_buffer[i % w.qd]),
        (f"{w.qd} buffers, an iovec per page ({pages})", lambda i: per_page[i % w.qd]),
        (f"pool pages in random order, {pages} iovecs", lambda i: pool[i % w.qd]),
    ]

    def close() -> None:
        for group in (one, *per_buffer, *per_page, *pool):
            for v in group:
                v.release()
        view.release()
        area.close()

    return shapes, close


def _run(
    fd: int, offsets: list[int], iovecs: Callable[[int], list[memoryview]], seconds: float
) -> tuple[int, float, float]:
    """(requests, wall s, thread CPU s) of a preadv loop for `seconds`."""
    n = 0
    cpu0, start = time.thread_time(), time.perf_counter()
    end = start + seconds
    count = len(offsets)
    while True:
        for _ in range(64):
            os.preadv(fd, iovecs(n), offsets[n % count])
            n += 1
        if time.perf_counter() >= end:
            break
    return n, time.perf_counter() - start, time.thread_time() - cpu0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="per shape and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--only", default="2,3", help="ring_throughput workload numbers (default: 64 KiB, 1 MiB)")
    args = ap.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="xbc-bench-") as tmp:
        image = Path(tmp, "disk.img")
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = bytearray(1 << 20)
            for off in range(0, size, 1 << 20):
                os.preadv(fd, [buf], off)
            load = os.getloadavg()[0]
            print(
                f"{args.size_mib} MiB file, page cache warm, 1 thread, {args.rounds} rounds x"
                f" {args.seconds} s per shape, load average {load:.1f}"
            )
            for w in [WORKLOADS[int(i) - 1] for i in args.only.split(",")]:
                shapes, close = _shapes(w)
                offsets = _offsets(w, size)
                got: dict[str, list[tuple[int, float, float]]] = {name: [] for name, _ in shapes}
                try:
                    for r in range(args.rounds):
                        for name, iovecs in shapes if r % 2 == 0 else shapes[::-1]:
                            got[name].append(_run(fd, offsets, iovecs, args.seconds))
                finally:
                    close()
                print(f"\n{w.name}")
                first = None
                for name, runs in got.items():
                    rates = [n / wall for n, wall, _ in runs]
                    cpus = [cpu / n * 1e6 for n, _, cpu in runs]
                    mean = sum(n for n, _, _ in runs) / sum(wall for _, wall, _ in runs)
                    first = first or mean
                    gib = w.block / 2**30
                    print(
                        f"  {name:<40} {mean * gib:6.2f} GiB/s"
                        f" ({min(rates) * gib:.2f}-{max(rates) * gib:.2f})  to 1 buffer {mean / first:.3f}"
                        f"  CPU/request {min(cpus):.1f}-{max(cpus):.1f} µs"
                    )
        finally:
            os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
