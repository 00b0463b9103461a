"""The Xen lane's dom0 image: built from Debian's archive by image/build.sh, cached by recipe hash and
by the versions of the dom0 kernel and Xen the archive would install today.

A cache keyed on the recipe alone hid what a fresh machine gets: a cold build took dom0 kernel 6.1.0-57
from bookworm-security and failed scenario 09, while runs on an image cached from an older archive state
passed. So before deciding hit or miss, the lane reads the archive's Packages indices (bounded timeout)
and resolves the packages that matter (linux-image-amd64 -> its versioned kernel, Xen's hypervisor and
tools) the way apt would (highest version across bookworm, -updates and -security). If the archive is
unreachable, the newest image built from the same recipe is used and the summary says the key is the
recipe's only.

The cache entry is a directory `<cache>/<recipe>-<versions>/` with boot/{xen.elf,vmlinuz,initrd.img},
dom0.img, packages.txt (what the image contains) and build.json (key, resolved versions). It is built in
`<cache>/.build-<key>-<pid>/` and renamed into place only when complete, so a killed build never leaves a
half image that a later run would boot. A lock file keeps two pytest sessions from building at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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


#: The archive's answer must not hold up the lane: one deadline for all indices together.
ARCHIVE_TIMEOUT = 30.0
#: What the cache key follows beyond the recipe: the dom0 kernel (through the metapackage) and Xen.
KEYED_PACKAGES = ("linux-image-amd64", "xen-hypervisor-4.17-amd64", "xen-utils-4.17")
KERNEL_META = "linux-image-amd64"
#: A Depends entry of the kernel metapackage naming the versioned kernel package.
KERNEL_DEPENDS = re.compile(r"^(linux-image-[0-9][^\s(]*-amd64)\b")
XEN_PACKAGE = "xen-hypervisor-4.17-amd64"


class ImageUnavailable(Exception):
    """The image cannot be built here for a reason outside the project (skip, with this reason)."""


class ImageBuildFailed(Exception):
    """The recipe itself failed (fail, with the build log tail)."""


class ArchiveUnresolved(Exception):
    """The archive's indices could not be read or do not name what the recipe installs."""


@dataclass(frozen=True)
class Resolution:
    """What the archive would install today (`versions`), or why that is unknown (`problem`)."""

    versions: dict[str, str] = field(default_factory=dict)
    problem: str = ""


@dataclass(frozen=True)
class Dom0Image:
    path: Path
    key: str
    #: seconds spent building in this session; 0.0 when the cache was used
    build_seconds: float
    cached: bool
    resolution: Resolution = field(default_factory=Resolution)

    def contents(self) -> dict[str, str]:
        """Package -> version as installed in the image (its packages.txt), {} when absent."""
        try:
            return parse_installed((self.path / "packages.txt").read_text())
        except OSError:
            return {}

    def describe(self) -> str:
        """The summary line: what the image contains and what the archive resolved (or that it could not)."""
        have = self.contents()
        kernel = next((f"{p} {v}" for p, v in sorted(have.items()) if KERNEL_DEPENDS.match(p)), "unknown")
        xen = have.get(XEN_PACKAGE, "unknown")
        line = f"image contains dom0 kernel {kernel}, Xen {xen}; "
        if self.resolution.problem:
            return line + (
                f"archive NOT resolved ({self.resolution.problem}): cache keyed on the recipe only, "
                "this image may differ from what a fresh machine builds"
            )
        want = self.resolution.versions
        line += f"archive resolves dom0 kernel {want.get('kernel', '?')}, Xen {want.get(XEN_PACKAGE, '?')}"
        stale = [p for p, v in want.items() if p in have and have[p] != v]
        if stale:
            line += f" (MISMATCH: {', '.join(f'{p} {have[p]} != {want[p]}' for p in stale)})"
        return line

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


