"""CPU per request of the blkif data plane on one thread, with no sleeping or waking: stable under load.

    .venv/bin/python -m bench.ring_cpu [--rounds 300] [--engine-only] [--persistent off,on,copy] [--workers 0]
                                       [--native off,on] [--qd N]

Each round the LocalFrontend puts QD reads on the ring, one engine pass serves them on this thread
(inline I/O from the page cache) and the frontend collects the answers; thread CPU time of each side
is summed over the rounds (the first 20 are warm-up). Nothing waits for an event, so scheduler and
wake-up costs, which dominate ring_throughput's wall clock on a loaded or idle VM, are left out.

`--persistent off,on` (the default: both, one line each) runs the frontend without and with
feature-persistent; with it the data plane goes through its grant cache (backend/grantcache.py).
`--native off,on` (the default: both) runs each persistent line on the pure-Python pass and on the
native fast path (backend/fastpath.py; it applies to persistent grants only, so per-request lines
run once, in Python).

`--persistent copy`: no persistent grants, data pages grant-copied (Xen's path for GRUB and other
frontends without them; here the local transport simulates the copy in Python, see
transport/local.py), on the pure-Python path and on the native grant-copy pass
(backend/grantcopy.py's NativeCopy) per `--native`; the simulated copy is in both lines' engine
CPU (on Xen it is an ioctl and a hypercall; it is not timed apart because a thread clock read
costs ~3.7 µs on this VM, as much as what it would time). `--qd 1 --only 1` is GRUB's shape: one
4 KiB READ per pass.

`--engine-only` replaces the frontend with re-publishing one captured round of request slots, so
that an instruction count covers the engine alone. It also prints a `floor` line: the least a pure-
Python ring loop can do for the same slots on the same ring, file and pages (copy the batch, unpack
header and descriptor, bounds check, preadv into the page, pack the response, push: no validation,
no grant checks, no statistics, single-segment requests only); `engine / floor` is the engine's
per-request overhead as a ratio measured in the same run. callgrind counts are independent of load; take
the difference of two round counts to cancel start-up:

    valgrind --tool=callgrind .venv/bin/python -m bench.ring_cpu --engine-only --rounds 5
    valgrind --tool=callgrind .venv/bin/python -m bench.ring_cpu --engine-only --rounds 25
    # (Ir(25) - Ir(5)) / (20 * QD) instructions per request, QD as printed
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.ring_throughput import WORKLOADS, Workload, _data_plane, _offsets
from xenblockctl.backend import fastpath, grantcopy
from xenblockctl.backend.blkif import SEGMENT_STRUCT
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.transport.local import LocalTransport

_WARMUP = 20


def measure(
    transport: LocalTransport,
    target: DeviceTarget,
    w: Workload,
    rounds: int,
    engine_only: bool,
    *,
    persistent: bool = False,
    workers: int = 0,
    native: bool = False,
    index_pages: bool = True,
    copy: bool = False,
) -> None:
    pages = w.qd * max(1, w.block // 4096)
    with LocalFrontend(
        transport.socket_path,
        1,
        ring_page_order=1,
        data_pages=pages,
        indirect_pages=w.qd,
        persistent=persistent,
    ) as fe:
        fastpath.INDEX_PAGES = index_pages
        try:
            dp = _data_plane(transport, fe.xenstore_nodes(), target, workers=workers, native=native)
        finally:
            fastpath.INDEX_PAGES = True
        try:
            offsets = iter(_offsets(w, target.size_bytes) * (1 + rounds * w.qd // 20_000))
            ring = fe.ring
            entry = ring.abi.entry_size
            captured = b""
            if engine_only:
                # one round through the real frontend, then only its slot images are re-published
                for _ in range(w.qd):
                    fe.submit_read(next(offsets) // 512, w.block)
                captured = b"".join(ring.slot_bytes(ring.req_prod + i) for i in range(w.qd))
            engine = frontend = 0.0
            served = 0
            for r in range(rounds):
                c0 = time.thread_time()
                if engine_only:
                    start = (ring.req_prod_pvt - w.qd) & (ring.size - 1)  # QD divides the ring size
                    ring._entries[start * entry : (start + w.qd) * entry] = captured
                else:
                    for _ in range(w.qd):
                        fe.submit_read(next(offsets) // 512, w.block)
                ring.push_requests()
                c1 = time.thread_time()
                n = dp._serve_batch()  # what the ring thread does per pass, here on our thread
                c2 = time.thread_time()
                if engine_only:
                    ring.rsp_cons = ring.rsp_prod
                    ring.req_prod_pvt = (ring.req_prod_pvt + w.qd) & 0xFFFFFFFF
                else:
                    fe.collect(w.qd, gather=False)
                    fe.evtchn.ack()
                c3 = time.thread_time()
                if r >= min(_WARMUP, rounds // 2):
                    engine += c2 - c1
                    frontend += (c1 - c0) + (c3 - c2)
                    served += n
            floor_us = _floor(dp, fe, target, captured, w, rounds=rounds) if engine_only else None
            if dp.stats.ok != dp.stats.requests:
                raise SystemExit(f"engine answered errors: {dp.stats}")
            mode = ("persistent " if persistent else "grant copy " if copy else "per-request") + (
                " native" if native else " python"
            )
            if native and not index_pages:
                mode += " (dict lookup)"
            line = (
                f"  {w.name:<30} QD {w.qd:>2} {mode}: engine {engine / max(served, 1) * 1e6:7.2f} µs/request"
            )
            if floor_us is not None:
                per = engine / max(served, 1) * 1e6
                line += f", floor {floor_us:5.2f} µs/request, engine / floor {per / floor_us:.2f}"
            if not engine_only:
                line += f", frontend {frontend / max(served, 1) * 1e6:7.2f} µs/request"
            if dp.grant_cache is not None:
                line += f" (grant maps: {dp.grant_cache.stats.maps} for {dp.stats.requests} requests)"
            print(line)
        finally:
            dp.stop()


def _floor(
    dp: DataPlane, fe: LocalFrontend, target: DeviceTarget, captured: bytes, w: Workload, *, rounds: int
) -> float | None:
    """µs per request of the floor loop (module docstring) over the same captured slots."""
    if w.block != 4096 or dp._grants is None:
        return None  # the floor handles one whole-page segment per request
    abi = dp.params.abi
    ring = fe.ring
    back = dp.ring
    entry = abi.entry_size
    header = abi.segment_header
    seg_at = abi.segments_offset

    # the floor's "mapping": each page resolved once, before timing
    pages: dict[int, memoryview] = {}
    for i in range(0, len(captured), entry):
        gref = SEGMENT_STRUCT.unpack_from(captured, i + seg_at)[0]
        pages[gref] = dp._grants.iovecs([gref], None, writable=True)[0]
    pack = abi.response_struct.pack_into
    size = target.size_bytes
    fd = target.fd
    spent = 0.0
    served = 0
    for r in range(rounds):
        start = (ring.req_prod_pvt - w.qd) & (ring.size - 1)
        ring._entries[start * entry : (start + w.qd) * entry] = captured
        ring.push_requests()
        c1 = time.thread_time()
        data, n = back.take_slots(64)
        entries = back._entries
        pvt = back.rsp_prod_pvt
        mask = back.size - 1
        for off in range(0, n * entry, entry):
            op, _nr, _h, rid, sector = header.unpack_from(data, off)
            gref, _first, _last = SEGMENT_STRUCT.unpack_from(data, off + seg_at)
            if sector * 512 + 4096 > size:
                raise SystemExit("floor: out of bounds")
            os.preadv(fd, [pages[gref]], sector * 512)
            pack(entries, (pvt & mask) * entry, rid, op, 0)
            pvt = (pvt + 1) & 0xFFFFFFFF
        back.rsp_prod_pvt = pvt
        back.push_responses()
        c2 = time.thread_time()
        ring.rsp_cons = ring.rsp_prod
        ring.req_prod_pvt = (ring.req_prod_pvt + w.qd) & 0xFFFFFFFF
        if r >= min(_WARMUP, rounds // 2):
            spent += c2 - c1
            served += n
    for view in pages.values():
        view.release()
    return spent / max(served, 1) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--engine-only", action="store_true")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="I/O workers (0: execute() inline; the engine's default 4 tries RWF_NOWAIT inline first)",
    )
    ap.add_argument("--only", default="", help="comma-separated workload numbers (1-based; default: all)")
    ap.add_argument(
        "--persistent",
        default="off,on",
        help="grant modes: off (per-request), on (persistent), copy (per-request, grant-copied)",
    )
    ap.add_argument("--qd", type=int, default=0, help="queue depth for every workload (default: its own)")
    ap.add_argument(
        "--native",
        default="off,on",
        help="ring passes: off (pure Python), on (native fast path), dict (native, with the grant"
        " cache's pages looked up in its dict per page instead of its C index: the lookup before it)",
    )
    args = ap.parse_args()
    modes = args.persistent.split(",")
    if set(modes) - {"off", "on", "copy"}:
        ap.error(f"--persistent: off, on and/or copy, not {args.persistent}")
    natives = args.native.split(",")
    if set(natives) - {"off", "on", "dict"}:
        ap.error(f"--native: off, on and/or dict, not {args.native}")
    if not fastpath.available() and set(natives) - {"off"}:
        print(f"native lines skipped: {fastpath.describe(True)}")
        natives = ["off"]
    chosen = [WORKLOADS[int(i) - 1] for i in args.only.split(",")] if args.only else WORKLOADS
    if args.qd:
        chosen = [dataclasses.replace(w, name=w.name.split(", QD")[0], qd=args.qd) for w in chosen]
    with tempfile.TemporaryDirectory(prefix="xbc-bench-") as tmp:
        image = Path(tmp, "disk.img")
        with open(image, "wb") as f:
            for _ in range(16):
                f.write(os.urandom(1 << 20))
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        transport = LocalTransport(str(Path(tmp, "grants.sock")))
        copier = LocalTransport(str(Path(tmp, "copy.sock")), data_pages="copy")
        try:
            buf = bytearray(1 << 20)
            for off in range(0, 16 << 20, 1 << 20):  # page cache warm: inline reads never block
                os.preadv(fd, [buf], off)
            warmup = min(_WARMUP, args.rounds // 2)
            print(f"16 MiB file, page cache warm, one thread, {args.rounds} rounds ({warmup} warm-up)")
            for w in chosen:
                for grants in modes:
                    several = grants != "off"  # the per-request line runs once, in Python
                    for native in natives if several else natives[:1]:
                        if grants == "copy" and native == "dict":
                            continue
                        if grants == "copy" and native != "off" and not grantcopy.native_available():
                            print(f"native grant-copy line skipped: {grantcopy.describe(True)}")
                            continue
                        measure(
                            copier if grants == "copy" else transport,
                            DeviceTarget.from_fd(fd),
                            w,
                            args.rounds,
                            args.engine_only,
                            persistent=grants == "on",
                            workers=args.workers,
                            native=native != "off" and several,
                            index_pages=native != "dict",
                            copy=grants == "copy",
                        )
        finally:
            copier.close()
            transport.close()
            os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
