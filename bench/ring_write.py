"""Writes through the blkif data plane (local transport) on a loop device: buffered against O_DIRECT
(issue 20), the engine against plain pwritev loops, in the same run.

    sudo .venv/bin/python -m bench.ring_write [--seconds 3] [--size-mib 256] [--workers 4]

A buffered pwritev on a loop device copies into the device's own page cache, and the kernel later
writes those pages back through the loop driver, which copies them again into the backing file's
cache; kernel blkback submits bios (the loop driver's copy only). So the timed unit here is a
*pass*: every block of the workload written once, then a FLUSH (fsync for the plain loops), as a
guest's `dd conv=fsync` does; passes repeat for `--seconds`. A buffered run that never flushes
only measures a memcpy into dirty pages and leaves the second copy to after the clock stops.

Rows, per workload (1 MiB sequential writes at QD 4, 128 KiB sequential at QD 8 — what blkfront
sent for a 1 MiB dd on the Xen lane — and 4 KiB random writes at QD 32), all with persistent
grants and N I/O workers; MiB/s, and the whole host's busy CPU (from /proc/stat: the loop
driver's worker and the writeback threads count) per GiB written:

- `pwritev loop, buffered`: one thread, pwritev on the loop device's fd, fsync per pass.
- `pwritev loop, O_DIRECT`: the same on an O_DIRECT fd (a bio per call, as blkback submits; one
  at a time).
- `engine, buffered writes`: buffered on the loop device (io.DirectWriter off): the engine's
  default before issue 20's loop-file change, and `backend --no-loop-file`.
- `engine, on the backing file`: buffered on the loop's verified backing file (backend/loopfile.py,
  the default since helper file20): one copy, as the loop driver's for blkback.
- `engine, O_DIRECT inline`: `backend --direct-writes` (writes on the ring thread's O_DIRECT fd).
- `engine, O_DIRECT on the pool`: direct writes handed to the workers unless alone on the ring.

Each engine row runs on the pure-Python ring pass and, where built, the native one. The frontend
shares the engine's interpreter (as in ring_throughput without --frontend-process). Each engine
row ends with a write read back from the device to check the bytes landed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.ring_throughput import Workload, _frontend_pages, _offsets, _params
from xenblockctl.backend import blkif, fastpath, io
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.loopfile import on_backing_file
from xenblockctl.backend.transport.local import LocalTransport

WRITES = [
    Workload("1 MiB sequential write, QD 4", 1 << 20, 4, sequential=True),
    # the shape Linux blkfront sent on the Xen lane (a 1 MiB dd split into 128 KiB requests)
    Workload("128 KiB sequential write, QD 8", 128 << 10, 8, sequential=True),
    Workload("4 KiB random write, QD 32", 4096, 32),
]
#: 4 KiB random passes write this much (a whole device's worth of 4 KiB writes takes too long)
RANDOM_PASS = 16 << 20


def _busy() -> float:
    """Seconds of busy CPU over all CPUs so far (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _pass_offsets(w: Workload, size: int) -> list[int]:
    if w.sequential:
        return list(range(0, size, w.block))
    return _offsets(w, size)[: RANDOM_PASS // w.block]


class Result:
    def __init__(self, nbytes: int, seconds: float, cpu: float) -> None:
        self.mibps = nbytes / 2**20 / seconds
        self.cpu_per_gib = cpu / (nbytes / 2**30)


def plain(fd: int, w: Workload, size: int, seconds: float) -> Result:
    """One thread: each pass pwritev()s every offset once, then fsync."""
    buf = memoryview(bytearray(os.urandom(w.block)))
    if w.block % 4096 == 0:
        import mmap  # an O_DIRECT buffer must be aligned: an anonymous mapping is

        m = mmap.mmap(-1, w.block)
        m.write(buf)
        buf = memoryview(m)
    offsets = _pass_offsets(w, size)
    os.fsync(fd)
    written = 0
    cpu0, start = _busy(), time.perf_counter()
    while True:
        for off in offsets:
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        written += len(offsets) * w.block
        if time.perf_counter() - start >= seconds:
            break
    return Result(written, time.perf_counter() - start, _busy() - cpu0)


def engine(
    transport: LocalTransport,
    target: DeviceTarget,
    w: Workload,
    workers: int,
    seconds: float,
    *,
    native: bool,
) -> tuple[Result, bool]:
    """Passes through the ring: every offset once at the workload's queue depth, then a FLUSH.
    The result and whether the native pass served requests."""
    data = os.urandom(w.block)
    offsets = _pass_offsets(w, target.size_bytes)
    with LocalFrontend(
        transport.socket_path,
        1,
        ring_page_order=1,
        data_pages=_frontend_pages(w),
        indirect_pages=w.qd,
        persistent=True,
    ) as fe:
        dp = DataPlane(
            transport,
            1,
            _params(fe.xenstore_nodes()),
            target,
            target.limits(),
            workers=workers,
            native=native,
        )
        dp.start()
        try:
            fe.flush(timeout=60)
            written = 0
            cpu0, start = _busy(), time.perf_counter()
            while True:
                submitted = completed = 0
                while completed < len(offsets):
                    while submitted < len(offsets) and submitted - completed < w.qd:
                        fe.submit_write(offsets[submitted] // 512, data)
                        submitted += 1
                    done = fe.collect(1, timeout=60, gather=False)
                    for c in done.values():
                        if c.response.status != blkif.RSP_OKAY:
                            raise SystemExit(f"write failed: {c.response}")
                    completed += len(done)
                if fe.flush(timeout=60) != blkif.RSP_OKAY:
                    raise SystemExit("flush failed")
                written += len(offsets) * w.block
                if time.perf_counter() - start >= seconds:
                    break
            result = Result(written, time.perf_counter() - start, _busy() - cpu0)
            check = os.urandom(w.block)
            if fe.write(offsets[0] // 512, check) != blkif.RSP_OKAY:
                raise SystemExit("check write failed")
            if os.preadv(target.fd, [got := bytearray(w.block)], offsets[0]) != w.block or got != check:
                raise SystemExit("the device does not hold what the engine wrote")
            fast = dp._fast is not None and dp._fast.served > 0
        finally:
            dp.stop()
    return result, fast


@contextmanager
def _mode(mode: str) -> Iterator[None]:
    """Run an engine row with writes buffered (DirectWriter never opened); O_DIRECT inline and on
    the pool are the target's own setting (direct_writes_on_pool)."""
    real_open = io.DirectWriter.open
    if mode == "buffered":
        setattr(io.DirectWriter, "open", classmethod(lambda cls, target, name: None))  # noqa: B010
    try:
        yield
    finally:
        setattr(io.DirectWriter, "open", real_open)  # noqa: B010


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--only", default="", help="workload numbers to run, e.g. 1,3 (default: all)")
    args = ap.parse_args()
    from xenblockctl.kernel import loop

    passes = ["python", "native"] if fastpath.available() else ["python"]
    chosen = [WRITES[int(i) - 1] for i in args.only.split(",")] if args.only else WRITES
    with tempfile.TemporaryDirectory(prefix="xbc-bench-") as tmp:
        image = Path(tmp, "disk.img")
        size = args.size_mib << 20
        with open(image, "wb") as f:
            # written once first: the first pass must not pay for the backing file's block allocation
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        dev = loop.attach_file(str(image), read_only=False, tag="xenblockctl:bench-ring-write")
        transport = LocalTransport(str(Path(tmp, "grants.sock")), data_pages="table")
        dfd = os.open(f"/proc/self/fd/{dev.fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        file_target = None
        try:
            target = DeviceTarget.from_block_device(dev)
            file_target = on_backing_file(dev, target)
            print(
                f"{args.size_mib} MiB loop device (buffered backing file), persistent grants,"
                f" {args.workers} workers, passes of writes + flush for {args.seconds:.0f} s per row,"
                f" load average {os.getloadavg()[0]:.1f}"
            )
            for w in chosen:
                print(f"\n{w.name}")
                base = plain(dev.fd, w, size, args.seconds)
                rows = [
                    ("pwritev loop, buffered", base),
                    ("pwritev loop, O_DIRECT", plain(dfd, w, size, args.seconds)),
                ]
                for label, result in rows:
                    print(
                        f"  {label:<40} {result.mibps:>8.0f} MiB/s  {result.cpu_per_gib:>6.2f} CPU s/GiB"
                        f"   ratio {result.mibps / base.mibps:.2f}"
                    )
                for mode in ("buffered", "file", "inline", "pool"):
                    for ring_pass in passes:
                        if mode == "pool" and ring_pass == "native":
                            continue  # the native pass stops at every pool write: Python's row
                        row_target = (
                            file_target
                            if mode == "file"
                            else dataclasses.replace(target, direct_writes_on_pool=mode == "pool")
                        )
                        with _mode(mode):
                            result, fast = engine(
                                transport,
                                row_target,
                                w,
                                args.workers,
                                args.seconds,
                                native=ring_pass == "native",
                            )
                        label = {
                            "buffered": "buffered writes",
                            "file": "on the backing file",
                            "inline": "O_DIRECT inline",
                            "pool": "O_DIRECT on the pool",
                        }[mode]
                        used = "" if fast or ring_pass == "python" else ": not used"
                        label = f"engine ({ring_pass}{used}), {label}"
                        print(
                            f"  {label:<40} {result.mibps:>8.0f} MiB/s  {result.cpu_per_gib:>6.2f} CPU s/GiB"
                            f"   ratio {result.mibps / base.mibps:.2f}"
                        )
        finally:
            if file_target is not None:
                os.close(file_target.fd)
            os.close(dfd)
            transport.close()
            dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
