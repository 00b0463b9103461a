"""Exit statuses and hints of the admin CLI (documented in xenblockctl(1), EXIT STATUS).

Published statuses never change meaning; new ones get new numbers."""

from __future__ import annotations

from xenblockctl.errors import XenblockError

EXIT_OK = 0
#: a coded error not listed below
EXIT_ERROR = 1
#: bad command line (click's UsageError)
EXIT_USAGE = 2
#: the domain, vbd, target or device named does not exist
EXIT_NOT_FOUND = 3
#: in use: the target is attached elsewhere, the vdev is taken, the guest holds the disk
EXIT_BUSY = 4
#: a wait ran out: the frontend did not connect, xenstored did not answer
EXIT_TIMEOUT = 5
#: doctor found errors (or warnings with --strict)
EXIT_UNHEALTHY = 6

_BY_CODE: dict[str, int] = {
    "domain-missing": EXIT_NOT_FOUND,
    "vbd-missing": EXIT_NOT_FOUND,
    "target-missing": EXIT_NOT_FOUND,
    "backend-missing": EXIT_NOT_FOUND,
    "dm-missing": EXIT_NOT_FOUND,
    "busy": EXIT_BUSY,
    "vdev-in-use": EXIT_BUSY,
    "lock-timeout": EXIT_BUSY,
    "loop-busy": EXIT_BUSY,
    "dm-busy": EXIT_BUSY,
    "detach-stuck": EXIT_BUSY,
    "wait-timeout": EXIT_TIMEOUT,
    "handoff-timeout": EXIT_TIMEOUT,
    "xenstore-timeout": EXIT_TIMEOUT,
    # a bad command-line value, found after click parsed it: still a usage error
    "vdev-invalid": EXIT_USAGE,
    "disk-spec-invalid": EXIT_USAGE,
}

#: Hints for codes raised below the CLI (which cannot know what the admin should do next).
_HINTS: dict[str, str] = {
    "xenstore-unavailable": "is xenstored running? set XENSTORED_PATH, or without Xen run "
    "`xenblockctl xenstored --socket PATH`",
    "xenstore-eacces": "run as root (dom0)",
    "kernel-unsupported": "xenblockctl needs Linux >= 5.15 (LOOP_CONFIGURE and diskseq)",
    "target-permission": "run as root, or use --mode r for a read-only target",
    "target-missing": "give an absolute path to an image file or block device",
    "busy": "a disk may be shared only read-only by everyone: `xenblockctl list` shows its users",
    "handoff-timeout": "modprobe xen-blkback, or start the engine (systemctl start xenblockctl-engine)",
    "bad-config": "see xenblockctl.conf(5); `xenblockctl config show` prints the effective values",
    "bad-setting": "see xenblockctl.conf(5) for the ranges",
    "bad-params": "the target must be an absolute path to a file or block device",
    "identity-mismatch": "the device changed under us; retry, and check nothing else re-uses it",
    "not-ours": "xenblockctl only touches devices it made; detach others with losetup/dmsetup",
    "loop-busy": "retry; `xenblockctl doctor` checks for leaked loop devices",
    "internal": "rerun with --debug and report the traceback",
    "vdev-invalid": "name it as xen-vbd-interface(7) does: xvdb, sdc, hda, d1p2, or its number (51728)",
}


def exit_code_for(exc: XenblockError) -> int:
    return _BY_CODE.get(exc.code, EXIT_ERROR)


def hint_for(exc: XenblockError) -> str | None:
    hint = getattr(exc, "hint", None)
    if isinstance(hint, str) and hint:
        return hint
    return _HINTS.get(exc.code)
