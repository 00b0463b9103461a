"""Typed xenstore errors. Codes are documented in xenblockctl(1), ERROR CODES.

xenstored answers failures with an errno *name* (`ENOENT\\0`); we turn that into a subclass per
errno a caller acts on (missing node, conflict, permission), so callers write
`except XenstoreNoEntry` instead of comparing numbers, and libxl's `hotplug-error` line still
carries a stable code like `xenstore-enoent`.
"""

from __future__ import annotations

import errno as _errno

from xenblockctl.errors import XenblockError

#: The daemon has no EQUOTA errno; quota refusals come back as ENOSPC (C xenstored) and E2BIG
#: (node size). Kept as a name so call sites read like the protocol documentation.
EQUOTA = _errno.ENOSPC


class XenstoreError(XenblockError):
    """Any failure talking to xenstored. `errno` is set when the daemon (or the OS) gave one."""

    code = "xenstore-error"


class XenstoreNoEntry(XenstoreError):
    code = "xenstore-enoent"


class XenstorePermissionDenied(XenstoreError):
    code = "xenstore-eacces"


class XenstoreExists(XenstoreError):
    code = "xenstore-eexist"


class XenstoreInvalid(XenstoreError):
    """The daemon, or our own validation before sending, rejected a path, value or argument."""

    code = "xenstore-einval"


class XenstoreTooBig(XenstoreError):
    """A request would exceed XENSTORE_PAYLOAD_MAX (4096) or a path length limit."""

    code = "xenstore-e2big"


class XenstoreQuota(XenstoreError):
    code = "xenstore-equota"


class TransactionConflict(XenstoreError):
    """EAGAIN: the transaction touched a node somebody else changed; re-run the whole body."""

    code = "xenstore-eagain"


class XenstoreTimeout(XenstoreError):
    """No reply within the deadline. The connection is closed afterwards: its state is unknown."""

    code = "xenstore-timeout"


class XenstoreDisconnected(XenstoreError):
    """The daemon closed the connection, died, or sent something we cannot parse."""

    code = "xenstore-disconnected"


class XenstoreUnavailable(XenstoreError):
    """No xenstored could be reached on any of the places libxenstore looks."""

    code = "xenstore-unavailable"


_BY_ERRNO: dict[int, type[XenstoreError]] = {
    _errno.ENOENT: XenstoreNoEntry,
    _errno.EACCES: XenstorePermissionDenied,
    _errno.EPERM: XenstorePermissionDenied,
    _errno.EEXIST: XenstoreExists,
    _errno.EINVAL: XenstoreInvalid,
    _errno.E2BIG: XenstoreTooBig,
    EQUOTA: XenstoreQuota,
    _errno.EAGAIN: TransactionConflict,
}

#: errno names xenstored sends (xs_wire.h xsd_errors[]), mapped through the host's errno table.
_NAME_TO_ERRNO: dict[str, int] = {name: num for num, name in _errno.errorcode.items()}


def errno_from_name(name: str) -> int | None:
    return _NAME_TO_ERRNO.get(name)


def error_for(errno: int | None, message: str) -> XenstoreError:
    """The typed error for an errno; unknown ones get the base class with `xenstore-<ename>`."""
    if errno is None:
        return XenstoreError(message)
    cls = _BY_ERRNO.get(errno)
    if cls is not None:
        return cls(message, errno=errno)
    name = _errno.errorcode.get(errno, "unknown").lower()
    return XenstoreError(message, code=f"xenstore-{name}", errno=errno)
