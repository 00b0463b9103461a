"""Placing grant pages without an fd per mapping, against CPython's mmap.mmap(fd) in the same run.

    .venv/bin/python -m bench.grant_placement [--iterations 5000]

On real Xen the data plane maps a request's pages (per request, or once per page with persistent
grants) with gntdev. The gntdev ioctls and the hypercalls are not here (no Xen); what is measured is
the part that changed (issue 13): `mmap.mmap(fd, ...)` (one mmap, plus the dup() of the fd CPython
makes for every mapping object) against transport/fixedmap.Reservation (an anonymous reservation
and a MAP_FIXED placement over it, under the process-wide placement lock), each followed by its
munmap. A memfd stands in for /dev/xen/gntdev. Rows for 1 page (a persistent grant) and 11 pages
(a whole non-indirect request)."""

from __future__ import annotations

import argparse
import mmap
import os

from bench.common import measure, percentile, row
from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.transport.fixedmap import Reservation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=5000)
    args = parser.parse_args()
    fd = os.memfd_create("bench-gntdev", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * PAGE_SIZE)
    try:
        for pages in (1, 11):

            def old(pages: int = pages) -> None:
                m = mmap.mmap(fd, pages * PAGE_SIZE, mmap.MAP_SHARED, offset=8 * PAGE_SIZE)
                m[0] = 1
                m.close()

            def new(pages: int = pages) -> None:
                res = Reservation(pages)
                res.place(0, fd, 8 * PAGE_SIZE, pages, writable=True)
                assert res.map is not None
                res.map[0] = 1
                res.close()

            base = measure(old, args.iterations)
            ours = measure(new, args.iterations)
            print(row(f"mmap.mmap(fd) {pages:2d} page(s) + close (baseline)", base))
            print(row(f"Reservation + place {pages:2d} page(s) + close", ours))
            print(f"  ratio p50 {percentile(ours, 50) / percentile(base, 50):.2f}x")
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
