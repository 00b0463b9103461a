"""The pytest-free core of the tests' libxl stand-in, shared by the libxl fixture
(tests/fixtures/libxl.py) and the dm lane's guest (tests/dm/libxl_guest.py, which runs inside a
QEMU VM where pytest is never imported):

    Backend(domid, devid)                 where the vbd lives; .path, .node(name), .frontend, ...
    create_backend(store, domid, devid, params, mode) -> Backend
                                          libxl's one transaction (xenblockctl.toolstack.vbd_dirs,
                                          the same code `xenblockctl attach` uses), then InitWait
                                          and, for our engine, `opened`=0
    script_env(be, ...) / start_script(action, env)
                                          the block script as libxl runs it (xen-block-protocol.md §1.3)
    Consumer(be, socket, mode).start()    a backend stand-in on a thread holding the published device
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xenblockctl.kernel import blockdev
from xenblockctl.kernel.blockdev import BlockDevice
from xenblockctl.toolstack.vbd_dirs import DiskSpec, VbdLocation, write_vbd
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.vdev import Vdev, VdevError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hotplug" / "block-xenblockctl"


@dataclass(frozen=True)
class Backend(VbdLocation):
    """A vbd in dom0's backend directory, as the tests name it (`path` is the backend)."""

    devid: int = 51712

    @property
    def path(self) -> str:
        return self.backend

    def node(self, name: str) -> str:
        return f"{self.path}/{name}"


@dataclass(frozen=True)
class _TestDisk(DiskSpec):
    """The disk as a broken or unusual toolstack writes it: `omit` drops backend keys (bad-input
    tests leave out params or mode), `extra` adds or overrides some (`online`=0, ...), and `devid`
    may be any number (tests count devids up past xvdp; `vdev` then only names the `dev` node)."""

    devid: int = 0
    omit: frozenset[str] = frozenset()
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def location(self) -> VbdLocation:
        return VbdLocation(self.domid, self.devid, self.kind, self.backend_domid)

    def frontend_nodes(self) -> dict[str, str]:
        return {**super().frontend_nodes(), "virtual-device": str(self.devid)}

    def backend_nodes(self) -> dict[str, str]:
        nodes = {name: value for name, value in super().backend_nodes().items() if name not in self.omit}
        nodes.update(self.extra)
        return nodes


def create_backend(
    store: XenStore,
    domid: int,
    devid: int,
    params: str | None,
    mode: str | None = "w",
    *,
    engine: bool = True,
    extra: Mapping[str, str] | None = None,
) -> Backend:
    """libxl's one transaction (frontend + backend + /libxl copy, with libxl's permissions), then
    the backend's move to InitWait; `engine` adds `opened`=0, the bundled engine's marker that
    tells the script to wait for `opened`=1. `params`/`mode` None leave that node out."""
    try:
        vdev = Vdev.from_number(devid)
    except VdevError:
        vdev = Vdev("xvd", 1)  # `dev` is informational (nothing reads it); libxl's tests wrote xvdb
    spec = _TestDisk(
        domid,
        vdev,
        params or "",
        mode or "",
        script=str(SCRIPT),
        discard=False,
        devid=devid,
        omit=frozenset(name for name, value in (("params", params), ("mode", mode)) if value is None),
        extra=tuple((extra or {}).items()),
    )
    write_vbd(store, spec)
    be = Backend(domid, devid)
    store.write(be.node("state"), "2")
    if engine:
        store.write(be.node("opened"), "0")
    return be


def read_nodes(store: XenStore, be: Backend) -> dict[str, str]:
    """The backend's keys, {} once the directory is gone."""
    try:
        return store.read_dir(be.path)
    except Exception:
        return {}


def script_env(
    be: Backend,
    *,
    xenstored: str,
    lock_dir: Path,
    backend_bus: Path,
    handoff_timeout: int,
    **extra: str,
) -> dict[str, str]:
    """libxl's environment for the block script, plus our test knobs (lock directory, the fake
    sysfs xen-backend bus, the hand-off deadline)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "script": str(SCRIPT),
        "XENBUS_TYPE": be.kind,
        "XENBUS_PATH": be.relative,
        "XENBUS_BASE_PATH": "backend",
        "XENSTORED_PATH": xenstored,
        "XENBLOCKCTL_LOCK_DIR": str(lock_dir),
        "XENBLOCKCTL_TEST_XEN_BACKEND_BUS": str(backend_bus),
        "XENBLOCKCTL_HANDOFF_TIMEOUT": str(handoff_timeout),
    }
    env.update(extra)
    return env


def script_argv(action: str) -> list[str]:
    return [sys.executable, str(SCRIPT), action]


def start_script(action: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """The block script as libxl runs it (argv [script, action], stdin /dev/null), output piped."""
    return subprocess.Popen(
        script_argv(action),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Consumer:
    """A backend stand-in holding the device by its own fd, on a thread: waits for
    physical-device, opens that major:minor, compares its diskseq with physical-device-luid, then
    as our engine writes `opened`=1 (mode "engine") or as blkback shows `physical_device` in the
    fake sysfs directory (mode "blkback"), and holds the device until released."""

    backend: Backend
    socket: str
    mode: str = "engine"  # "engine" | "blkback"
    writable: bool = False
    sysfs_bus: Path | None = None
    device: BlockDevice | None = None
    outcome: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Consumer:
        if self.mode == "blkback":
            # Like xenbus probing: the xen-backend device directory exists before the script runs
            # (libxl starts it once blkback switched to InitWait); only physical_device comes later.
            assert self.sysfs_bus is not None
            self._bus_dir().mkdir(parents=True, exist_ok=True)
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
                    if pair is not None:
                        self._open(store, *pair)
                        return
        except Exception as exc:  # reported through outcome; the test asserts on it
            self.outcome = f"consumer failed: {type(exc).__name__}: {exc}"

    def _open(self, store: XenStore, physical: str, luid: str | None) -> None:
        major, minor = (int(x, 16) for x in physical.split(":"))
        device = blockdev.open_devt(os.makedev(major, minor), writable=self.writable)
        if luid is not None and device.identity.luid != luid:
            self.outcome = f"luid-mismatch: live {device.identity.luid} published {luid}"
            device.close()
            store.write(self.backend.error_node, "luid mismatch")
            return
        self.device = device
        self.outcome = "opened"
        if self.mode == "engine":
            store.write(self.backend.node("opened"), "1")
        else:
            d = self._bus_dir()
            d.mkdir(parents=True, exist_ok=True)
            # sysfs attributes appear whole: write aside, then rename into place
            (d / ".physical_device").write_text(f"{major:x}:{minor:x}\n")
            (d / ".physical_device").rename(d / "physical_device")

    def _bus_dir(self) -> Path:
        assert self.sysfs_bus is not None
        return self.sysfs_bus / f"{self.backend.kind}-{self.backend.domid}-{self.backend.devid}"

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


def _published(tx: Transaction, be: Backend) -> tuple[str, str | None] | None:
    physical = tx.read_optional(be.node("physical-device"))
    if physical is None:
        return None
    return physical, tx.read_optional(be.node("physical-device-luid"))
