"""Random reads through the blkif data plane (local transport) against direct preadv, same run.

    .venv/bin/python -m bench.ring_throughput [--seconds 3] [--size-mib 64] [--loop] [--frontend-process]
        [--persistent off,on,copy,map] [--native off,on,dict] [--frontend batch,python] [--queues N] [--qd N]
        [--pin] [--busy-thread]

Rows, per workload (4 KiB random reads at queue depth 32, 64 KiB random reads at QD 32, sequential
1 MiB reads at QD 4):

- `direct preadv (1 thread, 1 buffer)`: one thread, preadv into one buffer at the same offsets: the
  floor, and what every `ratio` is against (the issue's "direct preadv").
- `direct preadv (1 thread, QD buffers)`: the same loop into QD buffers of the request size in
  turn, the memory the frontend's pages span (the engine copies into a different buffer per
  request; one buffer stays warm in the CPU's caches): the `(to QD buffers ...)` ratio.
- `direct preadv (1 thread, QDxP pages scattered)`: the same loop into QD x P 4 KiB pages (P =
  pages per request) of one mapping in a random order, an iovec per page: what the engine reads
  into on Xen, where a blkfront's persistent pool hands out granted pages in any order (each its
  own mapping: they cannot be merged), and so the fair floor of a ring whose data pages are 4 KiB
  grants: the `to scattered pages` ratio. (On the local transport the batch frontend's request
  pages are neighbours and the native pass merges them into one iovec: the QD-buffers shape.)
- `engine, N workers`: a frontend submits through the ring; the DataPlane validates, maps the
  grant pages and preadv's straight into them on N worker threads (0 = inline on the ring thread).
  `persistent` rows: the frontend negotiates feature-persistent and the data plane goes through its
  grant cache (backend/grantcache.py); `per-request` rows: it does not (on the local transport the
  data plane then slices the whole grant table, which is already mapped once, so the local
  transport cannot show what persistent grants save on Xen: the gntdev map/unmap per request).
  `per-request, grant copy` / `per-request, mapped` rows (`--persistent copy,map`): no persistent
  grants, the data pages copied (backend/grantcopy.py) or mapped per request: the Xen transport's
  two paths, on a transport whose copy is a memcpy and whose map is a slice (no hypercalls).

`--frontend`: `batch` (the default, bench/batch_frontend.py) prebuilds each workload's request slots
once and moves them in and out of the ring a batch at a time, answers checked with one compare and
the data against the file before and after the timing: its CPU per request (printed) is a fraction
of the engine's, as a kernel blkfront's is. `python` is LocalFrontend's submit_read/collect, ~3.5 µs
of Python per request, which bounded the ratios before (kept for comparison).

`--native off,on` (the default: both) runs each persistent row on the pure-Python ring pass
(`python`) and on the native fast path (`native`, backend/fastpath.py; `dict`: the same with the
page lookup this replaced, for an A/B in one run; it applies to persistent
grants only, so other rows run once, in Python).

`--pin` (with `--frontend-process`, one queue) puts this process — the engine and the direct loops
— on one CPU and the frontend process on another: an idle host's shape, where the frontend never
runs on the ring thread's CPU, so every turnaround between the two shows (bench/README.md, "4 KiB
at QD 32"). Unpinned, the scheduler often runs the woken frontend on the ring thread's CPU instead.
On a host shared with other work each pinned side also waits for its one CPU, so the rates are not
an idle host's (its "per wake-up" and "asleep" figures still show the turn-taking).

`--qd 1` runs every workload one request at a time, as GRUB's blkfront (pvgrub) does: the frontend
sleeps on its event until the answer comes, so each request also pays the ring thread's wake-up,
and the rows print the mean time a request. With `--persistent copy` the native grant-copy pass
(backend/grantcopy.py's NativeCopy) runs per `--native` as well: GRUB's path on Xen.

`--queues N` (N > 1) runs one workload (`--only`, default 4 KiB) on N queues of one disk instead,
each driven by its own batch-frontend process, served with the native pass in this process (threads
sharing one GIL) and in N worker processes (backend/workers.py, `xenblockctl backend --workers N`),
against N direct preadv loops at once on N threads and on N processes.

The file is filled with data and read once first, so both sides read from the page cache: the ratio
measures our per-request software cost, not the disk. With `--frontend-process` the frontend runs in
a child process (its own GIL), as a guest would; otherwise both sides share one interpreter.
`--loop` (root) puts a loop device over the file and uses it for both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.batch_frontend import BatchFrontend
from xenblockctl.backend import blkif, fastpath
from xenblockctl.backend.dataplane import DataPlane, RingParams
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.transport.local import LocalTransport
from xenblockctl.backend.workers import RemoteQueue, WorkerPool
from xenblockctl.journal import Journal


@dataclass(frozen=True)
class Workload:
    name: str
    block: int
    qd: int
    sequential: bool = False


WORKLOADS = [
    Workload("4 KiB random read, QD 32", 4096, 32),
    Workload("64 KiB random read, QD 32", 65536, 32),
    Workload("1 MiB sequential read, QD 4", 1 << 20, 4, sequential=True),
]


def _offsets(w: Workload, size: int, seed: int = 1) -> list[int]:
    slots = size // w.block
    if w.sequential:
        return [(i % slots) * w.block for i in range(20_000)]
    rnd = random.Random(seed)
    return [rnd.randrange(slots) * w.block for _ in range(20_000)]


#: the direct loops' destination shapes (`direct(shape=...)`): one buffer (the issue's baseline), QD
#: buffers in turn (the memory the frontend's pages span), and QD x pages scattered pages
ONE, QD_BUFFERS, SCATTERED = "1 buffer", "QD buffers", "scattered pages"
_SHAPES = (ONE, QD_BUFFERS, SCATTERED)
PAGE = 4096


def scattered_pages(view: memoryview, requests: int, pages: int, seed: int = 7) -> list[list[memoryview]]:
    """`requests` lists of `pages` one-page views of `view`, its pages in a random order: the
    shape a Linux blkfront's persistent pool gives the engine on Xen (it reuses granted pages in any
    order, each page its own mapping), so each request is `pages` iovecs over scattered pages."""
    order = list(range(requests * pages))
    random.Random(seed).shuffle(order)
    return [
        [view[k * PAGE : (k + 1) * PAGE] for k in order[i * pages : (i + 1) * pages]] for i in range(requests)
    ]


def direct(fd: int, w: Workload, size: int, seconds: float, *, shape: str = ONE) -> tuple[float, float]:
    """Requests per second of a plain preadv loop, and its CPU µs per request, into one buffer
    reused (warm in the CPU's caches: the issue's baseline), or QD buffers of `block` bytes in one
    mapping, request i into buffer i % QD (the memory the frontend's pages span, which the engine
    copies to; one iovec each, as the native pass merges a batch-frontend request's neighbouring
    pages), or QD x pages pages of one mapping in a random order, an iovec per page (the fair floor
    of a ring whose data pages are 4 KiB grants from a blkfront's pool: what the engine reads into
    on Xen, where it cannot merge them)."""
    n_buf = 1 if shape == ONE else w.qd
    area = mmap.mmap(-1, n_buf * w.block)
    area.write(b"\1" * (n_buf * w.block))  # every page faulted in before timing, as the engine's are
    view = memoryview(area)
    if shape == SCATTERED:
        iovecs = scattered_pages(view, w.qd, w.block // PAGE)
    else:
        iovecs = [[view[i * w.block : (i + 1) * w.block]] for i in range(n_buf)]
    # the same loop for every shape: only the iovecs differ
    pairs = [(off, iovecs[i % n_buf]) for i, off in enumerate(_offsets(w, size))]
    preadv = os.preadv
    cpu0 = time.thread_time()
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        at = n % len(pairs)
        chunk = pairs[at : at + 64]
        for off, iov in chunk:
            preadv(fd, iov, off)
        n += len(chunk)  # not 64: the last chunk of the list is shorter
    rate, cpu = n / (time.perf_counter() - start), (time.thread_time() - cpu0) / n * 1e6
    del pairs
    for group in iovecs:
        for b in group:
            b.release()
    view.release()
    area.close()
    return rate, cpu


@dataclass(frozen=True)
class Run:
    """One engine row: requests per second and CPU time per request on each side."""

    rate: float
    frontend_cpu_us: float  # the frontend's process (or, in one process, the frontend thread)
    engine_cpu_us: float = 0.0  # the engine's process: ring thread, I/O workers, transport thread
    grant_maps: int = -1  # persistent: pages the grant cache mapped in the whole run (-1: off)
    requests: int = 0  # requests the data plane served in the whole run
    notifies: int = 0  # events the data plane sent in the whole run (one per ring pass at most)
    #: times the ring thread slept until the frontend's event (the turnaround: it ran out of requests)
    wakeups: int = 0
    #: µs per request the ring thread spent asleep (neither on a CPU nor waiting for one: waiting
    #: for the frontend), from its schedstat; -1 where not measured
    asleep_us: float = -1.0
    #: direct preadv rates measured in slices between the engine's (--slices; 0: not interleaved):
    #: one buffer, QD buffers in turn, scattered pages (direct()'s shapes)
    direct: float = 0.0
    direct_wide: float = 0.0
    direct_scattered: float = 0.0
    #: the native loop's polls for the refill after a pass (ring_loop.h), and those that caught it
    polls: int = 0
    polls_caught: int = 0


def verify(fe: LocalFrontend, image: str, w: Workload, size: int) -> None:
    """A few reads gathered and compared with the file: the timed runs leave data in the pages."""
    with open(image, "rb") as f:
        for off in _offsets(w, size, seed=7)[:8]:
            f.seek(off)
            if fe.read(off // 512, w.block) != f.read(w.block):
                raise SystemExit(f"engine returned wrong data at offset {off}")


def frontend_run(fe: LocalFrontend, w: Workload, size: int, seconds: float) -> Run:
    """Keep `qd` requests outstanding for `seconds`; read data stays in the frontend's pages."""
    offsets = _offsets(w, size)
    submitted = completed = 0
    for _ in range(w.qd):
        fe.submit_read(offsets[submitted] // 512, w.block)
        submitted += 1
    start = time.perf_counter()
    cpu0 = time.thread_time()
    end = start + seconds
    while True:
        done = fe.collect(1, timeout=30, gather=False)
        for c in done.values():
            if c.response.status != blkif.RSP_OKAY:
                raise SystemExit(f"read failed: {c.response}")
        completed += len(done)
        if time.perf_counter() >= end:
            break
        for _ in done:
            fe.submit_read(offsets[submitted % len(offsets)] // 512, w.block)
            submitted += 1
    elapsed = time.perf_counter() - start
    cpu = time.thread_time() - cpu0
    while fe.outstanding:
        fe.collect(1, timeout=30, gather=False)
    return Run(completed / elapsed, cpu / completed * 1e6)


def _frontend_pages(w: Workload) -> int:
    return w.qd * (w.block // 4096)


def _child(
    sock: str,
    image: str,
    w: Workload,
    seconds: float,
    conn: multiprocessing.connection.Connection,
    *,
    persistent: bool,
    frontend: str = "python",
    slices: int = 1,
) -> None:
    size = os.stat(image).st_size
    with LocalFrontend(
        sock,
        1,
        ring_page_order=1,
        data_pages=_frontend_pages(w),
        indirect_pages=w.qd,
        persistent=persistent,
    ) as fe:
        conn.send(fe.xenstore_nodes())
        conn.recv()  # backend connected
        conn.send(
            frontend_work(
                fe,
                image,
                w,
                size=size,
                seconds=seconds,
                frontend=frontend,
                verified=lambda: conn.send("verified"),
                slices=slices,
                # interleaved with the engine process's direct loops: each slice on its word
                between=conn.recv if slices > 1 else None,
                after=(lambda: conn.send("slice")) if slices > 1 else None,
            )
        )


def frontend_work(
    fe: LocalFrontend,
    image: str,
    w: Workload,
    *,
    size: int,
    seconds: float,
    frontend: str,
    verified: Callable[[], None],
    slices: int = 1,
    between: Callable[[], object] | None = None,
    after: Callable[[], None] | None = None,
) -> Run:
    """Check data, call `verified()`, then the timed run, on the `python` frontend (LocalFrontend's
    submit_read/collect per request) or the `batch` one (bench/batch_frontend.py: prebuilt slots
    copied in batches, answers checked in bulk, data checked before and after the timing). The
    batch frontend runs in `slices` parts, each after `between()` returns and followed by
    `after()` (the engine's process runs its direct loop between them)."""
    if frontend == "python":
        verify(fe, image, w, size)
        verified()
        return frontend_run(fe, w, size, seconds)
    batch = BatchFrontend(fe, w.block, w.qd, _offsets(w, size))
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        batch.warm_and_verify(fd)
        verified()
        done, elapsed, cpu = 0, 0.0, 0.0
        for _ in range(slices):
            if between is not None:
                between()
            d, e, c = batch.run(seconds / slices)
            done, elapsed, cpu = done + d, elapsed + e, cpu + c
            if after is not None:
                after()
        batch.verify(fd)
    finally:
        os.close(fd)
    return Run(done / elapsed, cpu / done * 1e6)


def _params(nodes: dict[str, str]) -> RingParams:
    order = nodes.get("ring-page-order")
    refs = (
        [nodes["ring-ref"]]
        if "ring-ref" in nodes
        else [nodes[f"ring-ref{i}"] for i in range(1 << int(order or 0))]
    )
    return RingParams.parse(
        ring_refs=refs,
        event_channel=nodes["event-channel"],
        protocol=nodes["protocol"],
        ring_page_order=order,
        feature_persistent=nodes.get("feature-persistent"),
    )


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def engine(
    transport: LocalTransport,
    target: DeviceTarget,
    image: str,
    w: Workload,
    *,
    workers: int,
    seconds: float,
    in_child: bool,
    persistent: bool = False,
    native: bool = False,
    frontend: str = "python",
    slices: int = 0,
    device_fd: int = -1,
) -> Run:
    """One engine row. `frontend`: see frontend_work. `slices` > 1 (batch frontend in a child
    process): the timed run is cut into that many slices, and before each one this process runs
    the direct preadv loops on `device_fd` (one buffer, then QD buffers) for half a slice each, so
    each row has its own baseline measured alongside it, under the same load."""
    interleave = in_child and frontend == "batch" and slices > 1
    if in_child:
        ctx = multiprocessing.get_context("spawn")
        parent, child_end = ctx.Pipe()
        proc = ctx.Process(
            target=_child,
            args=(transport.socket_path, image, w, seconds, child_end),
            kwargs={"persistent": persistent, "frontend": frontend, "slices": slices if interleave else 1},
        )
        proc.start()
        assert proc.pid is not None  # started
        if _PIN:  # --pin: the frontend on its own CPU, as a guest's vCPU would be
            os.sched_setaffinity(proc.pid, {_PIN[1]})
        child_end.close()  # ours: a child that dies then shows up as EOFError, not a hang

        def receive() -> object:
            if not parent.poll(seconds + 60):
                raise SystemExit("frontend process stopped answering")
            return parent.recv()

        try:
            nodes = receive()
            assert isinstance(nodes, dict)
            dp = _data_plane(transport, nodes, target, workers=workers, native=native)
            dp.start()
            try:
                parent.send("go")
                receive()  # verified
                ring_tid = dp._thread.native_id if dp._thread is not None else None
                if interleave:
                    served = 0
                    cpu = slept = 0.0
                    rates = dict.fromkeys(_SHAPES, 0.0)
                    for k in range(slices):
                        # rotate which baseline goes first, so none always follows the engine
                        for shape in _SHAPES[k % 3 :] + _SHAPES[: k % 3]:
                            rates[shape] += (
                                direct(device_fd, w, target.size_bytes, seconds / slices / 3, shape=shape)[0]
                                / slices
                            )
                        before, cpu0, sched0 = dp.stats.requests, _cpu(), _asleep(ring_tid)
                        parent.send("slice")
                        receive()  # its slice is done, every request answered
                        served, cpu = served + dp.stats.requests - before, cpu + _cpu() - cpu0
                        slept += _asleep(ring_tid) - sched0
                    run = receive()
                    assert isinstance(run, Run)
                    run = dataclasses.replace(
                        run,
                        direct=rates[ONE],
                        direct_wide=rates[QD_BUFFERS],
                        direct_scattered=rates[SCATTERED],
                    )
                else:
                    served, cpu0, sched0 = dp.stats.requests, _cpu(), _asleep(ring_tid)
                    run = receive()
                    assert isinstance(run, Run)
                    served, cpu = dp.stats.requests - served, _cpu() - cpu0
                    slept = _asleep(ring_tid) - sched0
            finally:
                dp.stop()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return Run(
            run.rate,
            run.frontend_cpu_us,
            cpu / served * 1e6,
            *_grant_counts(dp),
            direct=run.direct,
            direct_wide=run.direct_wide,
            direct_scattered=run.direct_scattered,
            asleep_us=slept / served * 1e6,
            polls=dp.stats.polls,
            polls_caught=dp.stats.polls_caught,
        )
    with LocalFrontend(
        transport.socket_path,
        1,
        ring_page_order=1,
        data_pages=_frontend_pages(w),
        indirect_pages=w.qd,
        persistent=persistent,
    ) as fe:
        dp = _data_plane(transport, fe.xenstore_nodes(), target, workers=workers, native=native)
        dp.start()
        try:
            mark: list[tuple[int, float]] = []
            run = frontend_work(
                fe,
                image,
                w,
                size=target.size_bytes,
                seconds=seconds,
                frontend=frontend,
                verified=lambda: mark.append((dp.stats.requests, _cpu())),
            )
            served, cpu = dp.stats.requests - mark[0][0], _cpu() - mark[0][1]
            # one process: the engine's share is the process total minus the frontend thread's
            engine_cpu = cpu / served * 1e6 - run.frontend_cpu_us
        finally:
            dp.stop()
        return Run(
            run.rate,
            run.frontend_cpu_us,
            engine_cpu,
            *_grant_counts(dp),
            polls=dp.stats.polls,
            polls_caught=dp.stats.polls_caught,
        )


def _data_plane(
    transport: LocalTransport, nodes: dict[str, str], target: DeviceTarget, *, workers: int, native: bool
) -> DataPlane:
    """The ring a frontend's xenstore nodes describe, served by a DataPlane on domid 1; refused
    when the native pass was asked for and does not run."""
    dp = DataPlane(transport, 1, _params(nodes), target, target.limits(), workers=workers, native=native)
    if native and dp._fast is None and dp._fast_copy is None:
        dp.stop()
        raise SystemExit("--native on: the native fast path is not built or does not apply here")
    return dp


def _asleep(tid: int | None) -> float:
    """Seconds of wall clock so far that thread `tid` of this process spent asleep: the clock minus
    its time on a CPU and its time waiting for one (/proc schedstat), so a loaded host's run-queue
    waits are not counted as the ring thread waiting for the frontend. NaN where not available."""
    try:
        on_cpu, waiting = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[:2]
    except (OSError, ValueError):
        return math.nan
    return time.perf_counter() - (int(on_cpu) + int(waiting)) / 1e9


def _grant_counts(dp: DataPlane) -> tuple[int, int, int, int]:
    cache = dp.grant_cache
    stats = dp.stats
    return (-1 if cache is None else cache.stats.maps), stats.requests, stats.notifies, stats.wakeups


# --- several queues on several CPUs (--queues N) --------------------------------------------------------
def _direct_child(
    image: str,
    w: Workload,
    seconds: float,
    barrier: threading.Barrier,
    conn: multiprocessing.connection.Connection,
) -> None:
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        barrier.wait()
        conn.send(direct(fd, w, os.fstat(fd).st_size, seconds))
    finally:
        os.close(fd)


def direct_parallel(
    image: str, w: Workload, seconds: float, n: int, *, processes: bool
) -> tuple[float, float]:
    """Aggregate requests per second of `n` direct preadv loops (one buffer each, as `direct`)
    running at once, on n threads of this process or in n processes; and their mean CPU µs per
    request."""
    size = os.stat(image).st_size
    if not processes:
        rates = [(0.0, 0.0)] * n
        fds = [os.open(image, os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]

        def loop(i: int) -> None:
            rates[i] = direct(fds[i], w, size, seconds)

        try:
            threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for fd in fds:
                os.close(fd)
        return sum(r for r, _cpu in rates), sum(cpu for _r, cpu in rates) / n
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [ctx.Process(target=_direct_child, args=(image, w, seconds, barrier, c)) for _p, c in pipes]
    for proc in procs:
        proc.start()
    try:
        total = cpu = 0.0
        for parent, child in pipes:
            child.close()
            if not parent.poll(seconds + 60):
                raise SystemExit("a direct preadv process stopped answering")
            rate, per = parent.recv()
            total, cpu = total + rate, cpu + per / n
        return total, cpu
    finally:
        for proc in procs:
            proc.join(30)


def _queue_child(  # noqa: PLR0917 (a multiprocessing target takes positional args)
    sock: str,
    image: str,
    w: Workload,
    seconds: float,
    queue: int,
    conn: multiprocessing.connection.Connection,
) -> None:
    """One queue's frontend (the batch frontend, persistent grants): its own process, as blkfront
    drives each queue from its own CPU."""
    size = os.stat(image).st_size
    with LocalFrontend(
        sock, 1, ring_page_order=1, data_pages=_frontend_pages(w), indirect_pages=w.qd, persistent=True
    ) as fe:
        conn.send(fe.xenstore_nodes())
        conn.recv()  # served
        batch = BatchFrontend(fe, w.block, w.qd, _offsets(w, size, seed=1 + queue))
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            batch.warm_and_verify(fd)
            conn.send("verified")
            conn.recv()  # every queue verified: all start together
            done, elapsed, cpu = batch.run(seconds)
            batch.verify(fd)
        finally:
            os.close(fd)
        conn.send(Run(done / elapsed, cpu / done * 1e6))


def multi_queue(
    transport: LocalTransport,
    target: DeviceTarget,
    image: str,
    w: Workload,
    *,
    queues: int,
    seconds: float,
    engine_workers: int,
    io_workers: int,
) -> tuple[float, float, float]:
    """`queues` rings of one disk (domain 1), each driven by its own frontend process at QD `w.qd`,
    served with the native pass (where built) by DataPlanes in this process (`engine_workers` 0:
    threads sharing one GIL) or by a WorkerPool of `engine_workers` processes (`xenblockctl backend
    --workers N`).
    Returns (aggregate requests/s, engine CPU µs per request, frontend CPU µs per request)."""
    from bench.many_disks import _cpu  # many_disks imports this module: not at the top

    native = fastpath.available()  # else the pure-Python pass (main_multi_queue says so)
    ctx = multiprocessing.get_context("spawn")
    pool = WorkerPool(engine_workers, transport, Journal("bench-engine")) if engine_workers else None
    conns: list[multiprocessing.connection.Connection] = []
    procs = []
    planes: list[DataPlane | RemoteQueue] = []

    def receive(conn: multiprocessing.connection.Connection) -> object:
        if not conn.poll(seconds + 60):
            raise SystemExit("a frontend process stopped answering")
        return conn.recv()

    try:
        for q in range(queues):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_queue_child, args=(transport.socket_path, image, w, seconds, q, child))
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        for q, conn in enumerate(conns):
            nodes = receive(conn)
            assert isinstance(nodes, dict)
            params = _params(nodes)
            if pool is not None:
                planes.append(
                    pool.serve(
                        domid=1,
                        params=params,
                        target=target,
                        limits=target.limits(),
                        name=f"bench-q{q}",
                        io_workers=io_workers,
                        max_persistent_grants=1056,
                        on_broken=None,
                        native=native,
                    )
                )
            else:
                planes.append(_data_plane(transport, nodes, target, workers=io_workers, native=native))
        for dp in planes:
            dp.start()
        for conn in conns:
            conn.send("served")
        for conn in conns:
            receive(conn)  # verified
        cpu0 = _cpu(pool)
        for conn in conns:
            conn.send("go")
        runs = [receive(conn) for conn in conns]
        cpu = _cpu(pool) - cpu0
    finally:
        for dp in planes:
            dp.request_stop()
        for dp in planes:
            dp.stop()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if pool is not None:
            pool.close()
    assert all(isinstance(r, Run) for r in runs)
    rate = sum(r.rate for r in runs if isinstance(r, Run))
    # the engine's CPU over the timed run, over the requests answered in it (rate x the run's length)
    frontend_us = sum(r.frontend_cpu_us for r in runs if isinstance(r, Run)) / len(runs)
    return rate, cpu / (rate * seconds) * 1e6, frontend_us


def main_multi_queue(args: argparse.Namespace, image: str, fd: int, target: DeviceTarget) -> None:
    """The --queues rows. The direct loops run before, between and after the engine rows (half a
    row's time each); each engine row's ratios are against the mean of the two sets around it."""
    w = WORKLOADS[int(args.only.split(",")[0]) - 1] if args.only else WORKLOADS[0]
    n = args.queues
    io_workers = int(args.workers.split(",")[0])
    print(f"\n{w.name} per queue, {n} queues, {len(os.sched_getaffinity(0))} CPUs, {io_workers} I/O workers")
    size = os.fstat(fd).st_size
    labels = ("1 thread", f"{n} threads", f"{n} processes")
    if not fastpath.available():
        print(f"  engine rows on the pure-Python pass: {fastpath.describe(True)}")

    def baselines() -> list[tuple[float, float]]:
        half = args.seconds / 2
        return [
            direct(fd, w, size, half),
            direct_parallel(image, w, half, n, processes=False),
            direct_parallel(image, w, half, n, processes=True),
        ]

    sets = [baselines()]
    engines = []
    transport = LocalTransport(str(Path(image).with_name("grants-mq.sock")))
    try:
        for engine_workers in (0, n):
            engines.append(
                (
                    engine_workers,
                    multi_queue(
                        transport,
                        target,
                        image,
                        w,
                        queues=n,
                        seconds=args.seconds,
                        engine_workers=engine_workers,
                        io_workers=io_workers,
                    ),
                )
            )
            sets.append(baselines())
    finally:
        transport.close()
    for i, label in enumerate(labels):
        rate = sum(b[i][0] for b in sets) / len(sets)
        cpu = sum(b[i][1] for b in sets) / len(sets)
        print(f"  {'direct preadv (' + label + ')':<52} {rate:>10.0f} IOPS{'':43}CPU/request: {cpu:.1f} µs")
    for k, (engine_workers, (rate, engine_us, frontend_us)) in enumerate(engines):
        around = [(sets[k][i][0] + sets[k + 1][i][0]) / 2 for i in range(len(labels))]
        label = f"engine, {n} queues, " + (
            f"{engine_workers} worker processes" if engine_workers else "one process"
        )
        ratios = ", ".join(f"{name} {rate / base:.3f}" for name, base in zip(labels, around, strict=True))
        print(
            f"  {label:<52} {rate:>10.0f} IOPS   ratio to {ratios}"
            f"   CPU/request: engine {engine_us:.1f} µs, frontend {frontend_us:.1f} µs",
            flush=True,
        )


#: --pin: [engine CPU, frontend CPU], or empty: where the scheduler puts them
_PIN: list[int] = []


def pin(queues: int) -> None:
    """--pin: this process on one CPU from now on (threads it starts inherit it), the frontend
    process, when engine() starts it, on another."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or queues != 1:
        raise SystemExit("--pin needs two CPUs and one queue")
    _PIN[:] = cpus[:2]
    os.sched_setaffinity(0, {cpus[0]})


def _spin() -> None:
    """--busy-thread: Python bytecode until the process ends."""
    x = 0
    while True:
        x += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--workers", default="0,4", help="comma-separated worker counts to try")
    ap.add_argument(
        "--only", default="", help="comma-separated workload numbers to run (1-based; default: all)"
    )
    ap.add_argument("--loop", action="store_true", help="read through a loop device over the file (root)")
    ap.add_argument("--frontend-process", action="store_true", help="run the frontend in a child process")
    ap.add_argument(
        "--persistent",
        default="off,on",
        help="comma-separated grant modes to run per row: off (per-request), on (persistent grants),"
        " copy / map (per-request on the Xen transport's grant copy / per-request mapping paths)",
    )
    ap.add_argument(
        "--native",
        default="off,on",
        help="ring passes: off (pure Python), on (native fast path), dict (native, the grant cache's"
        " pages looked up in its dict per page instead of its C index: the lookup before it)",
    )
    ap.add_argument(
        "--frontend",
        default="batch",
        help="comma-separated frontends per row: batch (prebuilt slots copied in batches, answers"
        " checked in bulk: bench/batch_frontend.py), python (LocalFrontend's submit_read/collect)",
    )
    ap.add_argument(
        "--qd",
        type=int,
        default=0,
        help="queue depth for every workload (default: its own); 1 is a synchronous frontend such as"
        " pvgrub's, one request at a time, and the rows then print the mean time per request",
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval() in seconds (CPython default 0.005): GIL hand-off latency between "
        "the ring thread, I/O workers and an in-process frontend",
    )
    ap.add_argument(
        "--slices",
        type=int,
        default=6,
        help="batch frontend in a child process: cut each row's timed run into this many slices with"
        " the direct loops run between them, each row's ratios against its own interleaved baseline"
        " (0 or 1: the direct rows measured once per workload, before the engine rows)",
    )
    ap.add_argument(
        "--queues",
        type=int,
        default=1,
        help="N > 1: instead of the rows above, one workload (--only, default 4 KiB) on N queues of one"
        " disk, a frontend process each, the native pass in one process and in N worker processes,"
        " against N direct preadv loops (threads and processes); --workers' first value is the I/O"
        " workers per queue",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="one ring: this process (engine, direct loops) on the first CPU it may use, the frontend"
        " process on the second: each side on its own CPU, as on an idle host, where the two take"
        " turns (issue 20, 4 KiB QD 32); on a shared host each side also shares its CPU with others'"
        " work, which the rates then show",
    )
    ap.add_argument(
        "--busy-thread",
        action="store_true",
        help="a thread of this process runs Python all the time (another ring's thread, a xenstore"
        " watch, a worker's Python would): a ring thread that needs the GIL waits for it, up to the"
        " switch interval (issue 20, gil20); every row of the process shares it, the direct ones too",
    )
    ap.add_argument(
        "--poll-ns",
        type=int,
        default=None,
        help="how long the native loop watches for the frontend's refill after a pass before it"
        f" sleeps (fastpath.POLL_NS, default {fastpath.POLL_NS}; 0: it sleeps at once, as before"
        " issue 20's poll)",
    )
    args = ap.parse_args()
    if args.poll_ns is not None:
        fastpath.POLL_NS = args.poll_ns
    if args.busy_thread:
        threading.Thread(target=_spin, daemon=True).start()
    if args.pin:
        if not args.frontend_process:
            ap.error("--pin puts the frontend process on its own CPU: it needs --frontend-process")
        pin(args.queues)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    workers = [int(x) for x in args.workers.split(",")]
    # (persistent, the local transport's data_pages) per mode
    modes = [
        {"off": (False, "table"), "on": (True, "table"), "copy": (False, "copy"), "map": (False, "map")}[x]
        for x in args.persistent.split(",")
    ]
    natives = args.native.split(",")
    if set(natives) - {"off", "on", "dict"}:
        ap.error(f"--native: off, on and/or dict, not {args.native}")
    frontends = args.frontend.split(",")
    if set(frontends) - {"batch", "python"}:
        ap.error(f"--frontend: batch and/or python, not {args.frontend}")
    if not fastpath.available() and set(natives) - {"off"}:
        print(f"native rows skipped: {fastpath.describe(True)}")
        natives = ["off"]
    mode_labels = {"table": "per-request", "copy": "per-request, grant copy", "map": "per-request, mapped"}

    with tempfile.TemporaryDirectory(prefix="xbc-bench-") as tmp:
        image = Path(tmp, "disk.img")
        size = args.size_mib << 20
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        dev = None
        if args.loop:
            from xenblockctl.kernel import loop

            dev = loop.attach_file(str(image), read_only=True, tag="xenblockctl:bench-ring")
            fd = dev.fd
            target = DeviceTarget.from_block_device(dev)
        else:
            fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            target = DeviceTarget.from_fd(fd)
        transports = {
            pages: LocalTransport(str(Path(tmp, f"grants-{pages}.sock")), data_pages=pages)
            for pages in dict.fromkeys(pages for _persistent, pages in modes)
        }
        try:
            buf = bytearray(1 << 20)
            for off in range(0, size, 1 << 20):  # warm the page cache for both sides
                os.preadv(fd, [buf], off)
            where = "loop device" if args.loop else "file"
            side = "child process" if args.frontend_process else "same process"
            if args.queues > 1:
                side = f"{args.queues} child processes"
            if _PIN:
                side += f" on CPU {_PIN[1]}, the engine on CPU {_PIN[0]}"
            print(
                f"{args.size_mib} MiB {where}, page cache warm, frontend in {side}, "
                f"{args.seconds:.0f} s per row, switch interval {sys.getswitchinterval() * 1e3:.1f} ms, "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            if args.queues > 1:
                main_multi_queue(args, str(image), fd, target)
                return 0
            chosen = [WORKLOADS[int(i) - 1] for i in args.only.split(",")] if args.only else WORKLOADS
            if args.qd:
                chosen = [
                    dataclasses.replace(w, name=f"{w.name.rsplit(', QD', 1)[0]}, QD {args.qd}", qd=args.qd)
                    for w in chosen
                ]
            for w in chosen:
                measured = {shape: direct(fd, w, size, args.seconds, shape=shape) for shape in _SHAPES}
                (base, base_cpu), (wide, wide_cpu), (scattered, scattered_cpu) = measured.values()
                print(f"\n{w.name}")
                pool = f"{w.qd}x{w.block // PAGE} pages scattered"
                for label, rate, cpu in (
                    ("direct preadv (1 thread, 1 buffer)", base, base_cpu),
                    (f"direct preadv (1 thread, {w.qd} buffers)", wide, wide_cpu),
                    (f"direct preadv (1 thread, {pool})", scattered, scattered_cpu),
                ):
                    print(
                        f"  {label:<48} {rate:>10.0f} IOPS {rate * w.block / 2**20:>8.1f} MiB/s"
                        f"{'':16}CPU/request: {cpu:.1f} µs"
                    )
                for n, frontend in ((n, f) for n in workers for f in frontends):
                    for persistent, pages in modes:
                        # the native pass applies to persistent grants and (NativeCopy) to copies
                        native_applies = persistent or pages == "copy"
                        for pass_ in natives if native_applies else natives[:1]:
                            native = pass_ != "off"
                            fastpath.INDEX_PAGES = pass_ != "dict"
                            run = engine(
                                transports[pages],
                                target,
                                str(image),
                                w,
                                workers=n,
                                seconds=args.seconds,
                                in_child=args.frontend_process,
                                persistent=persistent,
                                native=native and native_applies,
                                frontend=frontend,
                                slices=args.slices,
                                device_fd=fd,
                            )
                            label = f"engine, {n} workers" if n else "engine, inline I/O"
                            label += ", persistent" if persistent else f", {mode_labels[pages]}"
                            fastpath.INDEX_PAGES = True
                            label += ", native" if native and native_applies else ", python"
                            if pass_ == "dict" and persistent:
                                label += " (dict lookup)"
                            if len(frontends) > 1:
                                label += f", {frontend} frontend"
                            maps = f"   grant maps: {run.grant_maps}" if run.grant_maps >= 0 else ""
                            rate_mib = run.rate * w.block / 2**20
                            one, many, apart = (
                                (run.direct, run.direct_wide, run.direct_scattered)
                                if run.direct
                                else (base, wide, scattered)
                            )
                            alongside = f", direct alongside {one:.0f}" if run.direct else ""
                            print(
                                f"  {label:<48} {run.rate:>10.0f} IOPS {rate_mib:>8.1f} MiB/s"
                                f"   ratio {run.rate / one:.3f} (to {w.qd} buffers {run.rate / many:.3f},"
                                f" to scattered pages {run.rate / apart:.3f}{alongside})"
                                f"   CPU/request: engine "
                                f"{run.engine_cpu_us:.1f} µs, frontend {run.frontend_cpu_us:.1f} µs"
                                f"{maps} for {run.requests} requests, "
                                f"{run.requests / max(run.notifies, 1):.1f} requests per event, "
                                f"{run.requests / max(run.wakeups, 1):.1f} per wake-up"
                                + (f", polls caught {run.polls_caught} of {run.polls}" if run.polls else "")
                                + (
                                    f", ring thread asleep {run.asleep_us:.1f} µs"
                                    if run.asleep_us >= 0
                                    else ""
                                )
                                + (f"   {1e6 / run.rate:.1f} µs a request" if w.qd == 1 else "")
                            )
        finally:
            for transport in transports.values():
                transport.close()
            if dev is not None:
                dev.close()
            else:
                os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
