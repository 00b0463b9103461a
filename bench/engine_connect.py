"""Issue 20: what one backend costs the engine from creation to Connected, and through the
frontend reconnect every pvgrub boot does (GRUB's blkfront closes, Linux's connects).

The engine runs in this process on a thread (as tests/fixtures/engine.py's engine_inproc) against
the embedded xenstored, over the local transport with grant copy (the Xen lane's path); a real loop
device is the disk. Each cycle walks one backend through the phases the lane's pvgrub.sh stamps:

  create     libxl's transaction (backend + frontend dirs)      -> `opened`=0 (engine's InitWait)
  publish    the block script's physical-device + luid          -> `opened`=1 (device verified)
             (with --script: the real block script's `add`, to its exit: libxl's wait)
  connect    frontend nodes + state 3 (Initialised)             -> backend state 4 (Connected)
  close      frontend state 6 (GRUB's blkfront leaves)          -> backend state 6 (ring drained)
  reinit     frontend state 1 (Linux's blkfront starts)         -> backend state 2 (InitWait)
  reconnect  frontend nodes + state 3                           -> backend state 4
  detach     online=0 + state 5 (libxl), frontend state 6       -> backend state 6

and reports, per phase, the wall time from the trigger's start to the backend's answer, the same
from the trigger's first write (`from commit`: both ends stamped at their watch events' receipt on
a second connection, as the lane's xenstore-watch stamps them; the engine's part of the phase), the
engine's xenbus thread CPU, and the xenstore round trips (exchanges), requests and transactions
the engine made. The CPU and the request counts are what the lane's dom0 pays ~15x
slower under TCG (bench/README.md "Issue 20"); the wall on this host is mostly scheduling.

    .venv/bin/python -m bench.engine_connect [--cycles N]

For a baseline, run the same file from another checkout (it uses only what main has). Needs root
(loop devices). The CPU is the xenbus thread's plus its xenstore connection's reader thread's."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fixtures.libxl import Libxl
from tests.fixtures.xenstore import embedded_xenstored
from tests.support import libxl_stub
from xenblockctl.backend.engine import Engine
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.transport.local import LocalTransport
from xenblockctl.backend.xenbus import EngineConfig
from xenblockctl.journal import Journal
from xenblockctl.kernel import loop
from xenblockctl.xenstore import wire
from xenblockctl.xenstore.client import XenStore

PHASES = ("create", "publish", "connect", "close", "reinit", "reconnect", "detach")


class Counter:
    """Wraps the engine's xenstore link: exchanges (round trips), requests, transactions."""

    def __init__(self, store: XenStore) -> None:
        link: Any = store._link
        self.exchanges = 0
        self.requests = 0
        self.transactions = 0
        exchange, stream = link.exchange, link.exchange_stream

        def counted(requests: Any, deadline: float) -> Any:
            self.exchanges += 1
            self.requests += len(requests)
            self.transactions += sum(1 for r in requests if r[0] == wire.TRANSACTION_START)
            return exchange(requests, deadline)

        def counted_stream(requests: Any, follow: Any, deadline: float) -> Any:
            self.exchanges += 1
            self.requests += len(requests)
            return stream(requests, follow, deadline)

        link.exchange = counted
        link.exchange_stream = counted_stream

    def snapshot(self) -> tuple[int, int, int]:
        return self.exchanges, self.requests, self.transactions


