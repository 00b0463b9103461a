"""Target forms the block script accepts in `params`: parsing and validation, nothing opened.

Forms (documented in block-xenblockctl(8)):
  /path/to/file            regular file -> a fresh loop device (read-only for mode r)
  /dev/...                 any block device, opened by path
  /dev/mapper/NAME         the dm device called NAME (asked of the kernel, confirmed on the fd)
  /dev/VG/LV               an LVM volume: the dm device VG-LV, confirmed like /dev/mapper/NAME
  /dev/disk/by-diskseq/N   block device whose diskseq, read from the opened fd, must be N
  uuid:DMUUID              the dm device with this uuid, confirmed on the fd
  snapshot:/path/base.img  a throwaway writable view of a read-only base (dmtargets.py)
  raw:PATH / aio:PATH      the same with libxl's tap-style format prefix (backendtype=tap)
  nbd://HOST[:PORT]/EXPORT an NBD export (nbd/uri.py: doc/uri.md's syntax; TLS forms refused), made
  nbd+unix:///EXPORT?socket=/PATH   into a fresh kernel NBD device (claim.py, kernel/nbd.py)

claim.py opens a parsed target exactly once; every identity fact (major:minor, diskseq, dm name and
uuid) comes from that fd, so a rename, re-create or symlink swap between checks cannot hand out
another disk. dm forms are opened through /dev/mapper/control (dmtargets.py); where the kernel has
no dm control node, /dev/mapper/NAME falls back to opening the path and checking sysfs dm/name."""

from __future__ import annotations

import _stat
import posix

from xenblockctl.errors import XenblockError
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore.numbers import uint_or_none

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from xenblockctl.nbd.uri import NbdUri

#: libxl tap-style format prefixes that still mean "a raw image or device at this path".
RAW_PREFIXES = ("raw:", "aio:")
UUID_PREFIX = "uuid:"
SNAPSHOT_PREFIX = "snapshot:"
PATH_MAX = 4096
NAME_MAX = 255
DM_PREFIX = "/dev/mapper/"
#: NBD URI schemes (nbd/uri.py refuses the TLS ones with a reason): kept here as text so that a
#: path target never imports the NBD code
NBD_PREFIXES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")
#: Every `params` form that is not a plain absolute path starts with one of these.
TARGET_PREFIXES = (*RAW_PREFIXES, UUID_PREFIX, SNAPSHOT_PREFIX, *NBD_PREFIXES)


def has_target_prefix(params: str) -> bool:
    return params.startswith(TARGET_PREFIXES)


DISKSEQ_PREFIX = "/dev/disk/by-diskseq/"


class TargetSyntaxError(XenblockError):
    """`params` is not a target form we accept."""

    code = "bad-params"


class Target(NamedTuple):
    """A parsed, validated target. `path` is absolute (for `uuid:` it is the params text, never
    opened); the expectations are checked after opening."""

    path: str
    expect_dm_name: str | None = None
    expect_diskseq: int | None = None
    #: `uuid:` form: the dm device carrying this uuid.
    dm_uuid: str | None = None
    #: `snapshot:` form: `path` is the read-only base of a volatile disk.
    snapshot: bool = False
    #: NBD form: the export (`path` is its canonical URI, never opened as a path).
    nbd: NbdUri | None = None


def parse_target(params: str) -> Target:
    """Validate `params` strictly: absolute, printable, bounded; known prefixes only."""
    if not params:
        raise TargetSyntaxError("params is empty")
    if params.startswith(UUID_PREFIX):
        return _parse_uuid(params)
    if params[:12].lower().startswith(NBD_PREFIXES):
        from xenblockctl.nbd import uri  # only for NBD targets: the hotplug path of files stays small

        export = uri.parse(params)
        return Target(export.canonical(), nbd=export)
    if params.startswith(SNAPSHOT_PREFIX):
        # The base must be a regular file (checked on the opened fd): it is attached read-only.
        return Target(_parse_path(params[len(SNAPSHOT_PREFIX) :]).path, snapshot=True)
    path = params
    for prefix in RAW_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    return _parse_path(path)


def _parse_uuid(params: str) -> Target:
    from xenblockctl.kernel.dm_abi import validate_uuid

    uuid = params[len(UUID_PREFIX) :]
    try:
        validate_uuid(uuid)
    except ValueError as exc:
        raise TargetSyntaxError(f"bad device-mapper uuid in {_show(params)}: {exc}") from exc
    return Target(params, dm_uuid=uuid)


def _parse_path(path: str) -> Target:
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
        from xenblockctl.kernel.dm_abi import validate_name

        try:
            validate_name(name)
        except ValueError as exc:
            raise TargetSyntaxError(f"bad device-mapper name in {_show(path)}: {exc}") from exc
        return Target(path, expect_dm_name=name)
    if path.startswith(DISKSEQ_PREFIX):
        raw = path[len(DISKSEQ_PREFIX) :]
        diskseq = uint_or_none(raw, maximum=(1 << 64) - 1)
        if not diskseq:
            raise TargetSyntaxError(f"bad diskseq in {_show(path)}")
        return Target(path, expect_diskseq=diskseq)
    return Target(path)


def _show(text: str, limit: int = 80) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def maybe_dm(target: Target) -> bool:
    """Whether the target may be a named dm device (`uuid:`, /dev/mapper/NAME, or a /dev/X/Y block
    device that is a dm device, as LVM's /dev/VG/LV are; dmtargets checks the name). Cheap, so that
    plain targets never import the dm code."""
    if target.dm_uuid is not None or target.expect_dm_name is not None:
        return True
    parts = target.path.split("/")
    if target.snapshot or len(parts) != 4 or parts[:2] != ["", "dev"]:
        return False
    try:
        st = posix.stat(target.path)
    except OSError:
        return False  # opening the path reports it
    from xenblockctl.kernel import sysfs  # here, not at the top: pathlib stays off a file add

    return (
        _stat.S_ISBLK(st.st_mode)
        and sysfs.dm_name(posix.major(st.st_rdev), posix.minor(st.st_rdev)) is not None
    )
