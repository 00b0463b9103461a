"""The dm lane's VM: Debian's stock kernel (dm as a module) under QEMU/TCG with the host root over 9p.

The host kernel has no device-mapper, so dm scenarios run inside a throwaway guest (xen-testbed.md
§9): a busybox initramfs loads dm_mod, dm_snapshot, loop and the 9p modules, mounts the host's `/`
read-only, and runs `python -m tests.dm.guest` with the host's own interpreter and source tree.
Results come back through a second, writable 9p share as JSON lines (the serial console also
carries kernel messages, which could interleave with ours).

Everything built (kernel, initramfs) is cached under .cache/dm-lane, outside git. `LaneUnavailable`
is raised only when packages cannot be installed or downloaded; the caller skips with its reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XENBLOCKCTL_DM_CACHE", REPO / ".cache" / "dm-lane"))
#: Modules the guest needs, dependencies resolved from each .ko's modinfo.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "loop", "dm_mod", "dm_snapshot", "nbd")
#: module parameters given to insmod. nbds_max=0: no pre-created /dev/nbdN, so every netlink
#: connect makes a new device with a fresh diskseq (remote-storage.md §3)
MODULE_PARAMS = {"nbd": "nbds_max=0"}
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
RESULTS_FILE = "results.jsonl"
#: Where the guest sees the checkout (a bind mount made before its /tmp is covered by a tmpfs).
GUEST_REPO = "/run/xbc-repo"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do
  insmod "$m" $(cat "${m%.ko}.params" 2>/dev/null) || echo "xbc-init: insmod $m failed"
done
for w in $(cat /proc/cmdline); do
  case "$w" in
    xbc_python=*) PY="${w#xbc_python=}" ;;
    xbc_repo=*) REPO="${w#xbc_repo=}" ;;
    xbc_select=*) SEL="${w#xbc_select=}" ;;
  esac
done
mkdir -p /newroot
# cache=loose: the host tree is a fixed snapshot for one boot, so the guest may keep dentries and
# pages; uncached 9p made every Python start-up cost ~380 host stats (5.4 s under TCG, 1.4 s cached).
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot; then
  mount -t proc proc /newroot/proc
  mount -t sysfs sysfs /newroot/sys
  mount -t devtmpfs devtmpfs /newroot/dev
  mount -t tmpfs -o mode=755 tmpfs /newroot/run
  # The guest's own /tmp hides the host's; a checkout under /tmp stays reachable through this bind.
  mkdir -p /newroot/run/xbc-repo
  mount -o bind "/newroot$REPO" /newroot/run/xbc-repo
  mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
  mkdir -p /newroot/tmp/xbc-out
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 xbcout /newroot/tmp/xbc-out
  chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp TMPDIR=/tmp /bin/sh -c 'cd "$0" && exec "$1" -u -m tests.dm.guest /tmp/xbc-out "$2"' \
    /run/xbc-repo "$PY" "${SEL:-all}"
  echo "xbc-exit=$?"
  sync
  umount /newroot/tmp/xbc-out
else
  echo "xbc-exit=mount-failed"
fi
poweroff -f
"""


class LaneUnavailable(Exception):
    """The lane's packages cannot be installed or fetched: skip with this reason."""


@dataclass(frozen=True)
class Artifacts:
    kernel: Path
    initrd: Path
    kernel_package: str


@dataclass
class BootResult:
    results: dict[str, dict[str, object]]
    console: str
    exit_line: str | None
    seconds: float
    timed_out: bool
    qemu_returncode: int | None
    notes: list[str] = field(default_factory=list)

    def console_tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def ensure_qemu() -> str:
    """qemu-system-x86_64, installed from Debian if missing and we may (root with apt-get)."""
    found = shutil.which("qemu-system-x86_64")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise LaneUnavailable("qemu-system-x86_64 missing and cannot apt-get install qemu-system-x86 here")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"]
    result = _run(cmd, env=env, timeout=600)
    if result.returncode != 0:
        _run(["apt-get", "update", "-qq"], env=env, timeout=600)
        result = _run(cmd, env=env, timeout=600)
    found = shutil.which("qemu-system-x86_64")
    if not found:
        raise LaneUnavailable(f"apt-get install qemu-system-x86 failed: {result.stderr.strip()[-300:]}")
    return found