class Watcher:
    """A second connection that stamps, on its own thread, when the trigger's first write arrives
    and when a backend node reaches a value: the lane's stamper (pvgrub.sh's xenstore-watch) on the
    host, so `from commit` is the engine's part of a phase, with the watch delivery on both ends."""

    def __init__(self, sock: str) -> None:
        self.store = XenStore.connect(sock, timeout=10)

    def wait(
        self, watched: list[str], trigger: Callable[[], object], path: str, values: tuple[str, ...]
    ) -> tuple[float, float]:
        """Watch `watched`, run `trigger`, and return (first event after it, the event after which
        `path` read one of `values`), both perf_counter() at the event's receipt."""
        token = f"w{time.monotonic_ns()}"
        for w in watched:
            self.store.watch(w, token)
        try:
            self.store.read_optional(path)  # the watches' first events arrive before this reply
            self.store.drain_watches()
            stamps: list[float] = []
            seen = threading.Event()

            def stamp() -> None:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    if self.store.wait_watch(0.5) is None:
                        continue
                    stamps.append(time.perf_counter())
                    if self.store.read_optional(path) in values:
                        stamps.append(stamps[-1])
                        seen.set()
                        return

            thread = threading.Thread(target=stamp, name="xbc-bench-watcher", daemon=True)
            thread.start()
            trigger()
            thread.join(25)
            if not seen.is_set():
                raise TimeoutError(f"{path} never became {values}: {self.store.read_optional(path)}")
            return stamps[0], stamps[-1]
        finally:
            for w in watched:
                self.store.unwatch(w, token)
            self.store.drain_watches()


Results = dict[str, dict[str, list[float]]]


def empty() -> Results:
    return {p: {"wall": [], "commit": [], "cpu": [], "rt": [], "req": [], "tx": []} for p in PHASES}


def run(cycles: int, data_pages: str, script: bool) -> tuple[Results, Results]:
    """(the engine's first backend, the next `cycles`): a fresh engine's first connect pays for
    whatever is imported or built on first use, as the lane's first pvgrub boot does."""
    results, first = empty(), empty()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"xbc-bench-connect-{os.getpid()}"
    workdir.mkdir()
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    sock_path = f"/tmp/xbc-bench-connect-{os.getpid()}.sock"
    try:
        with embedded_xenstored() as xsd:
            local = LocalTransport(sock_path, data_pages=data_pages)
            store = XenStore.connect(xsd.socket_path)
            counter = Counter(store)
            config = EngineConfig(local)
            engine = Engine(store, config, journal=Journal("xbc-bench-engine", stderr=False))
            ready = threading.Event()
            thread = threading.Thread(target=engine.run, args=(ready,), name="xbc-bench-engine", daemon=True)
            thread.start()
            try:
                assert ready.wait(20), "engine did not start"
                assert thread.ident is not None
                router: Any = store._link
                clocks = []
                for t in (thread, router._router.thread):
                    assert t.ident is not None  # both threads run
                    clocks.append(time.pthread_getcpuclockid(t.ident))
                libxl = XenStore.connect(xsd.socket_path, timeout=10)
                watcher = Watcher(xsd.socket_path)
                harness = Libxl(xsd, workdir) if script else None
                rig = Rig(libxl, watcher, local, counter, clocks, image, harness)
                for cycle in range(cycles + 1):  # cycle 0: the engine's first backend, reported apart
                    one_cycle(rig, cycle, results if cycle else first)
                libxl.close()
                watcher.store.close()
                if harness is not None:
                    harness.close()
            finally:
                engine.stop()
                thread.join(60)
                local.close()
                store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return first, results


@dataclass
class Rig:
    libxl: XenStore
    watcher: Watcher
    local: LocalTransport
    counter: Counter
    clocks: list[int]
    image: Path
    script: Libxl | None

    def cpu(self) -> float:
        return sum(time.clock_gettime(c) for c in self.clocks)


