"""Build what an admin installs from the current tree: the Debian package (bookworm's toolchain,
`dpkg-buildpackage -b -us -uc`) and the wheel. Shared by the packaging tests and the Xen lane, which
installs both in dom0, so the lane always tests the code of this checkout, never a cached build.

The build runs on a copy of the tree (tracked and new files, nothing ignored) in a directory the
caller owns: the checkout stays untouched and a half build never leaks into it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Debian's own tools only: a venv's or pyenv's python3 earlier in PATH is not bookworm's toolchain.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/nonexistent"}
DEB_TIMEOUT = 900.0
WHEEL_TIMEOUT = 300.0


class BuildUnavailable(Exception):
    """The build tools or build dependencies are missing here (skip, with this reason)."""


class BuildFailed(Exception):
    """The tree itself does not build (fail, with the log tail)."""


@dataclass(frozen=True)
class Built:
    deb: Path
    changes: Path
    log: str
    seconds: float


def run(
    argv: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=ENV if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def copy_tree(dest: Path, repo: Path = REPO) -> Path:
    """Copy the checkout's tracked and untracked-but-not-ignored files to dest/xenblockctl."""
    tree = dest / "xenblockctl"
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], repo, 60)
    if files.returncode != 0:
        raise BuildFailed(f"git ls-files in {repo}: {files.stderr.strip()}")
    for name in filter(None, files.stdout.split("\0")):
        source = repo / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    return tree


def build_deb(tree: Path) -> Built:
    """dpkg-buildpackage in `tree` (a copy_tree result); the .deb lands next to it."""
    for tool in ("dpkg-buildpackage", "dpkg-checkbuilddeps"):
        if shutil.which(tool) is None:
            raise BuildUnavailable(f"{tool} not installed (Debian package dpkg-dev)")
    deps = run(["dpkg-checkbuilddeps"], tree, 60)
    if deps.returncode != 0:
        raise BuildUnavailable(f"build dependencies missing: {deps.stderr.strip()}")
    start = time.monotonic()
    result = run(["dpkg-buildpackage", "-b", "-us", "-uc"], tree, DEB_TIMEOUT)
    if result.returncode != 0:
        raise BuildFailed("dpkg-buildpackage failed:\n" + result.stdout[-4000:] + result.stderr[-4000:])
    # Architecture: any since the native fast path (backend/_fastpass.c): xenblockctl_V_amd64.deb
    (deb,) = tree.parent.glob("xenblockctl_*.deb")
    (changes,) = tree.parent.glob("xenblockctl_*.changes")
    return Built(deb, changes, result.stdout, time.monotonic() - start)


def build_wheel(tree: Path, out: Path, python: str = sys.executable) -> Path:
    """`pip wheel` of `tree` into `out` with the test environment's pip (as a user on any host would)."""
    # The caller's environment (pip's index configuration), minus what would point at the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = run(
        [python, "-m", "pip", "wheel", str(tree), "--no-deps", "-q", "-w", str(out)],
        tree.parent,
        WHEEL_TIMEOUT,
        env,
    )
    if result.returncode != 0:
        raise BuildFailed("pip wheel failed:\n" + result.stdout[-4000:] + result.stderr[-4000:])
    (wheel,) = out.glob("xenblockctl-*.whl")
    return wheel
