"""Facts about this host that decide who can serve a disk: is kernel blkback loaded, is our
engine running, how do loop devices look. Read-only: nothing here creates or opens a device."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xenblockctl.xenstore.numbers import uint_or_none

BLKBACK_DRIVER = "/sys/bus/xen-backend/drivers/vbd"
BLKBACK_MODULE = "/sys/module/xen_blkback"
PROC = "/proc"


def blkback_loaded() -> bool:
    """Kernel blkback registered its `vbd` driver on the xen-backend bus (module or built in)."""
    return os.path.isdir(BLKBACK_DRIVER) or os.path.isdir(BLKBACK_MODULE)


def is_engine_argv(argv: list[str]) -> bool:
    """`xenblockctl [--debug] backend ...` or `python -m xenblockctl ... backend ...`."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "xenblockctl" or (arg == "xenblockctl" and i > 0 and argv[i - 1] == "-m"):
            rest = [a for a in argv[i + 1 :] if not a.startswith("-")]
            return bool(rest) and rest[0] == "backend"
    return False


def engine_pids(proc: str = PROC, *, xenstore_socket: str | None = None) -> list[int]:
    """Processes running the engine (a pidfile could lie after a crash). With `xenstore_socket`,
    only engines talking to that xenstored: on a machine with several (tests, sandboxes), an
    engine serving another store serves none of our disks."""
    pids: list[int] = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return pids
    for entry in entries:
        if uint_or_none(entry, maximum=1 << 32) is None:
            continue
        try:
            raw = Path(proc, entry, "cmdline").read_bytes()
        except OSError:
            continue
        argv = [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]
        if not is_engine_argv(argv):
            continue
        if xenstore_socket is not None and engine_socket(Path(proc, entry), argv) != os.path.realpath(
            xenstore_socket
        ):
            continue
        pids.append(int(entry))
    return sorted(pids)


def engine_socket(proc_dir: Path, argv: list[str]) -> str | None:
    """The xenstored socket an engine process uses: its --xenstore, else what libxenstore's rules
    make of its environment (unreadable environment: unknown)."""
    from xenblockctl.xenstore.endpoints import default_endpoints

    for i, arg in enumerate(argv):
        if arg == "--xenstore" and i + 1 < len(argv):
            return os.path.realpath(argv[i + 1])
        if arg.startswith("--xenstore="):
            return os.path.realpath(arg.split("=", 1)[1])
    try:
        raw = (proc_dir / "environ").read_bytes()
    except OSError:
        return None
    env = dict(
        item.decode("utf-8", "replace").partition("=")[::2] for item in raw.split(b"\0") if b"=" in item
    )
    return os.path.realpath(default_endpoints(env)[0].path)


@dataclass(frozen=True)
class LoopSummary:
    devices: int  # /sys/block/loop* nodes that exist
    bound: int
    max_loop: int | None  # module parameter: how many exist from boot (GET_FREE adds more)


def loop_summary(sys_block: str = "/sys/block") -> LoopSummary:
    devices = bound = 0
    for entry in Path(sys_block).glob("loop*"):
        devices += 1
        if (entry / "loop" / "backing_file").exists():
            bound += 1
    max_loop: int | None = None
    try:
        max_loop = int(Path("/sys/module/loop/parameters/max_loop").read_text().strip())
    except (OSError, ValueError):
        max_loop = None
    return LoopSummary(devices, bound, max_loop)


def kernel_release() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split(".")
    try:
        minor = parts[1].split("-", 1)[0].split("+", 1)[0]
        return int(parts[0]), uint_or_none(minor, maximum=1 << 16) or 0
    except (IndexError, ValueError):
        return (0, 0)