def kernel_package() -> str:
    """The versioned image package the `linux-image-amd64` metapackage currently points at
    (XENBLOCKCTL_DM_KERNEL pins one). Refreshes the apt lists once if they know no kernel."""
    pinned = os.environ.get("XENBLOCKCTL_DM_KERNEL")
    if pinned:
        return pinned
    if shutil.which("apt-cache") is None:
        raise LaneUnavailable("no apt-cache: cannot find Debian's kernel package")
    for attempt in range(2):
        out = _run(["apt-cache", "depends", KERNEL_META], timeout=120).stdout
        for raw in out.splitlines():
            line = raw.strip()
            if line.startswith("Depends: linux-image-"):
                return line.split(":", 1)[1].strip()
        if attempt == 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], timeout=600)
    raise LaneUnavailable(f"apt knows no {KERNEL_META} even after apt-get update")


def _download(packages: list[str], dest: Path) -> list[Path]:
    for attempt in range(2):
        result = _run(["apt-get", "download", *packages], cwd=dest, timeout=900)
        debs = sorted(dest.glob("*.deb"))
        if result.returncode == 0 and len(debs) >= len(packages):
            return debs
        if attempt == 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], timeout=600)
    raise LaneUnavailable(f"apt-get download {' '.join(packages)} failed: {result.stderr.strip()[-300:]}")


def _modinfo_depends(ko: Path) -> list[str]:
    data = _read_module(ko)
    marker = b"depends="
    at = data.find(b"\0" + marker)
    if at < 0:
        return []
    end = data.find(b"\0", at + 1)
    value = data[at + 1 + len(marker) : end].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


def _read_module(ko: Path) -> bytes:
    if ko.name.endswith(".xz"):
        return lzma.decompress(ko.read_bytes())
    return ko.read_bytes()


def _module_name(ko: Path) -> str:
    return ko.name.split(".ko", 1)[0].replace("-", "_")


def resolve_modules(moddir: Path, wanted: tuple[str, ...] = MODULES) -> list[Path]:
    """Module files in load order (dependencies first), found by name, without depmod."""
    index = {_module_name(p): p for p in moddir.rglob("*.ko*")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:
            raise LaneUnavailable(f"kernel package has no module {name}")
        for dep in _modinfo_depends(path):
            visit(dep)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


def _cpio_newc(root: Path) -> bytes:
    """A newc cpio archive of `root` (what the kernel unpacks as initramfs), in Python so the
    lane does not depend on the cpio package."""
    out = bytearray()
    ino = 1

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        name_b = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        )
        ino += 1
        out.extend(header.encode() + name_b)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_symlink():
            entry(rel, st.st_mode, os.readlink(path).encode())
        elif path.is_dir():
            entry(rel, st.st_mode, b"")
        else:
            entry(rel, st.st_mode, path.read_bytes())
    entry("TRAILER!!!", 0, b"")
    return bytes(out)


