"""The native persistent-grant loop's cost per request, the loop alone, and what another busy Python
thread of the engine's process does to it (issue 20, gil20).

    .venv/bin/python -m bench.loop_pass [--rounds 3000] [--only 1,2,3]

`_fastpass.loop()` (ring_loop.h with _fastpass.c's pass) is called on this thread, on a ring in our
own memory whose pages sit in a `_fastpass.Pages` as the grant cache's would, all indexed (a warm
cache). Each round re-publishes one captured pass of READ slots (4 KiB QD 32, 64 KiB QD 32 with
indirect descriptors, 1 MiB QD 4), and the loop takes, decodes, finds the pages, reads them from
the page cache, answers, pushes and notifies, then returns where it would sleep (a non-blocking
eventfd: EXIT_OSERROR, EAGAIN), taking the GIL there as the real loop does for its report before a
sleep. No frontend runs, nothing sleeps or wakes: what differs between two trees is the pass's own
work and the GIL turns it takes per pass.

Each workload runs twice: alone ("idle": the only Python thread), and with a second thread of this
process running Python the whole time ("busy"), as another ring's thread, a xenstore watch or a
worker's Python would. A loop that must take the GIL during a pass then waits for that thread to
give it up (CPython's switch interval, 5 ms by default, printed): per request the wall time shows
how often the pass waits, the loop's thread CPU what it does.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import tempfile
import threading
import time

from xenblockctl.backend import _fastpass, blkif
from xenblockctl.backend.ring import FrontRing

PAGE = 4096
#: (name, bytes a request, requests a pass)
WORKLOADS = [("4 KiB random read, QD 32", 4096, 32), ("64 KiB random read, QD 32", 65536, 32),
             ("1 MiB sequential read, QD 4", 1 << 20, 4)]  # fmt: skip
FILE_BYTES = 64 << 20


class Counts:
    requests = ok = wakeups = notifies = served = 0


def _pass_slots(
    abi: blkif.Abi, nbytes: int, qd: int, rnd: random.Random
) -> tuple[bytes, dict[int, memoryview]]:
    """One pass of READ slots (the ring's entries after put_request) and the page views they name
    (data pages scattered over one mapping, as a frontend's pool is)."""
    segs = nbytes // PAGE
    indirect = segs > blkif.MAX_SEGMENTS_PER_REQUEST
    npages = qd * segs + (qd if indirect else 0)
    memory = mmap.mmap(-1, npages * PAGE)
    view = memoryview(memory)
    order = list(range(npages))
    rnd.shuffle(order)
    pages = {1000 + g: view[at * PAGE : (at + 1) * PAGE] for g, at in enumerate(order)}
    ring = bytearray(PAGE)
    front = FrontRing(memoryview(ring), abi, 1)
    refs = iter(pages)
    sequential = nbytes >= 1 << 20
    for k in range(qd):
        sector = (k * nbytes if sequential else rnd.randrange(FILE_BYTES // nbytes) * nbytes) // 512
        data = [next(refs) for _ in range(segs)]
        if not indirect:
            segments = tuple(blkif.Segment(r, 0, 7) for r in data)
            front.put_request(blkif.SegmentRequest(blkif.OP_READ, segs, 0, k, sector, segments))
            continue
        desc = next(refs)
        raw = blkif.whole_page_descriptors(data)
        pages[desc][: len(raw)] = raw
        grefs = (desc,) + (0,) * (blkif.MAX_INDIRECT_PAGES_PER_REQUEST - 1)
        front.put_request(blkif.IndirectRequest(blkif.OP_READ, segs, k, sector, 0, grefs))
    return bytes(ring[64 : 64 + qd * abi.entry_size]), pages


def _run(fd: int, nbytes: int, qd: int, rounds: int, busy: bool) -> tuple[float, float]:
    """(wall µs, the loop thread's CPU µs) a request over `rounds` passes (after 50 of warm-up)."""
    abi = blkif.X86_64
    slots, views = _pass_slots(abi, nbytes, qd, random.Random(20))
    pages = _fastpass.Pages(views)
    ring = bytearray(PAGE)
    hdr = memoryview(ring).cast("I")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    peer = os.eventfd(0, os.EFD_NONBLOCK)
    counts = Counts()
    noted = [0]

    def note_used(refs: memoryview) -> None:
        noted[0] += len(refs)

    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin) if busy else None
    idx = 0
    size = 32
    try:
        if spinner is not None:
            spinner.start()
        t0 = c0 = 0.0
        for r in range(rounds + 50):
            if r == 50:
                t0, c0 = time.perf_counter(), time.thread_time()
            first = idx % size
            ring[64 + first * abi.entry_size : 64 + first * abi.entry_size + len(slots)] = slots
            hdr[0] = idx + qd  # req_prod
            got = _fastpass.loop(
                memoryview(ring), size, idx, idx, idx, False, 64, 1 << 30, bytearray(1), counts, counts,
                (2, efd, 0, peer, 0), abi.id_offset, FILE_BYTES // 512, FILE_BYTES, 512, False, 4096,
                fd, fd, _fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK, mmap.PAGESIZE, pages, note_used, 0,
            )  # fmt: skip
            if got[0] != _fastpass.EXIT_OSERROR or got[8] != qd:
                raise SystemExit(f"the loop did not serve the pass: {got[:5]} {got[6:]}")
            idx += qd
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    finally:
        stop.set()
        if spinner is not None:
            spinner.join()
        hdr.release()
        os.close(efd)
        os.close(peer)
    n = rounds * qd
    if noted[0] < n:
        raise SystemExit(f"note_used saw {noted[0]} refs for {n} requests")
    return wall / n * 1e6, cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--only", default="", help="comma-separated workload numbers (1-based; default: all)")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",") if x}
    print(
        f"{_fastpass.__file__}\nswitch interval {sys.getswitchinterval() * 1e3:.1f} ms, "
        f"load average {os.getloadavg()[0]:.1f}, {args.rounds} passes a row"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk")
        with open(path, "wb") as f:
            f.write(os.urandom(FILE_BYTES))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.pread(fd, FILE_BYTES, 0)  # into the page cache
            for i, (name, nbytes, qd) in enumerate(WORKLOADS, 1):
                if only and i not in only:
                    continue
                print(name)
                for busy in (False, True):
                    rounds = args.rounds if nbytes < 1 << 20 else max(1, args.rounds // 4)
                    wall, cpu = _run(fd, nbytes, qd, rounds if not busy else max(1, rounds // 10), busy)
                    label = "busy (another thread runs Python)" if busy else "idle (the only Python thread)"
                    print(f"  {label:36} wall {wall:8.2f} µs a request   loop thread CPU {cpu:7.2f} µs")
        finally:
            os.close(fd)


if __name__ == "__main__":
    main()
