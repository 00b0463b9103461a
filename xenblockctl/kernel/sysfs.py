"""Read-only sysfs lookups by major:minor (no udev needed: /dev/block and /dev/disk may not exist)."""

from __future__ import annotations

import os
from pathlib import Path

SYS_DEV_BLOCK = Path("/sys/dev/block")


def block_dir(major: int, minor: int) -> Path:
    """/sys/dev/block/M:m resolved to the device's sysfs directory."""
    return SYS_DEV_BLOCK / f"{major}:{minor}"


def read_attr(major: int, minor: int, name: str) -> str | None:
    """One sysfs attribute, stripped; None when absent (e.g. loop/backing_file of an unbound loop)."""
    try:
        return (block_dir(major, minor) / name).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def kernel_name(major: int, minor: int) -> str | None:
    """The kernel's name for the device (loop3, dm-0, xvda)."""
    try:
        return os.path.basename(os.path.realpath(block_dir(major, minor)))
    except OSError:
        return None


def holders(major: int, minor: int) -> list[str]:
    """Kernel names of devices stacked on this one (dm tables, md arrays)."""
    try:
        return sorted(os.listdir(block_dir(major, minor) / "holders"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def dm_name(major: int, minor: int) -> str | None:
    return read_attr(major, minor, "dm/name")


def dm_uuid(major: int, minor: int) -> str | None:
    return read_attr(major, minor, "dm/uuid")
