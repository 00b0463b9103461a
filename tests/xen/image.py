"""The Xen lane's dom0 image: built from Debian's archive by image/build.sh, cached by recipe hash.

The cache entry for a recipe is a directory `<cache>/<key>/` with boot/{xen.elf,vmlinuz,initrd.img},
dom0.img and build.json. It is built in `<cache>/.build-<key>-<pid>/` and renamed into place only when
complete, so a killed build never leaves a half image that a later run would boot. A lock file keeps two
pytest sessions from building at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent / "image"
#: Bump to force a rebuild when something outside image/ changes what the image must contain.
RECIPE_EPOCH = "1"
BUILD_TIMEOUT = 1200.0
PRUNE_AFTER = 86400.0
REQUIRED_FILES = ("boot/xen.elf", "boot/vmlinuz", "boot/initrd.img", "dom0.img")
# Messages that mean "the archive could not be reached", not "the recipe is broken".
NETWORK_FAILURE = re.compile(
    r"Temporary failure resolving|Could not resolve|Failed to fetch|Network is unreachable|"
    r"Connection (?:timed out|refused)|Unable to connect|No route to host|Could not connect"
)


class ImageUnavailable(Exception):
    """The image cannot be built here for a reason outside the project (skip, with this reason)."""


class ImageBuildFailed(Exception):
    """The recipe itself failed (fail, with the build log tail)."""


@dataclass(frozen=True)
class Dom0Image:
    path: Path
    key: str
    #: seconds spent building in this session; 0.0 when the cache was used
    build_seconds: float
    cached: bool

    @property
    def xen(self) -> Path:
        return self.path / "boot" / "xen.elf"

    @property
    def kernel(self) -> Path:
        return self.path / "boot" / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "boot" / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.path / "dom0.img"


def recipe_key(recipe_dir: Path = RECIPE_DIR) -> str:
    """Hash of every recipe file's name, mode and content: any edit selects a new cache entry."""
    digest = hashlib.sha256(f"epoch={RECIPE_EPOCH}\n".encode())
    for path in sorted(p for p in recipe_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(recipe_dir)).encode() + b"\0")
        digest.update(oct(path.stat().st_mode & 0o111).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    if env := os.environ.get("XENBLOCKCTL_XEN_CACHE"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/xenblockctl/xen-lane")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xenblockctl" / "xen-lane"


def is_complete(entry: Path) -> bool:
    return all((entry / f).is_file() for f in REQUIRED_FILES) and (entry / "build.json").is_file()


def build_prerequisites() -> str | None:
    """Why an image cannot be built on this machine, or None."""
    if os.geteuid() != 0:
        return "building the dom0 image needs root (mmdebstrap --mode=root); CI runs as root"
    missing = [tool for tool in ("mmdebstrap", "mke2fs", "zcat", "chroot") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt package mmdebstrap/e2fsprogs; ./dev setup installs them)"
    return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_build(out: Path, log_path: Path, timeout: float, lock_fd: int) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    with log_path.open("w") as log:
        # The build inherits the cache lock: if pytest is SIGKILLed, the orphaned mmdebstrap keeps the
        # lock until it ends, so the next session cannot delete a directory still being written.
        proc = subprocess.Popen(
            ["bash", str(RECIPE_DIR / "build.sh"), str(out)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            pass_fds=(lock_fd,),
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # mmdebstrap forks apt/dpkg: the whole group goes, whatever happened.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if rc is None:
        raise ImageBuildFailed(f"image build timed out after {timeout:.0f}s\n{_tail(log_path)}")
    if rc != 0:
        text = log_path.read_text(errors="replace")
        if NETWORK_FAILURE.search(text):
            raise ImageUnavailable(
                f"Debian's archive is unreachable, the dom0 image cannot be built: {_tail(log_path, 5)}"
            )
        raise ImageBuildFailed(f"image build failed (exit {rc}), log {log_path}:\n{_tail(log_path)}")


def _remove_build_dir(path: Path) -> None:
    # A build killed inside mmdebstrap may leave bind mounts in its rootfs: never rm -rf through them.
    rootfs = path / "rootfs"
    if rootfs.exists():
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(rootfs) + "/") or line.split()[1] == str(rootfs)
        ]
        for mnt in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def ensure_image(cache_dir: Path | None = None, timeout: float = BUILD_TIMEOUT) -> Dom0Image:
    """Return the cached image for the current recipe, building it first if needed."""
    cache = cache_dir or default_cache_dir()
    key = recipe_key(RECIPE_DIR)
    entry = cache / key
    if is_complete(entry):
        os.utime(entry)  # marks it in use for the pruning below
        return Dom0Image(entry, key, 0.0, cached=True)
    if reason := build_prerequisites():
        raise ImageUnavailable(reason)
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(entry):  # another session built it while we waited
            return Dom0Image(entry, key, 0.0, cached=True)
        # Holding the lock, any other build directory belongs to a dead build.
        for stale in cache.glob(".build-*"):
            _remove_build_dir(stale)
        work = cache / f".build-{key}-{os.getpid()}"
        work.mkdir()
        log_path = cache / f"build-{key}.log"
        start = time.monotonic()
        try:
            _run_build(work / "out", log_path, timeout, lock.fileno())
            seconds = time.monotonic() - start
            out = work / "out"
            (out / "build.json").write_text(
                json.dumps({"key": key, "seconds": round(seconds, 1), "built_at": time.time()}) + "\n"
            )
            if not is_complete(out):
                raise ImageBuildFailed(f"build.sh exited 0 but left no complete image:\n{_tail(log_path)}")
            shutil.rmtree(entry, ignore_errors=True)
            out.rename(entry)
        finally:
            _remove_build_dir(work)
        # Images are 800 MB each: drop other recipes' images unused for a day (another checkout may still
        # use a recent one).
        for old in cache.iterdir():
            unused = time.time() - old.stat().st_mtime > PRUNE_AFTER
            if old.is_dir() and old.name != key and not old.name.startswith(".") and unused:
                shutil.rmtree(old, ignore_errors=True)
        return Dom0Image(entry, key, seconds, cached=False)
