"""Target forms the block script accepts in `params`, and opening them with identity from the fd.

Forms (documented in block-xenblockctl(8)):
  /path/to/file            regular file -> a fresh loop device (read-only for mode r)
  /dev/...                 any block device, opened by path
  /dev/mapper/NAME         block device whose dm name, read for the *opened* device, must be NAME
  /dev/disk/by-diskseq/N   block device whose diskseq, read from the opened fd, must be N
  raw:PATH / aio:PATH      the same with libxl's tap-style format prefix (backendtype=tap)

The path is opened exactly once; every identity fact (major:minor, diskseq, dm name) comes from
that fd, so a rename, re-create or symlink swap between checks cannot hand out another disk."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from xenblockctl.errors import XenblockError
from xenblockctl.kernel import blockdev, loop, sysfs
from xenblockctl.kernel.blockdev import BlockDevice, BlockIdentity
from xenblockctl.kernel.errors import IdentityMismatch

#: libxl tap-style format prefixes that still mean "a raw image or device at this path".
RAW_PREFIXES = ("raw:", "aio:")
PATH_MAX = 4096
NAME_MAX = 255
DM_PREFIX = "/dev/mapper/"
DISKSEQ_PREFIX = "/dev/disk/by-diskseq/"


class TargetSyntaxError(XenblockError):
    """`params` is not a target form we accept."""

    code = "bad-params"


@dataclass(frozen=True)
class Target:
    """A parsed, validated target. `path` is absolute; the expectations are checked after opening."""

    path: str
    expect_dm_name: str | None = None
    expect_diskseq: int | None = None


def parse_target(params: str) -> Target:
    """Validate `params` strictly: absolute, printable, bounded; known prefixes only."""
    if not params:
        raise TargetSyntaxError("params is empty")
    path = params
    for prefix in RAW_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    if len(path) >= PATH_MAX or any(len(part) > NAME_MAX for part in path.split("/")):
        raise TargetSyntaxError("params is longer than PATH_MAX or has a component longer than NAME_MAX")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise TargetSyntaxError("params contains control characters")
    if not path.startswith("/"):
        raise TargetSyntaxError(f"params must be an absolute path, got {_show(path)}")
    if "/../" in path + "/" or "/./" in path + "/":
        raise TargetSyntaxError(f"params must not contain . or .. components: {_show(path)}")
    if path.startswith(DM_PREFIX):
        name = path[len(DM_PREFIX) :]
        if not name or "/" in name or name in (".", "..", "control"):
            raise TargetSyntaxError(f"bad device-mapper name in {_show(path)}")
        return Target(path, expect_dm_name=name)
    if path.startswith(DISKSEQ_PREFIX):
        raw = path[len(DISKSEQ_PREFIX) :]
        if not raw.isdigit() or raw.startswith("0") or len(raw) > 20 or int(raw) >= 2**64:
            raise TargetSyntaxError(f"bad diskseq in {_show(path)}")
        return Target(path, expect_diskseq=int(raw))
    return Target(path)


def _show(text: str, limit: int = 80) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def open_target(target: Target, *, writable: bool, tag: str, autoclear: bool = True) -> BlockDevice:
    """Open the target once: a regular file becomes a new loop device (tagged `tag`); a block device
    is used as is after its expectations are checked on the opened fd. The caller owns the result
    and must keep it open until the consumer holds its own reference (delete-on-close)."""
    fd = blockdev.open_path(target.path, writable=writable)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            if target.expect_dm_name is not None or target.expect_diskseq is not None:
                raise IdentityMismatch(f"{target.path} is a regular file, expected a block device")
            return loop.attach_fd(
                fd, read_only=not writable, tag=tag, autoclear=autoclear, backing_path=target.path
            )
        device = BlockDevice(fd, blockdev.identify(fd), target.path)
        fd = -1  # owned by `device` now
        try:
            check_expectations(target, device.identity)
        except BaseException:
            device.close()
            raise
        return device
    finally:
        if fd >= 0:
            os.close(fd)


def check_expectations(target: Target, ident: BlockIdentity) -> None:
    """The identity checks a /dev/mapper/NAME or by-diskseq target promises, on the opened device."""
    if target.expect_dm_name is not None:
        name = sysfs.dm_name(ident.major, ident.minor)
        if name != target.expect_dm_name:
            raise IdentityMismatch(
                f"{target.path} opened {ident.major}:{ident.minor} whose dm name is {name!r}, not "
                f"{target.expect_dm_name!r} (renamed or re-created while opening)"
            )
    if target.expect_diskseq is not None and ident.diskseq != target.expect_diskseq:
        raise IdentityMismatch(
            f"{target.path} opened a device with diskseq {ident.diskseq}, not {target.expect_diskseq}"
            " (by-diskseq links go stale after a detach)"
        )
