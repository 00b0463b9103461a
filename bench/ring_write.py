"""Writes through the blkif data plane (local transport) on a loop device, the write path on and off
the ring thread in the same run.

    sudo .venv/bin/python -m bench.ring_write [--seconds 3] [--size-mib 64] [--workers 4]

Buffered writes to a block device have no RWF_NOWAIT (EOPNOTSUPP), so io.Executor cannot learn
whether a WRITE would block. Rows, per workload (1 MiB sequential writes at QD 4, 4 KiB random
writes at QD 32, and 128 KiB sequential at QD 8: what blkfront sent for a 1 MiB dd on
the Xen lane), all with persistent grants and N I/O workers:

- `direct pwritev (1 thread)`: a plain pwritev loop on the loop device: the floor.
- `engine, writes on the pool`: the behaviour before "write path inline": every WRITE handed to
  an I/O worker (the baseline; run by making no write count as page-aligned).
- `engine, aligned writes inline`: today's Executor: whole-page WRITEs run on the ring thread.

The frontend shares the engine's interpreter (as in ring_throughput without --frontend-process).
The written data stays in the page cache (no flush in the timed part); each engine row ends with a
write read back from the device to check the bytes landed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.ring_throughput import Workload, _frontend_pages, _offsets, _params
from xenblockctl.backend import blkif, io
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.transport.local import LocalTransport

WRITES = [
    Workload("1 MiB sequential write, QD 4", 1 << 20, 4, sequential=True),
    # the shape Linux blkfront sent on the Xen lane (a 1 MiB dd split into 128 KiB requests)
    Workload("128 KiB sequential write, QD 8", 128 << 10, 8, sequential=True),
    Workload("4 KiB random write, QD 32", 4096, 32),
]


def direct(fd: int, w: Workload, size: int, seconds: float) -> float:
    buf = os.urandom(w.block)
    offsets = _offsets(w, size)
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        os.pwritev(fd, [buf], offsets[n % len(offsets)])
        n += 1
    return n / (time.perf_counter() - start)


def engine(
    transport: LocalTransport, target: DeviceTarget, w: Workload, workers: int, seconds: float
) -> float:
    data = os.urandom(w.block)
    offsets = _offsets(w, target.size_bytes)
    with LocalFrontend(
        transport.socket_path,
        1,
        ring_page_order=1,
        data_pages=_frontend_pages(w),
        indirect_pages=w.qd,
        persistent=True,
    ) as fe:
        dp = DataPlane(transport, 1, _params(fe.xenstore_nodes()), target, target.limits(), workers=workers)
        dp.start()
        try:
            submitted = completed = 0
            for _ in range(w.qd):
                fe.submit_write(offsets[submitted] // 512, data)
                submitted += 1
            start = time.perf_counter()
            end = start + seconds
            while True:
                done = fe.collect(1, timeout=30, gather=False)
                for c in done.values():
                    if c.response.status != blkif.RSP_OKAY:
                        raise SystemExit(f"write failed: {c.response}")
                completed += len(done)
                if time.perf_counter() >= end:
                    break
                for _ in done:
                    fe.submit_write(offsets[submitted % len(offsets)] // 512, data)
                    submitted += 1
            rate = completed / (time.perf_counter() - start)
            while fe.outstanding:
                fe.collect(1, timeout=30, gather=False)
            check = os.urandom(w.block)
            if fe.write(offsets[0] // 512, check) != blkif.RSP_OKAY:
                raise SystemExit("check write failed")
            if os.preadv(target.fd, [got := bytearray(w.block)], offsets[0]) != w.block or got != check:
                raise SystemExit("the device does not hold what the engine wrote")
        finally:
            dp.stop()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    from xenblockctl.kernel import loop

    with tempfile.TemporaryDirectory(prefix="xbc-bench-") as tmp:
        image = Path(tmp, "disk.img")
        size = args.size_mib << 20
        with open(image, "wb") as f:
            f.truncate(size)
        dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:bench-ring-write")
        transport = LocalTransport(str(Path(tmp, "grants.sock")), data_pages="table")
        try:
            target = DeviceTarget.from_block_device(dev)
            print(
                f"{args.size_mib} MiB loop device, persistent grants, {args.workers} workers, "
                f"{args.seconds:.0f} s per row, load average {os.getloadavg()[0]:.1f}"
            )
            real_page = io._HOST_PAGE
            for w in WRITES:
                base = direct(dev.fd, w, size, args.seconds)
                print(f"\n{w.name}")
                mib = base * w.block / 2**20
                print(f"  {'direct pwritev (1 thread)':<34} {base:>8.0f} IOPS {mib:>8.1f} MiB/s")
                for label, page in (
                    ("engine, writes on the pool", 1 << 62),
                    ("engine, aligned writes inline", real_page),
                ):
                    # the baseline: no write counts as whole pages, so every one goes to the pool
                    setattr(io, "_HOST_PAGE", page)  # noqa: B010 (a Final, rebound for the baseline)
                    try:
                        rate = engine(transport, target, w, args.workers, args.seconds)
                    finally:
                        setattr(io, "_HOST_PAGE", real_page)  # noqa: B010
                    print(
                        f"  {label:<34} {rate:>8.0f} IOPS {rate * w.block / 2**20:>8.1f} MiB/s"
                        f"   ratio {rate / base:.3f}"
                    )
        finally:
            transport.close()
            dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
