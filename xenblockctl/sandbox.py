"""The whole path on a machine without Xen, with real parts: an embedded xenstored process, the
engine process, the block script run exactly as libxl runs it, and a simulated guest blkfront
doing the xenbus handshake and real I/O through the ring to a real loop device.

Steps (each timed and checked; any failure stops the run and everything is cleaned up):
  1. start xenstored and the engine; 2. write the backend/frontend directories as libxl does
  and wait for InitWait; 3. run `block-xenblockctl add`; 4. the guest connects, writes and reads
  back; 5. a hostile second guest writes garbage (Unicode digits, signs, huge numbers) into every
  frontend node the engine reads: its disk alone is refused while the first guest's I/O goes on;
  6. the frontend reconnects in the same domain (what pvgrub handing over to the guest's
  kernel, kexec or a driver rebind does): same device, data still there; 7. detach as libxl does (online=0,
  Closing, wait for Closed, `remove`, delete the directories); 8. prove no loop device is left.

With `target` (an NBD URI of a running server: `nbd+unix:///EXPORT?socket=PATH`) the guest's
disk is that export instead of an image: the block script publishes the export's identity
(owner record kind=nbd), the engine serves it over its own NBD connection after re-checking its
handshake against the record, and the guest's write is read back through a second NBD client when
the server admits one (qemu-nbd by default does not). The export is written to."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.guest import XenbusFrontend
from xenblockctl.errors import XenblockError
from xenblockctl.kernel import loop
from xenblockctl.nbd import uri as nbd_uri
from xenblockctl.toolstack import hostfiles
from xenblockctl.toolstack.daemons import DaemonNotReady, ReadyDaemon
from xenblockctl.toolstack.vbd_dirs import DiskSpec, delete_vbd, write_vbd
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.vdev import Vdev

GUEST_DOMID = 1
HOSTILE_DOMID = 2
DEVID = 51712  # xvda
#: What a hostile frontend writes into each node the engine reads: what isdigit() or int()
#: forgive ('²' once killed the engine; '٣' was read as 3) and what no blkfront writes.
HOSTILE_NODES = {
    "ring-ref": "٣",
    "ring-page-order": "¹",
    "ring-ref0": "-1",
    "event-channel": "²",
    "protocol": "x86_64-abi\n",
    "feature-persistent": "٣",
    "multi-queue-num-queues": "99999999999999999999",
    "state": "3",
}


class SandboxError(XenblockError):
    code = "sandbox-failed"


@dataclass
class Step:
    name: str
    seconds: float
    detail: str


@dataclass
class Report:
    steps: list[Step] = field(default_factory=list)
    ok: bool = False


def _script() -> str:
    """The block script shipped with this package (installed package data, or the checkout's)."""
    try:
        return str(hostfiles.shipped(f"hotplug/{hostfiles.SCRIPT_NAME}"))
    except XenblockError as exc:
        raise SandboxError(exc.message) from exc


def _run_script(python: str, action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The block script exactly as libxl runs it: argv [script, action], stdin /dev/null."""
    return subprocess.run(
        [python, env["script"], action],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def script_failure(action: str, result: subprocess.CompletedProcess[str], hotplug_error: str | None) -> str:
    """What libxl would show for a failed script run: its `hotplug-error`, else (a script that died
    before it could write one, e.g. on an import) its exit status and the last lines it printed."""
    said = hotplug_error or " | ".join(
        line for line in result.stderr.strip().splitlines()[-3:] if line.strip()
    )
    return f"block script {action} failed (exit {result.returncode}): {said or 'no hotplug-error, no output'}"


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SandboxError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _ours(image: str) -> list[int]:
    return [b.number for b in loop.bound_loops() if b.backing_file.startswith(image)]


def _script_env(domid: int, sock: str) -> dict[str, str]:
    """libxl's environment for the block script of backend/vbd/<domid>/DEVID."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "script": _script(),
        "XENBUS_TYPE": "vbd",
        "XENBUS_PATH": f"backend/vbd/{domid}/{DEVID}",
        "XENBUS_BASE_PATH": "backend",
        "XENSTORED_PATH": sock,
    }


def _hostile_guest(
    store: XenStore, python: str, sock: str, workdir: Path, *, bystander: LocalFrontend, engine: ReadyDaemon
) -> str:
    """Attach a disk to a second domain whose frontend writes HOSTILE_NODES; the engine must refuse
    that disk alone (error node, Closing) while the bystander's I/O goes on without an error."""
    disk = str(workdir / "hostile-disk.img")
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    env = _script_env(HOSTILE_DOMID, sock)
    spec = DiskSpec(HOSTILE_DOMID, Vdev.parse("xvda"), disk, "w", script=env["script"])
    backend = f"/local/domain/0/backend/vbd/{HOSTILE_DOMID}/{DEVID}"
    frontend = f"/local/domain/{HOSTILE_DOMID}/device/vbd/{DEVID}"
    error_node = f"/local/domain/0/error/backend/vbd/{HOSTILE_DOMID}/{DEVID}/error"
    write_vbd(store, spec)
    pattern = b"bystander I/O while a hostile guest writes garbage".ljust(4096, b"-")
    requests = 0

    def bystander_io() -> None:
        nonlocal requests
        if (
            bystander.write(4096 + requests * 8, pattern) != 0
            or bystander.read(4096 + requests * 8, 4096) != pattern
        ):
            raise SandboxError("the bystander guest's I/O failed while a hostile guest wrote garbage")
        requests += 2

    try:
        _wait(lambda: store.read_optional(f"{backend}/state") == "2", 10, "hostile backend InitWait")
        result = _run_script(python, "add", env)
        if result.returncode != 0:
            raise SandboxError(script_failure("add", result, store.read_optional(backend + "/hotplug-error")))
        bystander_io()
        store.write_many({f"{frontend}/{name}": value for name, value in HOSTILE_NODES.items()})
        _wait(
            lambda: store.read_optional(f"{backend}/state") == "5",
            10,
            "the engine to refuse the hostile disk",
        )
        refusal = store.read_optional(error_node) or ""
        for value in ("²", "¹", "٣"):  # and garbage in `state` itself, after the refusal
            store.write(f"{frontend}/state", value)
            bystander_io()
        if engine.proc.poll() is not None:
            raise SandboxError("a hostile guest's node values killed the engine")
    finally:
        with contextlib.suppress(XenblockError):
            store.write_many({f"{backend}/online": "0", f"{backend}/state": "5"})
            _wait(lambda: store.read_optional(f"{backend}/state") == "6", 10, "hostile backend Closed")
        _run_script(python, "remove", env)
        delete_vbd(store, spec.location)
    shown = refusal if len(refusal) <= 60 else refusal[:57] + "..."
    return f"domain {HOSTILE_DOMID} refused ({shown}); domain {GUEST_DOMID}: {requests} requests OK meanwhile"


def _read_back(target: str, offset: int, length: int) -> bytes | None:
    """`length` bytes at `offset` of the export through a second NBD client; None when the server
    admits no second client within a short deadline (its policy, e.g. qemu-nbd's --shared=1)."""
    from xenblockctl.nbd.client import NbdClient

    try:
        with NbdClient.connect(nbd_uri.parse(target), timeout=2.0) as other:
            return other.read(offset, length)
    except XenblockError:
        return None


def run(
    image: str | None = None,
    *,
    target: str | None = None,
    progress: Callable[[Step], None] | None = None,
    keep_dir: bool = False,
) -> Report:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (loop devices)")
    if target is not None:
        if image is not None:
            raise SandboxError("give --image or --target, not both")
        nbd_uri.parse(target)  # a coded nbd-uri-* error before anything starts
    report = Report()
    store: XenStore | None = None
    workdir = Path(tempfile.mkdtemp(prefix="xbc-sandbox-", dir="/tmp"))
    daemons: list[ReadyDaemon] = []

    def start(name: str, argv: list[str], ready: str) -> None:
        try:
            daemons.append(ReadyDaemon(name, argv, ready, workdir / f"{name}.log"))
        except DaemonNotReady as exc:
            raise SandboxError(exc.message) from exc

    @contextlib.contextmanager
    def step(name: str) -> Iterator[list[str]]:
        detail: list[str] = []
        start = time.perf_counter()
        yield detail
        done = Step(name, time.perf_counter() - start, "; ".join(detail))
        report.steps.append(done)
        if progress is not None:
            progress(done)

    try:
        disk = target or image or str(workdir / "guest-disk.img")
        if image is None and target is None:
            with open(disk, "wb") as f:
                f.truncate(64 << 20)
        sock = str(workdir / "xenstored.sock")
        transport = str(workdir / "transport.sock")
        python = sys.executable
        with step("start xenstored + engine") as d:
            start(
                "xenstored", [python, "-m", "xenblockctl", "xenstored", "--socket", sock], "xenstored ready"
            )
            engine_argv = [python, "-m", "xenblockctl", "backend", "--transport", f"local:{transport}"]
            start("engine", [*engine_argv, "--xenstore", sock], "engine ready")
            d.append(f"xenstored pid {daemons[0].proc.pid}, engine pid {daemons[1].proc.pid}")
        store = XenStore.connect(sock)
        backend = f"/local/domain/0/backend/vbd/{GUEST_DOMID}/{DEVID}"
        frontend = f"/local/domain/{GUEST_DOMID}/device/vbd/{DEVID}"
        with step("toolstack writes the vbd, engine reaches InitWait") as d:
            spec = DiskSpec(GUEST_DOMID, Vdev.parse("xvda"), disk, "w", script=_script())
            write_vbd(store, spec)
            _wait(lambda: store.read_optional(f"{backend}/state") == "2", 10, "backend InitWait")
            d.append(f"{backend}: state 2, opened={store.read_optional(backend + '/opened')}")
        with step("block script add (as libxl runs it)") as d:
            env = _script_env(GUEST_DOMID, sock)
            result = _run_script(python, "add", env)
            if result.returncode != 0:
                raise SandboxError(
                    script_failure("add", result, store.read_optional(backend + "/hotplug-error"))
                )
            nodes = store.read_dir(backend)
            if target is not None:
                d.append(
                    f"owner record {nodes.get('xenblockctl-owner')!r}, engine opened={nodes.get('opened')}"
                )
            else:
                d.append(
                    f"physical-device {nodes['physical-device']} luid {nodes['physical-device-luid']} "
                    f"({nodes['physical-device-path']}), engine opened={nodes.get('opened')}"
                )
        guest = XenbusFrontend(
            store, frontend_path=frontend, backend_path=backend, domid=GUEST_DOMID, transport_socket=transport
        )
        pattern = b"xenblockctl sandbox: written by the guest through the ring".ljust(4096, b".")
        try:
            with step("guest connects, writes, reads back") as d:
                ring = guest.connect()
                ring.write(2048, pattern)
                ring.flush()
                if ring.read(2048, 4096) != pattern:
                    raise SandboxError("guest read back different data")
                sectors = store.read_optional(backend + "/sectors")
                d.append(f"backend Connected, {sectors} sectors, 4 KiB written + verified")
                if target is not None:
                    seen = _read_back(target, 2048 * 512, 4096)
                    if seen is not None and seen != pattern:
                        raise SandboxError("the write did not reach the export")
                    d.append(
                        "read back through a second NBD client"
                        if seen is not None
                        else "the server admits no second client: read back through the ring only"
                    )
                else:
                    with open(disk, "rb") as image_file:
                        image_file.seek(2048 * 512)
                        if image_file.read(4096) != pattern:
                            raise SandboxError("the write did not reach the image")
            with step("a hostile guest writes garbage into every frontend node") as d:
                d.append(_hostile_guest(store, python, sock, workdir, bystander=ring, engine=daemons[1]))
            with step("frontend reconnects in the same domain") as d:
                before = _ours(disk) if target is None else []
                ring = guest.reboot()
                if target is None and _ours(disk) != before:
                    raise SandboxError("the device changed across the reconnect")
                if ring.read(2048, 4096) != pattern:
                    raise SandboxError("data lost across the reconnect")
                d.append(
                    f"same loop device {before}, data intact"
                    if target is None
                    else "same export, data intact"
                )
            with step("detach as libxl does") as d:

                def closing(tx: Transaction) -> None:
                    tx.write(f"{backend}/online", "0")
                    tx.write(f"{backend}/state", "5")

                store.run_transaction(closing)
                guest.disconnect()
                _wait(lambda: store.read_optional(f"{backend}/state") == "6", 10, "backend Closed")
                result = _run_script(python, "remove", env)
                if result.returncode != 0:
                    raise SandboxError(script_failure("remove", result, None))
                delete_vbd(store, spec.location)
                d.append("engine drained + released, remove ran, directories deleted")
        finally:
            guest.close()
        with step("nothing leaked") as d:
            if target is not None:
                if store.read_optional(backend) is not None:
                    raise SandboxError(f"{backend} still exists")
                seen = _read_back(target, 2048 * 512, 4096)
                if seen is not None and seen != pattern:
                    raise SandboxError("the export lost the guest's write after the detach")
                d.append(
                    "no kernel device was made; backend gone"
                    + ("; the data is on the export" if seen else "")
                )
            else:
                left = _ours(disk)
                if left:
                    raise SandboxError(f"loop devices still bound: {left}")
                d.append("no loop device bound to the image")
        report.ok = True
        return report
    finally:
        if store is not None:
            store.close()
        for daemon in reversed(daemons):
            daemon.stop()
        if not keep_dir:
            shutil.rmtree(workdir, ignore_errors=True)
