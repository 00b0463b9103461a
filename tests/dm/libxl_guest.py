"""libxl, xenstored and a consumer inside the dm lane's guest, for the block-script scenarios.

The guest cannot use tests/fixtures/libxl.py (pytest fixtures), so this is its pytest-free
counterpart, kept to what the scenarios need:

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from xenblockctl.kernel import blockdev
from xenblockctl.kernel.blockdev import BlockDevice
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.paths import Perm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hotplug" / "block-xenblockctl"
#: Python start-up under TCG takes seconds: generous, but bounded.
START_TIMEOUT = 60.0
SCRIPT_TIMEOUT = 60.0


class _Xenstored:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xbc-xs-", dir="/tmp")
        self.socket = os.path.join(self.dir, "socket")
        self.err = open(os.path.join(self.dir, "stderr"), "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xenblockctl", "xenstored", "--socket", self.socket],
            stdout=subprocess.PIPE,
            stderr=self.err,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout.fileno(), START_TIMEOUT)
        if not line.startswith(b"xenstored ready"):
            self.stop()
            raise RuntimeError(f"xenstored did not start: {line!r}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _readline(fd: int, timeout: float) -> bytes:
    """One line from a child's stdout within the deadline (b"" if it exited or timed out)."""
    import select

    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


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


@dataclass(frozen=True)
class Backend:
    domid: int
    devid: int = 51712

    @property
    def relative(self) -> str:
        return f"backend/vbd/{self.domid}/{self.devid}"

    @property
    def path(self) -> str:
        return f"/local/domain/0/{self.relative}"

    @property
    def frontend(self) -> str:
        return f"/local/domain/{self.domid}/device/vbd/{self.devid}"

    def node(self, name: str) -> str:
        return f"{self.path}/{name}"


@dataclass
class Consumer:
    """Engine stand-in in a thread: waits for physical-device, opens that major:minor (writable
    for mode w), compares BLKGETDISKSEQ with physical-device-luid, writes `opened`=1, holds."""

    backend: Backend
    socket: str
    writable: bool
    device: BlockDevice | None = None
    outcome: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Consumer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with XenStore.connect(self.socket, timeout=10) as store:
                store.watch(self.backend.path, "consumer")
                while not self._stop.is_set():
                    store.wait_watch(0.05)
                    store.drain_watches()
                    pair = store.run_transaction(lambda tx: _published(tx, self.backend))
                    if pair is None:
                        continue
                    physical, luid = pair
                    major, minor = (int(x, 16) for x in physical.split(":"))
                    device = blockdev.open_devt(os.makedev(major, minor), writable=self.writable)
                    if device.identity.luid != luid:
                        self.outcome = f"luid-mismatch: live {device.identity.luid}, published {luid}"
                        device.close()
                        return
                    self.device = device
                    store.write(self.backend.node("opened"), "1")
                    self.outcome = "opened"
                    return
        except Exception as exc:  # reported through outcome; the scenario asserts on it
            self.outcome = f"consumer failed: {type(exc).__name__}: {exc}"

    def wait_opened(self, timeout: float = 30.0) -> BlockDevice:
        assert self._thread is not None
        self._thread.join(timeout)
        assert self.outcome == "opened", self.outcome or "consumer never opened the device"
        assert self.device is not None
        return self.device

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.device is not None:
            self.device.close()
            self.device = None


def _published(tx: Transaction, be: Backend) -> tuple[str, str] | None:
    physical = tx.read_optional(be.node("physical-device"))
    luid = tx.read_optional(be.node("physical-device-luid"))
    return None if physical is None or luid is None else (physical, luid)


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
        for consumer in self.consumers:
            consumer.release()
        for be in self.backends:
            self.forget(be)
        self.store.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def forget(self, be: Backend) -> None:
        """Remove the backend's directories, as libxl does after a detach."""
        for path in (be.path, be.frontend, f"/libxl/{be.domid}"):
            with contextlib.suppress(Exception):
                self.store.rm(path)

    def create_backend(self, domid: int, params: str, mode: str = "w") -> Backend:
        """libxl's transaction (frontend, backend, /libxl copy), then InitWait and `opened`=0 (our
        engine's marker, which tells the script to wait for `opened`=1)."""
        be = Backend(domid)

        def body(tx: Transaction) -> None:
            for name, value in {
                "frontend": be.frontend,
                "frontend-id": str(domid),
                "script": str(SCRIPT),
                "online": "1",
                "removable": "0",
                "bootable": "1",
                "state": "1",
                "dev": "xvdb",
                "type": "phy",
                "device-type": "disk",
                "params": params,
                "mode": mode,
            }.items():
                tx.write(be.node(name), value)
            tx.set_perms(be.path, [Perm.parse("n0"), Perm.parse(f"r{domid}")])
            for name, value in {"backend": be.path, "backend-id": "0", "state": "1"}.items():
                tx.write(f"{be.frontend}/{name}", value)
            tx.write(f"/libxl/{domid}/device/vbd/{be.devid}/frontend", be.frontend)

        self.store.run_transaction(body)
        self.store.write(be.node("state"), "2")
        self.store.write(be.node("opened"), "0")
        self.backends.append(be)
        return be

    def env(self, be: Backend, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "script": str(SCRIPT),
            "XENBUS_TYPE": "vbd",
            "XENBUS_PATH": be.relative,
            "XENBUS_BASE_PATH": "backend",
            "XENSTORED_PATH": self.socket,
            "XENBLOCKCTL_LOCK_DIR": str(self.work / "locks"),
            "XENBLOCKCTL_TEST_XEN_BACKEND_BUS": str(self.work / "no-blkback"),
            "XENBLOCKCTL_HANDOFF_TIMEOUT": "30",
        }
        env.update(extra)
        return env

    def popen(self, action: str, be: Backend, **extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), action],
            env=self.env(be, **extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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
        consumer = Consumer(be, self.socket, writable).start()
        self.consumers.append(consumer)
        return consumer

    def nodes(self, be: Backend) -> dict[str, str]:
        try:
            return self.store.read_dir(be.path)
        except Exception:
            return {}

    def start_engine(self) -> subprocess.Popen[str]:
        """`xenblockctl backend` over the local transport; returns once it says it is ready."""
        transport = self.work / "transport"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xenblockctl",
                "backend",
                "--transport",
                f"local:{transport}",
                "--xenstore",
                self.socket,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = _readline(proc.stdout.fileno(), START_TIMEOUT)
        if line.strip() != b"engine ready":
            proc.kill()
            _out, err = proc.communicate(timeout=10)
            raise AssertionError(f"engine did not start: {line!r} {err[-2000:]}")
        return proc


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] == b"T"
