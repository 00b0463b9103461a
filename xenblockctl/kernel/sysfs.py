"""Read-only sysfs lookups by major:minor (no udev needed: /dev/block and /dev/disk may not exist).

Plain string paths, not pathlib: a block-device add looks up its device's holders here, and
pathlib (with fnmatch, re, enum, urllib.parse and ipaddress) cost ~5 ms of CPU, a fifth of
that add (bench/README.md, issue 18 round 6); and posix, not os, for the same reason (~1 ms: issue
18 round 10)."""

from __future__ import annotations

import posix

SYS_DEV_BLOCK = "/sys/dev/block"


def block_dir(major: int, minor: int) -> str:
    """/sys/dev/block/M:m, which resolves to the device's sysfs directory."""
    return f"{SYS_DEV_BLOCK}/{major}:{minor}"


def read_attr(major: int, minor: int, name: str) -> str | None:
    """One sysfs attribute, stripped; None when absent (e.g. loop/backing_file of an unbound loop)."""
    try:
        with open(f"{block_dir(major, minor)}/{name}", encoding="utf-8") as f:
            return f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def kernel_name(major: int, minor: int) -> str | None:
    """The kernel's name for the device (loop3, dm-0, xvda). The CLI's only (inventory): os here."""
    import os

    try:
        return os.path.basename(os.path.realpath(block_dir(major, minor)))
    except OSError:
        return None


def holders(major: int, minor: int) -> list[str]:
    """Kernel names of devices stacked on this one (dm tables, md arrays)."""
    try:
        return sorted(posix.listdir(f"{block_dir(major, minor)}/holders"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def dm_name(major: int, minor: int) -> str | None:
    return read_attr(major, minor, "dm/name")


def dm_uuid(major: int, minor: int) -> str | None:
    return read_attr(major, minor, "dm/uuid")