def _stamp(kpkg: str) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted(MODULE_PARAMS.items()))
    return hashlib.sha256(
        (kpkg + "\0" + INIT + "\0" + ",".join(MODULES) + "\0" + params).encode()
    ).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(cache: Path = CACHE) -> Artifacts:
    """Kernel + initramfs for the current Debian kernel package, built once and cached."""
    kpkg = kernel_package()
    target = cache / f"{kpkg}-{_stamp(kpkg)}"
    kernel, initrd = target / "vmlinuz", target / "initramfs.cpio.gz"
    with _locked(cache / ".lock"):
        if kernel.is_file() and initrd.is_file():
            return Artifacts(kernel, initrd, kpkg)
        for stale in cache.glob("linux-image-*"):
            shutil.rmtree(stale, ignore_errors=True)  # older kernels or init scripts
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
            work = Path(tmp)
            debs = work / "debs"
            debs.mkdir()
            _download([kpkg, BUSYBOX], debs)
            tree = work / "tree"
            for deb in debs.glob("*.deb"):
                result = _run(["dpkg-deb", "-x", str(deb), str(tree)], timeout=300)
                if result.returncode != 0:
                    raise LaneUnavailable(f"dpkg-deb -x {deb.name} failed: {result.stderr.strip()}")
            vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
            busybox = tree / "bin" / "busybox"
            if not vmlinuz or not busybox.is_file():
                raise LaneUnavailable("kernel or busybox missing from the downloaded packages")
            moddirs = sorted((tree / "lib" / "modules").glob("*"))
            if not moddirs:
                moddirs = sorted((tree / "usr" / "lib" / "modules").glob("*"))
            modules = resolve_modules(moddirs[0])
            init_root = work / "initramfs"
            for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
                (init_root / d).mkdir(parents=True)
            shutil.copy2(busybox, init_root / "bin" / "busybox")
            for i, ko in enumerate(modules):
                name = _module_name(ko)
                (init_root / "modules" / f"{i:02d}-{name}.ko").write_bytes(_read_module(ko))
                if name in MODULE_PARAMS:
                    (init_root / "modules" / f"{i:02d}-{name}.params").write_text(MODULE_PARAMS[name])
            (init_root / "init").write_text(INIT)
            (init_root / "init").chmod(0o755)
            staged = work / "out"
            staged.mkdir()
            shutil.copy2(vmlinuz[0], staged / "vmlinuz")
            with gzip.open(staged / "initramfs.cpio.gz", "wb", compresslevel=1) as f:
                f.write(_cpio_newc(init_root))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
    return Artifacts(kernel, initrd, kpkg)


def boot(
    artifacts: Artifacts,
    *,
    qemu: str,
    python: str,
    select: str = "all",
    timeout: float = 900.0,
    memory_mb: int = 1024,
) -> BootResult:
    """Boot once, run the selected guest scenarios, always reap QEMU. Never raises on guest failure:
    the caller turns missing results into failures with the console tail."""
    if python.startswith(f"{REPO}/"):
        python = GUEST_REPO + python[len(str(REPO)) :]  # e.g. the checkout's .venv
    with tempfile.TemporaryDirectory(prefix="xbc-dm-") as tmp:
        out = Path(tmp, "out")
        out.mkdir()
        console = Path(tmp, "console.log")
        append = " ".join(
            [
                "console=ttyS0",
                "loglevel=4",
                "panic=-1",
                f"xbc_python={python}",
                f"xbc_repo={REPO}",
                f"xbc_select={select}",
            ]
        )
        argv = [
            qemu,
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-m",
            str(memory_mb),
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(artifacts.kernel),
            "-initrd",
            str(artifacts.initrd),
            "-append",
            append,
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={out},mount_tag=xbcout,security_model=none,multidevs=remap",
            "-nic",
            "none",
        ]
        started = time.monotonic()
        timed_out = False
        with open(console, "wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _reap(proc)
        seconds = time.monotonic() - started
        text = console.read_bytes().decode("utf-8", "replace").replace("\r", "")
        exit_line = next((ln for ln in text.splitlines() if ln.startswith("xbc-exit=")), None)
        results: dict[str, dict[str, object]] = {}
        results_path = out / RESULTS_FILE
        if results_path.is_file():
            for line in results_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    results[str(record["name"])] = record
        return BootResult(results, text, exit_line, seconds, timed_out, proc.returncode)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill QEMU's whole session if it is still there, and wait for it: no stray VMs after a test."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