def parse_installed(text: str) -> dict[str, str]:
    """build.sh's packages.txt: `package version` per line."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _order(c: str) -> int:
    # dpkg's character order within a non-digit run: ~ sorts before everything, even the end of the
    # string; letters before other characters.
    if c == "~":
        return -1
    if c in "0123456789":
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and a[i] not in "0123456789") or (j < len(b) and b[j] not in "0123456789"):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        ni = i
        while ni < len(a) and a[ni] in "0123456789":
            ni += 1
        nj = j
        while nj < len(b) and b[nj] in "0123456789":
            nj += 1
        diff = int(a[i:ni] or "0") - int(b[j:nj] or "0")
        if diff:
            return diff
        i, j = ni, nj
    return 0


def compare_versions(a: str, b: str) -> int:
    """Debian version order (epoch, upstream, revision), as apt picks the candidate: <0, 0, >0."""

    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch or "0"), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return ea - eb
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def parse_packages(text: str, wanted: Callable[[str], bool]) -> dict[str, tuple[str, str]]:
    """Package -> (Version, Depends) from a Packages index, the highest version where one repeats."""
    found: dict[str, tuple[str, str]] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        package, version = fields.get("Package", ""), fields.get("Version", "")
        if not package or not version or not wanted(package):
            continue
        if package not in found or compare_versions(version, found[package][0]) > 0:
            found[package] = (version, fields.get("Depends", ""))
    return found


def resolve_versions(indices: Iterable[str]) -> dict[str, str]:
    """What apt would install from these Packages indices: each keyed package at its highest version across
    them, and the versioned kernel package the metapackage depends on (`kernel`: "name version")."""

    def wanted(name: str) -> bool:
        return name in KEYED_PACKAGES or KERNEL_DEPENDS.match(name) is not None

    merged: dict[str, tuple[str, str]] = {}
    for text in indices:
        for package, (version, needs) in parse_packages(text, wanted).items():
            if package not in merged or compare_versions(version, merged[package][0]) > 0:
                merged[package] = (version, needs)
    missing = [p for p in KEYED_PACKAGES if p not in merged]
    if missing:
        raise ArchiveUnresolved(f"the archive's indices do not list {', '.join(missing)}")
    versions = {p: merged[p][0] for p in KEYED_PACKAGES}
    depends = [d.strip() for d in merged[KERNEL_META][1].split(",")]
    kernel = next((m.group(1) for d in depends if (m := KERNEL_DEPENDS.match(d))), None)
    if kernel is None or kernel not in merged:
        raise ArchiveUnresolved(
            f"{KERNEL_META} {versions[KERNEL_META]} names no kernel package the indices list"
        )
    versions[kernel] = merged[kernel][0]
    versions["kernel"] = f"{kernel} {merged[kernel][0]}"
    return versions


def archive_sources() -> list[str]:
    """The Packages.xz URLs mmdebstrap reads for build.sh's sources (bookworm, -updates, -security)."""
    if mirror := os.environ.get("XENLANE_MIRROR"):
        m = mirror.rstrip("/")
        bases = [
            (m, "bookworm"),
            (m, "bookworm-updates"),
            (m.removesuffix("/debian") + "/debian-security", "bookworm-security"),
        ]
    else:
        bases = [
            ("http://deb.debian.org/debian", "bookworm"),
            ("http://deb.debian.org/debian", "bookworm-updates"),
            ("http://security.debian.org/debian-security", "bookworm-security"),
        ]
    return [f"{base}/dists/{suite}/main/binary-amd64/Packages.xz" for base, suite in bases]


def resolve_archive(timeout: float = ARCHIVE_TIMEOUT) -> Resolution:
    """Read the archive's indices now; a Resolution with `problem` set when that is not possible."""
    deadline = time.monotonic() + timeout
    indices: list[str] = []
    try:
        for url in archive_sources():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:.0f}s")
            with urllib.request.urlopen(url, timeout=left) as reply:
                indices.append(lzma.decompress(reply.read()).decode("utf-8", "replace"))
        return Resolution(versions=resolve_versions(indices))
    except (OSError, lzma.LZMAError, ArchiveUnresolved) as exc:
        return Resolution(problem=f"{type(exc).__name__}: {exc}"[:200])


def cache_key(recipe: str, versions: dict[str, str]) -> str:
    """The entry name: the recipe's hash, then a hash of the resolved versions."""
    digest = hashlib.sha256("".join(f"{p}={v}\n" for p, v in sorted(versions.items())).encode())
    return f"{recipe}-{digest.hexdigest()[:12]}"


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
    env = dict(os.environ)
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


def _newest_of_recipe(cache: Path, recipe: str) -> Path | None:
    """The most recently built complete entry of this recipe (any versions): the offline fallback."""
    entries = [p for p in cache.glob(f"{recipe}-*") if is_complete(p)] if cache.is_dir() else []
    return max(entries, key=lambda p: (p / "build.json").stat().st_mtime, default=None)


def ensure_image(
    cache_dir: Path | None = None,
    timeout: float = BUILD_TIMEOUT,
    resolve: Callable[[], Resolution] | None = None,
) -> Dom0Image:
    """Return the cached image for the current recipe and archive state, building it first if needed."""
    cache = cache_dir or default_cache_dir()
    recipe = recipe_key(RECIPE_DIR)
    resolution = (resolve or resolve_archive)()
    if resolution.problem:
        # Offline: the recipe alone decides; the newest image of it is the best guess (and the summary
        # says the key did not follow the archive).
        fallback = _newest_of_recipe(cache, recipe)
        key = fallback.name if fallback is not None else f"{recipe}-unresolved"
    else:
        key = cache_key(recipe, resolution.versions)
    entry = cache / key
    if is_complete(entry):
        os.utime(entry)  # marks it in use for the pruning below
        return Dom0Image(entry, key, 0.0, cached=True, resolution=resolution)
    if reason := build_prerequisites():
        raise ImageUnavailable(reason)
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(entry):  # another session built it while we waited
            return Dom0Image(entry, key, 0.0, cached=True, resolution=resolution)
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
            meta = {
                "key": key,
                "recipe": recipe,
                "resolved": resolution.versions,
                "unresolved_because": resolution.problem,
                "seconds": round(seconds, 1),
                "built_at": time.time(),
            }
            (out / "build.json").write_text(json.dumps(meta, indent=1) + "\n")
            if not is_complete(out):
                raise ImageBuildFailed(f"build.sh exited 0 but left no complete image:\n{_tail(log_path)}")
            shutil.rmtree(entry, ignore_errors=True)
            out.rename(entry)
        finally:
            _remove_build_dir(work)
        # Images are 800 MB each: drop other keys' images unused for a day (another checkout may still
        # use a recent one).
        for old in cache.iterdir():
            unused = time.time() - old.stat().st_mtime > PRUNE_AFTER
            if old.is_dir() and old.name != key and not old.name.startswith(".") and unused:
                shutil.rmtree(old, ignore_errors=True)
        return Dom0Image(entry, key, seconds, cached=False, resolution=resolution)