def one_cycle(rig: Rig, cycle: int, results: Results) -> None:
    libxl, watcher, counter, image = rig.libxl, rig.watcher, rig.counter, rig.image
    domid, devid = 100 + cycle, 51712
    be = libxl_stub.Backend(domid, devid)
    fe_path = f"/local/domain/{domid}/device/vbd/{devid}"
    # without --script the bench binds the loop device the script would have
    device = (
        None
        if rig.script
        else loop.attach_file(str(image), read_only=False, tag=f"xenblockctl:{domid}:{devid}")
    )

    def phase(name: str, trigger: Callable[[], object], path: str, values: tuple[str, ...]) -> None:
        cpu0, (rt0, req0, tx0) = rig.cpu(), counter.snapshot()
        start = time.perf_counter()
        first, end = watcher.wait([be.path, fe_path], trigger, path, values)
        if rig.script and name == "publish":
            end = time.perf_counter()  # libxl's wait: to the script's exit
        time.sleep(0.05)  # let the engine finish the pass that wrote the answer (its CPU, its requests)
        cpu1, (rt1, req1, tx1) = rig.cpu(), counter.snapshot()
        r = results[name]
        r["wall"].append((end - start) * 1e3)
        r["commit"].append((end - first) * 1e3)
        r["cpu"].append((cpu1 - cpu0) * 1e3)
        r["rt"].append(rt1 - rt0)
        r["req"].append(req1 - req0)
        r["tx"].append(tx1 - tx0)

    front: list[LocalFrontend] = []

    def frontend_up() -> Callable[[], None]:
        """A new ring registered with the transport (as a booting blkfront grants its pages before
        it writes anything), and the trigger: its nodes and Initialised in one transaction."""
        ring = LocalFrontend(rig.local.socket_path, domid)
        front.append(ring)
        nodes = {f"{fe_path}/{name}": value for name, value in ring.xenstore_nodes().items()}
        return lambda: libxl.write_many(nodes | {f"{fe_path}/state": "3"})

    def frontend_state(value: str) -> Callable[[], None]:
        return lambda: libxl.write(f"{fe_path}/state", value)

    try:
        phase(
            "create",
            lambda: libxl_stub.create_backend(libxl, domid, devid, str(image), "w", engine=False),
            be.node("opened"),
            ("0",),
        )
        if rig.script is not None:
            harness = rig.script

            def add() -> None:
                result = harness.run("add", be)
                assert result.returncode == 0, result.stderr

            phase("publish", add, be.node("opened"), ("1",))
        else:
            assert device is not None
            identity = device.identity
            nodes = {
                be.node("physical-device-luid"): identity.luid,
                be.node("physical-device"): identity.physical_device,
            }
            phase("publish", lambda: libxl.write_many(nodes), be.node("opened"), ("1",))
        phase("connect", frontend_up(), be.node("state"), ("4",))
        libxl.write(f"{fe_path}/state", "4")
        time.sleep(0.05)
        phase("close", frontend_state("6"), be.node("state"), ("6",))
        front.pop().close()
        phase("reinit", frontend_state("1"), be.node("state"), ("2",))
        phase("reconnect", frontend_up(), be.node("state"), ("4",))
        libxl.write(f"{fe_path}/state", "4")
        time.sleep(0.05)

        def detach() -> None:
            libxl.write_many({be.node("online"): "0", be.node("state"): "5"})
            libxl.write(f"{fe_path}/state", "6")

        phase("detach", detach, be.node("state"), ("6",))
    finally:
        for ring in front:
            ring.close()
        libxl.rm(be.path)
        libxl.rm(f"/local/domain/{domid}")
        libxl.rm(f"/libxl/{domid}")
        if device is not None:
            device.close()
        elif rig.script is not None:
            rig.script.run("remove", be)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--data-pages", default="copy", choices=("copy", "map", "table"))
    parser.add_argument("--script", action="store_true", help="publish with the real block script's add")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    first, results = run(args.cycles, args.data_pages, args.script)
    how = "block script" if args.script else "direct writes"
    print(
        f"engine connect path, {args.cycles} cycles, publish by {how},"
        f" load average {load:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'phase':<14} {'wall ms p50':>11} {'from commit':>11} {'cpu ms p50':>10} {'cpu mean':>9}"
        f" {'round trips':>11} {'requests':>9} {'tx':>4}"
    )
    rows = [(name, results[name]) for name in PHASES] + [(f"1st {name}", first[name]) for name in PHASES]
    for name, r in rows:
        print(
            f"{name:<14} {statistics.median(r['wall']):>11.2f} {statistics.median(r['commit']):>11.2f}"
            f" {statistics.median(r['cpu']):>10.2f}"
            f" {statistics.fmean(r['cpu']):>9.2f} {statistics.median(r['rt']):>11.0f}"
            f" {statistics.median(r['req']):>9.0f} {statistics.median(r['tx']):>4.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
