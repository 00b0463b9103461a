"""Many busy disks on one engine: aggregate IOPS and per-disk p99 for 2, 8, 32 and 100 disks, with 1
and 2 queues per disk (local transport, same run).

    .venv/bin/python -m bench.many_disks [--disks 2,8,32,100] [--queues 1,2] [--seconds 3] [--qd 4]
        [--frontends 2] [--io-workers 4] [--engine auto,threads,workers:2,groups:2,workers-groups:2]
        [--frontend python,native] [--frontend-cpus LIST]
        [--writers N [--write-pages P] [--dir DIR] [--dirty-limit-mib M]]

Every disk reads 4 KiB at random offsets, `--qd` requests outstanding per disk (spread over its
queues), from one image file whose pages are in the page cache, so the numbers measure the engine's
per-request software cost, not a disk. Each disk gets its own fd on the image and, per queue, its
own DataPlane (ring thread, `--io-workers` I/O threads, grant handling), as the engine serves a
connected disk: `auto` is the engine's default (without --workers: one GIL; each ring on a thread
of its own up to as many rings as the engine has CPUs, all of them in ring groups, one pinned to
each of those CPUs, past that: ringgroup.RingGroups.per_cpu), `threads` every ring on a thread
of its own in this process (`--no-ring-groups`),
`workers:N` in N worker processes (backend/workers.py, `xenblockctl backend --workers N`), each
queue handed to the least loaded one; `groups:N` and `workers-groups:N` the same with ring groups
(backend/ringgroup.py, `--ring-groups`: one native loop serves many rings, always). The frontends run in
`--frontends` child processes (own interpreters), each driving its share of the disks from one
poll loop (its ready rings in a new random order each turn: no disk first every time), as guests on
other CPUs would. `--frontend native` keeps that handshake in Python (LocalFrontend) but runs the
loop in C (bench/native_frontend.c, compiled at run time with the system compiler): 0.4-1.1 µs a
request against Python's 5-10, so the rows measure the engine rather than its frontends (session
17). It checks every answer: id in flight, READ, OK, and the data (the image's 4 KiB blocks are
stamped with their numbers, each page poisoned before its read); any failure voids the run.
`--frontend-cpus` puts the frontends on CPUs of their own and the engine on the rest.

Per row: aggregate IOPS (completions of all disks / wall time), the engine's CPU per request
(user + sys of this process and its worker processes over the run / requests), per-disk p99
latency (the median disk's and the worst disk's, from submit to harvest in the frontend; the
native loop's from a histogram, within 1.6 %), and
Jain's fairness index over the disks' IOPS (1.0 = every disk got the same share).

Writes (issue 20, write isolation in ring groups): `--writers N` makes the first N disks of each
row write `--write-pages` whole pages at random aligned offsets instead (native frontends only),
each to a copy of the image of its own (pages stamped as the image's blocks are), `--dir` puts the image
on the filesystem to measure (its kind decides how a buffered write may wait: backend/writegate.py),
and `--dirty-limit-mib` lowers vm.dirty_bytes for the run (restored after) so the kernel's dirty
throttle meets the writers. A second line per row gives the writers' MiB/s, the readers' IOPS and
p99, and what the writers' write gates did (zeros on a tree without them).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

from bench.common import percentile, process_cpu

if TYPE_CHECKING:
    from xenblockctl.backend.ringgroup import RingGroups
from bench.ring_throughput import _params
from xenblockctl.backend import blkif
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.transport.local import LocalTransport
from xenblockctl.backend.workers import RemoteQueue, WorkerPool
from xenblockctl.journal import Journal

BLOCK = 4096
#: the C hot loop of --frontend native, compiled at run time (nothing of it is installed)
NATIVE_SOURCE = Path(__file__).with_name("native_frontend.c")
_STAMP = struct.Struct("<Q")


def make_image(path: Path, size: int) -> None:
    """Random data whose every 4 KiB block starts with its block number (u64 LE) and ends with its
    complement: the native frontend checks both, so a read of the wrong block, or none, is caught."""
    with open(path, "wb") as f:
        for first in range(0, size // BLOCK, 256):
            chunk = bytearray(os.urandom(min(256, size // BLOCK - first) * BLOCK))
            for i in range(len(chunk) // BLOCK):
                _STAMP.pack_into(chunk, i * BLOCK, first + i)
                _STAMP.pack_into(chunk, (i + 1) * BLOCK - 8, ~(first + i) & 0xFFFFFFFFFFFFFFFF)
            f.write(chunk)


def build_native_frontend(where: Path) -> Path:
    """Compile bench/native_frontend.c into `where` with the system compiler; SystemExit with the
    reason if there is none or it fails."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("--frontend native needs a C compiler (cc or gcc on PATH); none found")
    binary = where / "native_frontend"
    done = subprocess.run(
        [cc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(NATIVE_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"--frontend native: {cc} failed to build {NATIVE_SOURCE}:\n{done.stderr}")
    return binary


@dataclass(frozen=True)
class DiskResult:
    completed: int
    p50_us: float
    p99_us: float


def _harvest(fe: LocalFrontend) -> dict[int, object]:
    """Every response published now, with rsp_event re-armed (no lost wake-up)."""
    out: dict[int, object] = {}
    while True:
        out.update(fe.collect(0, timeout=0, gather=False))
        if not fe.ring.final_check_for_responses():
            return out


def _frontends(  # noqa: PLR0917 (a multiprocessing target takes positional args)
    sock: str,
    disks: list[int],
    queues: int,
    qd: int,
    size: int,
    seconds: float,
    persistent: bool,
    conn: multiprocessing.connection.Connection,
    cpus: set[int] | None,
    shuffled: bool,
    native: Path | None,
    writers: set[int] = frozenset(),  # type: ignore[assignment]
    write_pages: int = 1,
) -> None:
    if cpus:  # guests on CPUs of their own (--frontend-cpus)
        os.sched_setaffinity(0, cpus)
    rings: dict[int, list[LocalFrontend]] = {}
    try:
        for d in disks:
            # one domain per disk: each its own grant-ref space and ports, like guests
            pages = qd * write_pages if d in writers else qd
            rings[d] = [
                LocalFrontend(sock, 1 + d, data_pages=pages, indirect_pages=1, persistent=persistent)
                for _ in range(queues)
            ]
        nodes = {d: [fe.xenstore_nodes() for fe in fes] for d, fes in rings.items()}
        if native is not None:
            _native_frontends(native, rings, qd, size, seconds, shuffled, nodes, conn, writers, write_pages)
            return
        if writers:
            raise SystemExit("--writers needs --frontend native")
        conn.send((nodes, []))
        conn.recv()  # data planes running
        rng = random.Random(1)
        order = random.Random(2)
        blocks = size // BLOCK
        by_fd: dict[int, tuple[int, LocalFrontend]] = {}
        poller = select.poll()
        submitted: dict[tuple[int, int], float] = {}
        latencies: dict[int, list[float]] = {d: [] for d in disks}

        def submit(d: int, fe: LocalFrontend) -> None:
            rid = fe.submit_read(rng.randrange(blocks) * (BLOCK // 512), BLOCK)
            submitted[(id(fe), rid)] = time.perf_counter()

        for d, fes in rings.items():
            for i in range(qd):
                submit(d, fes[i % queues])
            for fe in fes:
                by_fd[fe.evtchn.fileno()] = (d, fe)
                poller.register(fe.evtchn.fileno(), select.POLLIN)
                fe.kick()
        warm_end = time.perf_counter() + min(1.0, seconds / 3)
        end = warm_end + seconds
        measuring = False
        while True:
            now = time.perf_counter()
            if not measuring and now >= warm_end:
                measuring = True
                for lat in latencies.values():
                    lat.clear()
            if now >= end:
                break
            ready = poller.poll(100)
            if shuffled:
                # each disk is its own guest: one loop serving them in fd order would favour the
                # first ones whenever the engine answers within the loop's own turn (8 disks,
                # an engine on a CPU of its own: the first half of each process's disks got twice
                # the IOPS of the second; many20)
                order.shuffle(ready)
            for fd, _ in ready:
                d, fe = by_fd[fd]
                fe.evtchn.ack()
                done = _harvest(fe)
                now = time.perf_counter()
                for rid, c in done.items():
                    if c.response.status != blkif.RSP_OKAY:  # type: ignore[attr-defined]
                        raise SystemExit(f"disk {d}: read failed: {c}")
                    latencies[d].append(now - submitted.pop((id(fe), rid)))
                    submit(d, fe)
                fe.kick()
        results = {}
        for d, lat in latencies.items():
            us = [x * 1e6 for x in lat] or [0.0]
            results[d] = DiskResult(len(lat), percentile(us, 50), percentile(us, 99))
        conn.send(results)
        for fes in rings.values():
            for fe in fes:
                while fe.outstanding:
                    fe.collect(1, timeout=30, gather=False)
        conn.recv()  # data planes stopped
    finally:
        for fes in rings.values():
            for fe in fes:
                fe.close()


def _native_frontends(  # noqa: PLR0917 (the Python frontend's own arguments, passed on)
    binary: Path,
    rings: dict[int, list[LocalFrontend]],
    qd: int,
    size: int,
    seconds: float,
    shuffled: bool,
    nodes: dict[int, list[dict[str, str]]],
    conn: multiprocessing.connection.Connection,
    writers: set[int] = frozenset(),  # type: ignore[assignment]
    write_pages: int = 1,
) -> None:
    """The hot loop of `_frontends` in C (bench/native_frontend.c) on the rings this process set
    up: it inherits each ring's memfd and eventfd pair, and its pid is counted as the frontends'
    CPU. Sends the per-disk results, or the C loop's failure report as a string."""
    specs, fds = [], []
    for d, fes in rings.items():
        for q, fe in enumerate(fes):
            if fe.abi is not blkif.X86_64 or fe.ring_pages != 1:
                raise SystemExit("--frontend native drives one-page x86_64 rings only")
            # the Python frontend hands request i of a disk to queue i % queues: so does this
            depth = len(range(q, qd, len(fes)))
            send = fe.evtchn.send_fd  # the engine's end of the pair: what notify() writes
            ring = f"{fe.gref_base},{fe.ring.size},{fe.ring_pages},{depth}"
            spec = f"{d},{fe.memory_fd},{fe.evtchn.fileno()},{send},{ring}"
            specs.append(spec + (f",{write_pages}" if d in writers else ""))
            fds += [fe.memory_fd, fe.evtchn.fileno(), send]
    warm = min(1.0, seconds / 3)
    argv = [str(binary), str(seconds), str(warm), str(1 + min(rings)), str(size // BLOCK), str(int(shuffled))]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            argv + specs,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            pass_fds=fds,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            conn.send((nodes, [proc.pid]))
            conn.recv()  # data planes running
            proc.stdin.write("go\n")
            proc.stdin.flush()
            results: dict[int, DiskResult] = {}
            failed = -1
            for line in proc.stdout:
                word, *rest = line.split()
                if word == "disk":
                    d, completed, p50, p99 = (int(float(x)) for x in rest)
                    results[d] = DiskResult(completed, p50 / 1000, p99 / 1000)
                elif word == "failures":
                    failed = int(rest[0])
                    break
            if failed:
                proc.stdin.close()
                proc.wait(30)
                errors.seek(0)
                conn.send(
                    f"native frontend (disks {sorted(rings)}): {failed} failed responses"
                    f" (exit {proc.returncode}):\n{errors.read()}"
                )
            else:
                conn.send(results)
            conn.recv()  # data planes stopped
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _proc(pid: int) -> tuple[float, int, int, int]:
    """(CPU seconds, voluntary, involuntary context switches, ns runnable but waiting for a CPU) of
    process `pid`, all its threads."""
    cpu = process_cpu(pid)
    vol = invol = 0
    waited = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
        waited += _task_sched(pid, int(task))[1]
    return cpu, vol, invol, waited


def _task_sched(pid: int, tid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of one thread, from its schedstat (0, 0 if
    it is gone): the wait is what the scheduler's sharing of the CPUs cost it."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            run, wait, _ = f.read().split()
    except OSError:
        return 0, 0
    return int(run), int(wait)


def _counts(pids: list[int]) -> tuple[float, int, int, int]:
    got = [_proc(pid) for pid in pids]
    return sum(g[0] for g in got), sum(g[1] for g in got), sum(g[2] for g in got), sum(g[3] for g in got)


def _groups_sched(groups: RingGroups | None) -> tuple[int, int]:
    """(ns on a CPU, ns waiting for one) of this process's ring groups' threads together."""
    tids = [t for t in (g.native_id for g in (groups.groups if groups else ())) if t is not None]
    got = [_task_sched(os.getpid(), tid) for tid in tids]
    return sum(g[0] for g in got), sum(g[1] for g in got)


def _found_shared(groups: RingGroups | None) -> int:
    """How often the groups' polls found their CPU taken."""
    return sum(g.found_shared for g in (groups.groups if groups else ()))


@contextlib.contextmanager
def _hog(spec: str | None) -> Iterator[int | None]:
    """--hog CPU[,setsid]: a CPU-bound process pinned to CPU for the whole run (a busy dom0
    neighbour: a device model, a backup), in this session or (setsid) one of its own, another
    autogroup; its pid (None without --hog). Killed on the way out."""
    if not spec:
        yield None
        return
    cpu, _, how = spec.partition(",")
    code = f"import os\nos.sched_setaffinity(0, {{{int(cpu)}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=how == "setsid")
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _engine_pids(pool: WorkerPool | None) -> list[int]:
    return [os.getpid()] + ([w.proc.pid for w in pool.workers] if pool is not None else [])


def _cpu(pool: WorkerPool | None) -> float:
    """CPU seconds of this process and its worker processes (bench/ring_throughput's too)."""
    return _counts(_engine_pids(pool))[0]


def _jain(xs: list[float]) -> float:
    total = sum(xs)
    return total * total / (len(xs) * sum(x * x for x in xs)) if total else 0.0


@dataclass(frozen=True)
class Row:
    iops: float
    engine_cpu_us: float
    p99_median_us: float
    p99_worst_us: float
    jain: float
    #: per request: wake-ups of the ring threads; the engine's voluntary and involuntary context
    #: switches; the frontends' CPU (µs) and context switches (they share the engine's CPUs)
    wakeups: float = 0.0
    engine_vcs: float = 0.0
    engine_ivcs: float = 0.0
    frontend_cpu_us: float = 0.0
    frontend_vcs: float = 0.0
    polls: float = 0.0  #: refill polls begun per request
    #: Jain's index over the disks of one frontend process (the lowest of them): rings of one
    #: engine thread or group against each other, without the frontends' share of the CPUs
    jain_within: float = 0.0
    caught: float = 0.0  #: of them, the share that caught the refill
    #: per request, µs runnable but waiting for a CPU (schedstat): the engine's threads, the
    #: frontends'; and the ring groups' threads' time on a CPU and waiting (0 without groups)
    engine_wait_us: float = 0.0
    frontend_wait_us: float = 0.0
    group_run_us: float = 0.0
    group_wait_us: float = 0.0
    #: the --hog process's share of its CPU over the run (-1: no hog); how often the ring groups'
    #: polls found their CPU taken by another task (ringgroup.SHARED_NS)
    hog_share: float = -1.0
    #: the hog's mean time on its CPU between two preemptions (µs; it never sleeps): how long a
    #: ring group on that CPU waits once the hog has it (issue 20, the xfs neighbour cost)
    hog_stint_us: float = 0.0
    found_shared: int = 0
    #: --writers: the writers' MiB/s, the readers' IOPS and p99 (median and worst reader), and the
    #: writers' write gates: writes handed off, gate closures, writes that slept in a group, RWF_NOWAIT
    #: refusals written on the ring's thread (backend/writegate.py; zeros on a tree without it)
    write_mib_s: float = 0.0
    read_iops: float = 0.0
    read_p99_median_us: float = 0.0
    read_p99_worst_us: float = 0.0
    gate: tuple[int, ...] = (0, 0, 0, 0)


def run(
    transport: LocalTransport,
    image: Path,
    n_disks: int,
    queues: int,
    *,
    qd: int,
    seconds: float,
    frontends: int,
    io_workers: int,
    pool: WorkerPool | None,
    groups: RingGroups | None = None,
    persistent: bool = True,
    frontend_cpus: set[int] | None = None,
    shuffled: bool = True,
    hog: int | None = None,
    native: Path | None = None,
    writers: int = 0,
    write_pages: int = 1,
) -> Row:
    size = image.stat().st_size
    ctx = multiprocessing.get_context("spawn")
    writing = set(range(writers))  # the first disks write (--writers), the rest read
    fds = [
        os.open(_writer_image(image, d), os.O_RDWR | os.O_CLOEXEC)
        if d in writing
        else os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        for d in range(n_disks)
    ]
    targets = [DeviceTarget.from_fd(fd) for fd in fds]
    shares = [list(range(n_disks))[i::frontends] for i in range(frontends)]
    shares = [s for s in shares if s]
    procs = []
    conns = []
    planes: list[DataPlane | RemoteQueue] = []
    try:
        for share in shares:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_frontends,
                args=(
                    transport.socket_path,
                    share,
                    queues,
                    qd,
                    size,
                    seconds,
                    persistent,
                    child,
                    frontend_cpus,
                    shuffled,
                    native,
                    writing & set(share),
                    write_pages,
                ),
            )
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)

        def receive(conn: multiprocessing.connection.Connection) -> object:
            if not conn.poll(seconds + 120):
                raise SystemExit("a frontend process stopped answering")
            got = conn.recv()
            if isinstance(got, str):  # a frontend's failure report: the run is void
                raise SystemExit(got)
            return got

        native_pids: list[int] = []
        for conn in conns:
            got = receive(conn)
            assert isinstance(got, tuple)
            nodes, pids = got
            native_pids += pids
            for d, per_queue in nodes.items():
                for q, ring_nodes in enumerate(per_queue):
                    target = targets[d]
                    params = _params(ring_nodes)
                    if pool is not None:
                        planes.append(
                            pool.serve(
                                domid=1 + d,
                                params=params,
                                target=target,
                                limits=target.limits(),
                                name=f"bench-{d}-q{q}",
                                io_workers=io_workers,
                                max_persistent_grants=1056,
                                on_broken=None,
                            )
                        )
                        continue
                    # only when asked: the bench also runs on trees without ring groups
                    grouped: dict[str, Any] = {"groups": groups} if groups else {}
                    planes.append(
                        DataPlane(
                            transport,
                            1 + d,
                            params,
                            target,
                            target.limits(),
                            workers=io_workers,
                            name=f"bench-{d}-q{q}",
                            **grouped,
                        )
                    )
        for dp in planes:
            dp.start()
        fe_pids = [p.pid for p in procs if p.pid is not None] + native_pids
        e0, f0, g0 = _counts(_engine_pids(pool)), _counts(fe_pids), _groups_sched(groups)
        h0, t0 = (_task_sched(hog, hog)[0] if hog else 0), time.monotonic_ns()
        p0 = _proc(hog)[2] if hog else 0  # the hog's preemptions (involuntary switches)
        s0 = _found_shared(groups)
        for conn in conns:
            conn.send("go")
        results: dict[int, DiskResult] = {}
        for conn in conns:
            got = receive(conn)
            assert isinstance(got, dict)
            results.update(got)
        e1, f1, g1 = _counts(_engine_pids(pool)), _counts(fe_pids), _groups_sched(groups)
        h1, t1 = (_task_sched(hog, hog)[0] if hog else 0), time.monotonic_ns()
        p1 = _proc(hog)[2] if hog else 0
        s1 = _found_shared(groups)
        cpu = e1[0] - e0[0]
    except BaseException:
        # a failed row: the other frontends may be mid-run, and would wait 30 s for answers from
        # data planes about to stop (their native loops stop when these processes go)
        for proc in procs:
            proc.kill()
        raise
    finally:
        for dp in planes:
            dp.request_stop()
        for dp in planes:
            dp.stop()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send("stopped")
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for fd in fds:
            os.close(fd)
    # the engine CPU covers warm-up and measurement alike, and so does this count (a worker's
    # counts arrive when its queue stops; the last QD requests per disk are in it too)
    served = sum(dp.stats.requests for dp in planes)
    readers = [d for d in range(n_disks) if d not in writing]
    read_p99s = sorted(results[d].p99_us for d in readers) or [0.0]
    gate = [0, 0, 0, 0]  # the writers' write gates (writegate.py; a base tree has none)
    seen: set[int] = set()
    for plane in planes:
        writes: Any = getattr(getattr(plane, "executor", None), "writes", None)
        if writes is None or id(writes) in seen or d_of(plane) not in writing:
            continue
        seen.add(id(writes))  # one per device: its queues and disks on one file share it
        st = writes.state  # writegate.WG_*: LEFT_DIRTY 4, LEFT_HELD 5, CLOSED 3, SLEPT 2
        for i, v in enumerate((st[4] + st[5], st[3], st[2], writes.refused_writes)):
            gate[i] += v
    write_mib_s = sum(results[d].completed for d in writing) * write_pages * BLOCK / seconds / (1 << 20)
    per_disk = [results[d].completed / seconds for d in range(n_disks)]
    total = sum(per_disk)
    jain = _jain(per_disk)
    p99s = sorted(results[d].p99_us for d in range(n_disks))
    n = max(1, served)
    within = [_jain([per_disk[d] for d in share]) for share in shares]
    return Row(
        total,
        cpu / n * 1e6,
        percentile(p99s, 50),
        p99s[-1],
        jain,
        wakeups=sum(dp.stats.wakeups for dp in planes) / n,
        polls=sum(dp.stats.polls for dp in planes) / n,
        jain_within=min(within),
        caught=sum(dp.stats.polls_caught for dp in planes) / max(1, sum(dp.stats.polls for dp in planes)),
        engine_vcs=(e1[1] - e0[1]) / n,
        engine_ivcs=(e1[2] - e0[2]) / n,
        frontend_cpu_us=(f1[0] - f0[0]) / n * 1e6,
        frontend_vcs=(f1[1] - f0[1]) / n,
        engine_wait_us=(e1[3] - e0[3]) / n / 1e3,
        frontend_wait_us=(f1[3] - f0[3]) / n / 1e3,
        group_run_us=(g1[0] - g0[0]) / n / 1e3,
        group_wait_us=(g1[1] - g0[1]) / n / 1e3,
        hog_share=(h1 - h0) / (t1 - t0) if hog else -1.0,
        hog_stint_us=(h1 - h0) / max(p1 - p0, 1) / 1e3 if hog else 0.0,
        found_shared=s1 - s0,
        write_mib_s=write_mib_s,
        read_iops=sum(results[d].completed for d in readers) / seconds,
        read_p99_median_us=percentile(read_p99s, 50),
        read_p99_worst_us=read_p99s[-1],
        gate=tuple(gate),
    )


def d_of(plane: DataPlane | RemoteQueue) -> int:
    """The disk a bench data plane serves (its name: bench-D-qQ)."""
    return int(getattr(plane, "name", "bench--1-q0").split("-")[1])


@contextlib.contextmanager
def _dirty_limit(mib: int) -> Iterator[None]:
    """vm.dirty_bytes at `mib` MiB and dirty_background_bytes at half of it for the run (0: left as
    it is); the limits as they were afterwards (a ratio or a byte count, whichever was set)."""
    if not mib:
        yield
        return
    vm = Path("/proc/sys/vm")
    pairs = (("dirty_bytes", "dirty_ratio"), ("dirty_background_bytes", "dirty_background_ratio"))
    saved = {n: (vm / n).read_text().strip() for pair in pairs for n in pair}
    try:
        (vm / "dirty_background_bytes").write_text(str(mib << 19))
        (vm / "dirty_bytes").write_text(str(mib << 20))
        yield
    finally:
        for by_bytes, by_ratio in pairs:  # writing one of a pair zeroes the other
            name = by_bytes if saved[by_bytes] != "0" else by_ratio
            (vm / name).write_text(saved[name])


def _writer_image(image: Path, d: int) -> Path:
    """Writer disk d's own copy of the image (made once, written back): a writer shares no file
    with the readers, as guests' disks do not (on xfs a throttled buffered write holds its file's
    IOLOCK, which a NOWAIT read of that file then meets)."""
    path = image.with_name(f"writer{d}.img")
    if not path.exists():
        with open(image, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    return path


def _print_writes(r: Row) -> None:
    """--writers: a row's second line."""
    med, worst = r.read_p99_median_us / 1000, r.read_p99_worst_us / 1000
    left, closed, slept, refused = r.gate
    print(
        f"  {'':>8} {'':>9} writers {r.write_mib_s:.0f} MiB/s; readers {r.read_iops:.0f} IOPS, p99 median"
        f" {med:.2f} ms worst {worst:.2f} ms; gate: handed off {left}, closed {closed}, slept {slept},"
        f" refused {refused}",
        flush=True,
    )


def _fs_name(path: Path) -> str:
    """The filesystem type of the mount holding `path` (/proc/self/mounts: its longest prefix)."""
    best, kind = "", "?"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        where, fs = line.split()[1:3]
        if str(path).startswith(where.rstrip("/") + "/") and len(where) > len(best):
            best, kind = where, fs
    return kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disks", default="2,8,32,100")
    ap.add_argument("--queues", default="1,2")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=4, help="requests outstanding per disk (over its queues)")
    ap.add_argument("--frontends", type=int, default=2, help="frontend processes")
    ap.add_argument("--io-workers", type=int, default=4, help="I/O threads per queue (the engine's default)")
    ap.add_argument(
        "--engine",
        default="auto,threads",
        help="threads, workers:N (N worker processes, a thread per ring), workers-groups:N (N worker"
        " processes, each one ring group: --workers N --ring-groups), groups:N (the threads"
        " engine's rings in N ring groups of this process, always) and/or auto (the engine's"
        " default: a group pinned to each CPU of the engine's, serving once there are more rings"
        " than those CPUs: RingGroups.per_cpu), comma-separated",
    )
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument(
        "--persistent",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the frontends negotiate persistent grants, as Linux blkfront does with this engine (the"
        " native pass and loop serve them); --no-persistent: the local transport's grant table mapped"
        " whole, the pure-Python pass (the rows before session 15)",
    )
    ap.add_argument(
        "--group-yield",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="set backend/ringgroup.py's YIELD (the group's refill poll yields its CPU to a task"
        " runnable on it) for an A/B in one tree; default: the tree's own",
    )
    ap.add_argument(
        "--group-pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="groups:N's group i runs on the i-th CPU of the affinity mask only (RingGroup's cpu)",
    )
    ap.add_argument(
        "--frontend-cpus",
        default=None,
        metavar="LIST",
        help="run the frontend processes on these CPUs (comma-separated) and the engine (this process's"
        " threads made from then on, its worker processes, its groups) on the others: guests on vCPUs"
        " of their own, as on a host that pins dom0's; default: every process on every CPU",
    )
    ap.add_argument(
        "--frontend-order",
        choices=("shuffled", "fd"),
        default="shuffled",
        help="the order a frontend process takes its ready rings in: shuffled each time (default), or"
        " fd order (the rows before session 16: it favours the first disks of each process)",
    )
    ap.add_argument(
        "--hog",
        default=None,
        metavar="CPU[,setsid]",
        help="a CPU-bound process pinned to CPU for the whole run, in this session or (setsid) its own;"
        " its share of that CPU is reported per row",
    )
    ap.add_argument(
        "--group-shared-ns",
        type=int,
        default=None,
        help="set backend/ringgroup.py's SHARED_NS (0: a group's poll goes on beside another task) for an"
        " A/B in one tree; default: the tree's own",
    )
    ap.add_argument(
        "--group-slice-ns",
        type=int,
        default=None,
        help="set backend/ringgroup.py's SLICE_NS (0: the kernel's base slice) for an A/B in one tree",
    )
    ap.add_argument(
        "--writers",
        type=int,
        default=0,
        help="the first N disks of each row write instead of read (--frontend native only): random"
        " writes of --write-pages pages, stamped as the image is; rows then add the writers' MiB/s, the"
        " readers' IOPS and p99, and the writers' write gate counts (issue 20, write isolation)",
    )
    ap.add_argument("--write-pages", type=int, default=1, help="pages per write (direct segments: 1-11)")
    ap.add_argument(
        "--dir",
        default=None,
        help="make the image (and the frontends' socket) in this directory: its filesystem decides"
        " how buffered writes may wait (backend/writegate.py); default: a temporary directory",
    )
    ap.add_argument(
        "--dirty-limit-mib",
        type=int,
        default=0,
        help="lower vm.dirty_bytes to this (background: half) for the run, restored after: a throttled"
        " writer (root)",
    )
    ap.add_argument(
        "--frontend",
        default="python",
        help="python (the frontend processes' own Python loop), native (their hot loop in C,"
        " bench/native_frontend.c, compiled at run time: it checks every answer's data), or both,"
        " comma-separated (rows of each in one run)",
    )
    args = ap.parse_args()
    kinds = args.frontend.split(",")
    if not kinds or set(kinds) - {"python", "native"}:
        ap.error("--frontend takes python and/or native")
    frontend_cpus = {int(c) for c in args.frontend_cpus.split(",")} if args.frontend_cpus else None
    if frontend_cpus:
        engine_cpus = os.sched_getaffinity(0) - frontend_cpus
        if not engine_cpus or not frontend_cpus <= os.sched_getaffinity(0):
            ap.error("--frontend-cpus must name some of this process's CPUs and leave it at least one")
        os.sched_setaffinity(0, engine_cpus)  # before any thread or worker is made: they inherit it
    if args.group_yield is not None:
        from xenblockctl.backend import ringgroup

        ringgroup.YIELD = args.group_yield  # a base tree may lack it: set, it is not read there
    for knob, value in (("SHARED_NS", args.group_shared_ns), ("SLICE_NS", args.group_slice_ns)):
        if value is not None:
            from xenblockctl.backend import ringgroup

            setattr(ringgroup, knob, value)
    if not 1 <= args.write_pages <= 11:
        ap.error("--write-pages takes 1 to 11")
    with (
        tempfile.TemporaryDirectory(prefix="xbc-bench-disks-", dir=args.dir) as tmp,
        _hog(args.hog) as hog,
        _dirty_limit(args.dirty_limit_mib),
    ):
        image = Path(tmp, "disk.img")
        make_image(image, args.size_mib << 20)
        binary = build_native_frontend(Path(tmp)) if "native" in kinds else None
        with open(image, "rb") as f:
            while f.read(1 << 20):  # warm the page cache
                pass
        transport = LocalTransport(str(Path(tmp, "grants.sock")))
        try:
            cpus = len(os.sched_getaffinity(0))
            where = f" on CPUs {args.frontend_cpus} (the engine on the other {cpus})" if frontend_cpus else ""
            if args.writers:
                print(
                    f"the first {args.writers} disks of each row write {args.write_pages * 4} KiB at random"
                    f" offsets instead, the image on {_fs_name(image)}"
                    + (f", vm.dirty_bytes {args.dirty_limit_mib} MiB" if args.dirty_limit_mib else "")
                )
            print(
                f"4 KiB random reads, QD {args.qd} per disk, page cache warm, {args.seconds:.0f} s per row,"
                f" {args.frontends} frontend processes{where}, {cpus} CPUs, {args.io_workers} I/O threads per"
                f" queue, persistent grants {'on' if args.persistent else 'off'},"
                f" load average {os.getloadavg()[0]:.1f}"
                + (f", a CPU-bound process on CPU {args.hog}" if hog else "")
            )
            print(
                f"  {'frontend':>8} {'engine':>9} {'disks':>5} {'queues':>6} {'aggregate IOPS':>15}"
                f" {'engine CPU/req':>15}"
                f" {'p99 median disk':>16} {'p99 worst disk':>15} {'Jain':>6} {'within':>6}"
                "   per request: wake-ups, engine cs vol/invol, frontend CPU, frontend cs, polls (caught),"
                " µs waiting for a CPU engine/frontends, ring groups' threads µs run/wait"
                + (
                    ", the hog's share of its CPU and its mean run between preemptions, groups' polls"
                    " that found their CPU taken"
                    if hog
                    else ""
                )
            )
            for n in (int(x) for x in args.disks.split(",")):
                for q in (int(x) for x in args.queues.split(",")):
                    for mode, kind in ((m, k) for m in args.engine.split(",") for k in kinds):
                        pool = None
                        groups: RingGroups | None = None
                        if mode.startswith(("workers:", "workers-groups:")):
                            pool = WorkerPool(
                                int(mode.split(":")[1]),
                                transport,
                                Journal("bench-engine"),
                                ring_groups=mode.startswith("workers-groups:"),
                            )
                        elif mode.startswith("groups:"):
                            # here, not at the top: the bench also runs on trees without ring groups
                            from xenblockctl.backend.ringgroup import RingGroup, RingGroups

                            mask = sorted(os.sched_getaffinity(0))
                            # a base tree's RingGroup may take no cpu: passed only when asked
                            pins: list[dict[str, Any]] = [
                                {"cpu": mask[i % len(mask)]} if args.group_pin else {}
                                for i in range(int(mode.split(":")[1]))
                            ]
                            groups = RingGroups(
                                [RingGroup(f"bench-group{i}", **pin) for i, pin in enumerate(pins)]
                            )
                        elif mode == "auto":
                            from xenblockctl.backend.ringgroup import RingGroups

                            groups = RingGroups.per_cpu(always=False, name="bench-group")
                        try:
                            r = run(
                                transport,
                                image,
                                n,
                                q,
                                qd=args.qd,
                                seconds=args.seconds,
                                frontends=args.frontends,
                                io_workers=args.io_workers,
                                pool=pool,
                                groups=groups,
                                persistent=args.persistent,
                                frontend_cpus=frontend_cpus,
                                shuffled=args.frontend_order == "shuffled",
                                hog=hog,
                                native=binary if kind == "native" else None,
                                writers=min(args.writers, n),
                                write_pages=args.write_pages,
                            )
                        finally:
                            if pool is not None:
                                pool.close()
                            for group in groups.groups if groups else ():
                                group.close()
                        print(
                            f"  {kind:>8} {mode:>9} {n:>5} {q:>6} {r.iops:>15.0f} {r.engine_cpu_us:>12.1f} µs"
                            f" {r.p99_median_us / 1000:>13.2f} ms {r.p99_worst_us / 1000:>12.2f} ms"
                            f" {r.jain:>6.3f} {r.jain_within:>6.3f}"
                            f"   {r.wakeups:.3f} {r.engine_vcs:.3f}/{r.engine_ivcs:.3f}"
                            f" {r.frontend_cpu_us:.1f} µs {r.frontend_vcs:.3f}"
                            f" {r.polls:.3f} ({r.caught:.0%})"
                            f"  wait {r.engine_wait_us:.2f}/{r.frontend_wait_us:.2f}"
                            f"  groups {r.group_run_us:.2f}/{r.group_wait_us:.2f}"
                            + (
                                f"  hog {r.hog_share:.0%} in {r.hog_stint_us / 1000:.2f} ms runs"
                                f" shared {r.found_shared}"
                                if hog
                                else ""
                            ),
                            flush=True,
                        )
                        if args.writers:
                            _print_writes(r)
        finally:
            transport.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
