"""Queues served by worker processes (backend/workers.py, `xenblockctl backend --workers N`): each
queue runs in a worker's own interpreter with its own copy of the device fd; the engine keeps
xenstore and the devices. A worker killed fails the devices it served, logged, and no other; a
teardown waits for every queue's worker to say it drained. Real loop devices, the embedded
xenstored, the engine on a thread of the test, real worker processes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.engine import (
    REPO,
    InprocEngine,
    attach_guest,
    check_stuck_queue_holds_the_device,
    detach_guest,
    wait_for,
)
from tests.fixtures.kernel import FreezableFs, ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl
from xenblockctl.backend import blkif, xenbus
from xenblockctl.backend.cpus import engine_cpus
from xenblockctl.backend.engine import Engine
from xenblockctl.backend.transport.local import LocalTransport
from xenblockctl.backend.workers import RemoteQueue, WorkerPool
from xenblockctl.backend.xenbus import EngineConfig
from xenblockctl.journal import Journal
from xenblockctl.toolstack.daemons import ReadyDaemon
from xenblockctl.xenstore.client import XenStore

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


@pytest.fixture
def engine_workers(libxl: Libxl, transport_path: str) -> Iterator[tuple[InprocEngine, WorkerPool, list[str]]]:
    path = transport_path
    local = LocalTransport(path)
    store = XenStore.connect(libxl.xenstored.socket_path)
    logged: list[str] = []
    journal = Journal("xbc-test-engine", stderr=True)
    original = journal.error

    def error(message: str, **fields: object) -> None:
        logged.append(message)
        original(message, **fields)

    journal.error = error  # type: ignore[method-assign]
    pool = WorkerPool(2, local, journal)
    engine = Engine(store, EngineConfig(local, max_queues=2, worker_pool=pool), journal=journal)
    ready = threading.Event()
    thread = threading.Thread(target=engine.run, args=(ready,), name="xbc-test-engine", daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "engine did not start"
        yield InprocEngine(engine, local, path), pool, logged
    finally:
        engine.stop()
        thread.join(60)
        workers = [w.proc for w in pool.workers]
        pool.close()
        local.close()
        store.close()
    assert not thread.is_alive(), "engine thread did not stop"
    assert all(proc.poll() is not None for proc in workers), "a worker outlived the pool"


def test_queues_are_served_by_worker_processes(
    libxl: Libxl, engine_workers: tuple[InprocEngine, WorkerPool, list[str]], make_image: ImageFactory
) -> None:
    eng, _pool, _logged = engine_workers
    image = make_image()
    be, guest = attach_guest(libxl, eng.transport, image, 50, queues=2)
    try:
        queues = eng.device(50).dataplanes
        assert len(queues) == 2
        assert all(isinstance(q, RemoteQueue) for q in queues)
        pids = {q.worker.proc.pid for q in queues}  # type: ignore[union-attr]
        assert len(pids) == 2, "the two queues went to the two workers"
        assert os.getpid() not in pids
        for q, ring in enumerate(guest.rings):
            assert ring.write(8 * q, f"queue {q}".encode().ljust(512, b"\0")) == blkif.RSP_OKAY
        for ring in guest.rings:
            assert ring.read(0, 512)[:7] == b"queue 0"
            assert ring.read(8, 512)[:7] == b"queue 1"
        # each worker holds its own copy of what the I/O goes to (its fd: the loop device's backing
        # file, backend/loopfile.py), released when the queue ends
        img = os.stat(image)
        for pid in pids:
            held = {
                (st.st_dev, st.st_ino)
                for st in (os.stat(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
            }
            assert (img.st_dev, img.st_ino) in held, f"worker {pid} has no fd of the backing file"
    finally:
        detach_guest(libxl, be, guest)
    assert wait_for(lambda: bound_loops_under(image.parent) == {}, 10), "every copy of the device closed"


def test_a_killed_worker_fails_only_its_devices(
    libxl: Libxl, engine_workers: tuple[InprocEngine, WorkerPool, list[str]], make_image: ImageFactory
) -> None:
    eng, pool, logged = engine_workers
    be_a, guest_a = attach_guest(libxl, eng.transport, make_image("a.img"), 51)
    be_b, guest_b = attach_guest(libxl, eng.transport, make_image("b.img"), 52)
    (queue_a,) = eng.device(51).dataplanes
    (queue_b,) = eng.device(52).dataplanes
    assert isinstance(queue_a, RemoteQueue)
    assert isinstance(queue_b, RemoteQueue)
    assert queue_a.worker is not queue_b.worker, "one device per worker (least loaded first)"
    victim = queue_a.worker.proc.pid
    os.kill(victim, signal.SIGKILL)
    try:
        error_node = f"/local/domain/0/error/{be_a.relative}/error"
        assert wait_for(lambda: libxl.store.read_optional(error_node) is not None), libxl.nodes(be_a)
        assert f"worker process {victim} died" in (libxl.store.read_optional(error_node) or "")
        assert wait_for(lambda: libxl.nodes(be_a).get("state") == "5"), libxl.nodes(be_a)
        assert any(f"(pid {victim})" in line and "failing" in line for line in logged), logged
        # the other device, on the other worker, never noticed
        assert guest_b.ring is not None
        assert guest_b.ring.write(0, b"b lives".ljust(512, b"\0")) == blkif.RSP_OKAY
        assert guest_b.ring.read(0, 512)[:7] == b"b lives"
        assert libxl.nodes(be_b)["state"] == "4"
        # a disk attached afterwards is served (the dead worker is replaced)
        be_c, guest_c = attach_guest(libxl, eng.transport, make_image("c.img"), 53)
        try:
            assert guest_c.ring is not None
            assert guest_c.ring.write(0, b"c".ljust(512, b"\0")) == blkif.RSP_OKAY
            assert victim not in {w.proc.pid for w in pool.workers}
        finally:
            detach_guest(libxl, be_c, guest_c)
    finally:
        guest_a.close()
        guest_a.store.close()
        libxl.store.write_many({be_a.node("online"): "0", be_a.node("state"): "5"})
        assert wait_for(lambda: libxl.nodes(be_a).get("state") == "6"), libxl.nodes(be_a)
        assert libxl.run("remove", be_a).returncode == 0
        detach_guest(libxl, be_b, guest_b)


def test_teardown_waits_for_the_workers_to_drain(
    libxl: Libxl,
    engine_workers: tuple[InprocEngine, WorkerPool, list[str]],
    freezable_fs: FreezableFs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eng, _pool, _logged = engine_workers
    monkeypatch.setattr(xenbus, "DRAIN_TIMEOUT", 0.5)
    monkeypatch.setattr(xenbus, "FRONTEND_CLOSE_GRACE", 0.2)
    check_stuck_queue_holds_the_device(libxl, eng, freezable_fs, 54)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_engine_with_workers_stops_or_dies_without_leaks(
    libxl: Libxl, make_image: ImageFactory, tmp_path: Path, transport_path: str, how: str
) -> None:
    """`xenblockctl backend --workers 2`: SIGTERM tears every device down and the workers exit with
    the engine (status 0); SIGKILL leaves the workers to drain their queues and exit on their own,
    and the last copy of the device fd goes with them: nothing stays bound."""
    transport = transport_path
    argv = [sys.executable, "-m", "xenblockctl", "backend", "--transport", f"local:{transport}"]
    argv += ["--xenstore", libxl.xenstored.socket_path, "--workers", "2", "--max-queues", "2"]
    daemon = ReadyDaemon("engine", argv, "engine ready", tmp_path / "engine.log", timeout=60, cwd=REPO)
    image = make_image()
    try:
        workers = _children(daemon.proc.pid)
        assert len(workers) == 2, workers
        be, guest = attach_guest(libxl, transport, image, 56, queues=2)
        assert len(guest.rings) == 2
        for q, ring in enumerate(guest.rings):
            assert ring.write(8 * q, b"w".ljust(512, b"\0")) == blkif.RSP_OKAY
        if how == "sigterm":
            assert daemon.stop() == 0, (tmp_path / "engine.log").read_text()[-2000:]
        else:
            daemon.proc.kill()
            daemon.proc.wait(10)
        assert wait_for(lambda: all(_gone(pid) for pid in workers), 30), "a worker outlived the engine"
        guest.close()
        guest.store.close()
        if how == "sigkill":
            assert wait_for(lambda: bound_loops_under(image.parent) == {}, 10), "a device copy leaked"
        else:
            libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
            assert libxl.run("remove", be).returncode == 0
            assert wait_for(lambda: bound_loops_under(image.parent) == {}, 10), "a device copy leaked"
    finally:
        daemon.proc.kill()
        daemon.stop()


@pytest.mark.parametrize(
    "case",
    [
        (["--workers", "2"], "threads", None),
        (["--workers", "2", "--ring-groups"], "groups", "one ring group per worker process"),
        (
            [],
            None,
            "ring groups (one native loop on each of CPUs {cpus} serves the rings, once more than {n}",
        ),
        (["--no-ring-groups"], None, None),
        (
            ["--ring-groups"],
            None,
            "ring groups (one native loop on each of CPUs {cpus} serves the rings, always",
        ),
        (["--ring-groups", "--no-native-loop"], None, "--ring-groups ignored (the native passes are off)"),
    ],
)
def test_ring_groups_are_the_admins_choice(
    libxl: Libxl,
    make_image: ImageFactory,
    tmp_path: Path,
    transport_path: str,
    case: tuple[list[str], str | None, str | None],
) -> None:
    """Ring groups serve by default once the rings outnumber the engine's CPUs (RingGroups;
    bench/README.md, issue 20, auto25), always with `--ring-groups`, never with `--no-ring-groups`
    or in worker processes unless asked: each worker is told its shape on its command line, the
    engine says what it made (a group on each CPU, and when it serves), or why it could not, and a
    guest's I/O (two queues: two rings, no more than the CPUs) is served either way."""
    flags, shape, logged = case  # the engine's flags, each worker's shape, what the engine logs
    argv = [sys.executable, "-m", "xenblockctl", "backend", "--transport", f"local:{transport_path}"]
    argv += ["--xenstore", libxl.xenstored.socket_path, "--max-queues", "2", *flags]
    log = tmp_path / "engine.log"
    daemon = ReadyDaemon("engine", argv, "engine ready", log, timeout=60, cwd=REPO)
    image = make_image()
    try:
        if shape is not None:
            workers = _children(daemon.proc.pid)
            assert len(workers) == 2, workers
            for pid in workers:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    assert f.read().split(b"\0")[-2] == shape.encode(), f"worker {pid}'s shape"
        text = log.read_text()
        if logged is None:
            assert "ring group" not in text, text[-2000:]
        else:
            cpus = engine_cpus()  # the engine's, inherited from this process
            assert logged.format(cpus=",".join(map(str, cpus)), n=len(cpus)) in text, text[-2000:]
        be, guest = attach_guest(libxl, transport_path, image, 57, queues=2)
        try:
            for q, ring in enumerate(guest.rings):
                assert ring.write(8 * q, f"queue {q}".encode().ljust(512, b"\0")) == blkif.RSP_OKAY
            for ring in guest.rings:
                assert ring.read(8, 512)[:7] == b"queue 1"
        finally:
            detach_guest(libxl, be, guest)
        assert wait_for(lambda: bound_loops_under(image.parent) == {}, 10), "a device copy leaked"
    finally:
        assert daemon.stop() == 0, log.read_text()[-2000:]
