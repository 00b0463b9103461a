"""libxl, xenstored and a consumer inside the dm lane's guest, for the block-script scenarios.

The guest cannot use tests/fixtures/libxl.py (pytest fixtures), so this is its pytest-free
counterpart, kept to what the scenarios need; the libxl-like pieces themselves (directories,
environment, consumer) are tests/support/libxl_stub.py, shared with that fixture:

  * the embedded xenstored as a real process (`python -m xenblockctl xenstored --socket ...`),
    started once per boot and stopped at exit;
  * `Lane`: writes backend/frontend directories as libxl does, runs hotplug/block-xenblockctl as a
    subprocess with libxl's environment, and plays an engine-like consumer that opens the published
    major:minor, checks the luid, writes `opened`=1 and holds the device until released;
  * everything a scenario started (scripts, consumers, engine, backend directories) is undone by
    `Lane.close()`, which the scenarios call in `finally` (via `with`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support import libxl_stub
from tests.support.libxl_stub import REPO, SCRIPT, Backend, Consumer
from xenblockctl.toolstack.daemons import DaemonNotReady, ReadyDaemon
from xenblockctl.toolstack.vbd_dirs import delete_vbd
from xenblockctl.xenstore.client import XenStore

__all__ = ["SCRIPT", "Backend", "Consumer", "Lane", "Paused", "xenstored_socket"]

#: Python start-up under TCG takes seconds: generous, but bounded.
START_TIMEOUT = 60.0
SCRIPT_TIMEOUT = 60.0


class _Xenstored:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xbc-xs-", dir="/tmp")
        self.socket = os.path.join(self.dir, "socket")
        argv = [sys.executable, "-m", "xenblockctl", "xenstored", "--socket", self.socket]
        log = Path(self.dir, "stderr")
        try:
            self.daemon = ReadyDaemon(
                "xenstored", argv, "xenstored ready", log, timeout=START_TIMEOUT, cwd=REPO
            )
        except DaemonNotReady as exc:
            text = log.read_text(errors="replace")[-2000:]
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(f"{exc} {text}") from exc

    def alive(self) -> bool:
        return self.daemon.alive()

    def stop(self) -> None:
        self.daemon.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


#: The boot's one xenstored, in a holder rather than a module global rebound from a function.
_shared: dict[str, _Xenstored] = {}


def xenstored_socket() -> str:
    """The boot's one xenstored (started on first use, stopped when the guest runner exits)."""
    daemon = _shared.get("daemon")
    if daemon is None or not daemon.alive():
        if daemon is not None:
            daemon.stop()
        daemon = _shared["daemon"] = _Xenstored()
        atexit.register(daemon.stop)
    return daemon.socket


@dataclass
class Paused:
    """A block script stopped at a dmtargets stop point (it SIGSTOPs itself)."""

    proc: subprocess.Popen[str]

    def cont(self) -> subprocess.CompletedProcess[str]:
        os.kill(self.proc.pid, signal.SIGCONT)
        out, err = self.proc.communicate(timeout=SCRIPT_TIMEOUT)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=SCRIPT_TIMEOUT)


class Lane:
    """One scenario's toolstack. Use as a context manager: close() undoes everything."""

    def __init__(self) -> None:
        self.socket = xenstored_socket()
        self.store = XenStore.connect(self.socket, timeout=10)
        self.work = Path(tempfile.mkdtemp(prefix="xbc-lane-", dir="/tmp"))
        self.backends: list[Backend] = []
        self.consumers: list[Consumer] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.daemons: list[ReadyDaemon] = []
        self.closed = False

    def __enter__(self) -> Lane:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # a SIGSTOPped script dies too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
        for daemon in self.daemons:
            daemon.stop()
        for consumer in self.consumers:
            consumer.release()
        for be in self.backends:
            self.forget(be)
        self.store.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def forget(self, be: Backend) -> None:
        """Remove the backend's directories, as libxl does after a detach."""
        with contextlib.suppress(Exception):
            delete_vbd(self.store, be)

    def create_backend(self, domid: int, params: str, mode: str = "w", *, engine: bool = True) -> Backend:
        """libxl's transaction (frontend, backend, /libxl copy), then InitWait and `opened`=0 (our
        engine's marker, which tells the script to wait for `opened`=1). `engine` False leaves the
        marker out: for an NBD URI the marker makes the script hand the export to the engine
        itself (no kernel device), so the kernel-NBD scenarios go without it."""
        be = libxl_stub.create_backend(self.store, domid, 51712, params, mode, engine=engine)
        self.backends.append(be)
        return be

    def env(self, be: Backend, **extra: str) -> dict[str, str]:
        return libxl_stub.script_env(
            be,
            xenstored=self.socket,
            lock_dir=self.work / "locks",
            backend_bus=self.work / "no-blkback",
            handoff_timeout=30,
            **extra,
        )

    def popen(self, action: str, be: Backend, **extra: str) -> subprocess.Popen[str]:
        proc = libxl_stub.start_script(action, self.env(be, **extra))
        self.procs.append(proc)
        return proc

    def run(self, action: str, be: Backend, **extra: str) -> subprocess.CompletedProcess[str]:
        proc = self.popen(action, be, **extra)
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stopped_at(self, point: str, be: Backend) -> Paused:
        """Run `add` until it stops itself at a dmtargets stop point."""
        marker = self.work / f"stop-{be.domid}-{len(self.procs)}"
        proc = self.popen("add", be, XENBLOCKCTL_PAUSE_AT=point, XENBLOCKCTL_PAUSE_FILE=str(marker))
        deadline = time.monotonic() + SCRIPT_TIMEOUT
        while not (marker.exists() and _stopped(proc.pid)):
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"script exited {proc.returncode} before {point}: {err}{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"script never reached {point}")
            time.sleep(0.01)
        return Paused(proc)

    def consumer(self, be: Backend, *, writable: bool = True) -> Consumer:
        consumer = Consumer(be, self.socket, "engine", writable=writable).start()
        self.consumers.append(consumer)
        return consumer

    def nodes(self, be: Backend) -> dict[str, str]:
        return libxl_stub.read_nodes(self.store, be)

    def start_engine(self) -> ReadyDaemon:
        """`xenblockctl backend` over the local transport; returns once it says it is ready.
        Its stderr is `.log_text()`; `.stop()` (SIGTERM) returns its exit status."""
        transport = self.work / "transport"
        argv = [sys.executable, "-m", "xenblockctl", "backend", "--transport", f"local:{transport}"]
        argv += ["--xenstore", self.socket]
        log = self.work / "engine.log"
        try:
            daemon = ReadyDaemon("engine", argv, "engine ready", log, timeout=START_TIMEOUT, cwd=REPO)
        except DaemonNotReady as exc:
            raise AssertionError(f"{exc} {log.read_text(errors='replace')[-2000:]}") from exc
        self.daemons.append(daemon)
        return daemon


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] == b"T"
