"""The service manager's notification protocol and file-descriptor store, spoken directly.

Issue 21 (guests keep their disks across an engine restart) builds on this: the engine parks each
device fd in systemd's fd store, named after its backend, so that a restarted engine takes the same
open devices back instead of finding them auto-cleared.

The protocol (sd_notify(3), sd_listen_fds(3), systemd.service(5)) is small enough to implement
without a library, and doing so costs the engine no start-up time:
- `notify(...)`: one datagram of newline-separated `KEY=VALUE` lines to the AF_UNIX socket named by
  $NOTIFY_SOCKET (a path, or `@name` for the abstract namespace), with fds attached as SCM_RIGHTS.
  `FDSTORE=1` + `FDNAME=name` parks the attached fds; `FDSTOREREMOVE=1` + `FDNAME=name` drops them
  (only with `FileDescriptorStoreMax=` > 0 on the unit, `Type=notify`).
- `listen_fds(env)`: what the manager passed back at start: $LISTEN_PID must be our pid,
  $LISTEN_FDS fds start at 3, $LISTEN_FDNAMES names them (colon-separated). Each name may come
  several times (one per fd parked under it). The variables are consumed (removed from `env`) so a
  child process does not take them for its own.

Names are restricted to what FDNAME allows (printable ASCII, no `:`, at most 255 characters);
`fd_name()` checks them. No notification socket: `notify` returns False and nothing is sent (not
running under a service manager, or `NotifyAccess=` forbids us: the caller logs what it means).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
from collections.abc import Iterable, MutableMapping, Sequence

from xenblockctl.errors import XenblockError

#: the first fd the manager passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: FDNAME's limit (systemd: fdname_is_valid)
MAX_NAME = 255


class NotifyError(XenblockError):
    code = "sd-notify"


def fd_name(name: str) -> str:
    """`name` if FDNAME accepts it: 1-255 printable ASCII characters, no ':'."""
    if not 0 < len(name) <= MAX_NAME or not name.isascii() or not name.isprintable() or ":" in name:
        raise NotifyError(f"{name[:60]!r} is not a valid FDNAME (1-255 printable ASCII, no ':')")
    return name


def _address(env: MutableMapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    if not path.startswith("/"):
        raise NotifyError(f"NOTIFY_SOCKET={path[:80]!r} is neither an absolute path nor @abstract")
    return path


def notify(env: MutableMapping[str, str], lines: Iterable[str], fds: Sequence[int] = ()) -> bool:
    """Send one notification (lines `KEY=VALUE`) with `fds` attached; False without a manager."""
    address = _address(env)
    if address is None:
        return False
    message = "\n".join(lines).encode()
    if b"\0" in message:
        raise NotifyError("a notification cannot contain NUL")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendmsg([message], anc, 0, address)
        except OSError as exc:
            raise NotifyError("cannot notify the service manager", errno=exc.errno) from exc
    return True


def store_fds(env: MutableMapping[str, str], name: str, fds: Sequence[int]) -> bool:
    """Park `fds` in the manager's fd store under `name` (FDSTORE=1)."""
    return notify(env, ["FDSTORE=1", f"FDNAME={fd_name(name)}"], fds)


def remove_fds(env: MutableMapping[str, str], name: str) -> bool:
    """Drop every fd parked under `name` (FDSTOREREMOVE=1): the manager closes its copies."""
    return notify(env, ["FDSTOREREMOVE=1", f"FDNAME={fd_name(name)}"])


def ready(env: MutableMapping[str, str], status: str = "") -> bool:
    lines = ["READY=1"]
    if status:
        lines.append(f"STATUS={status}")
    return notify(env, lines)


def listen_fds(env: MutableMapping[str, str]) -> dict[str, list[int]]:
    """The fds the manager passed us, by name ({} if none were, or they were meant for another
    process). The variables are removed from `env`; every fd gets FD_CLOEXEC."""
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return {}
    if not pid.isascii() or not count.isascii():
        raise NotifyError("LISTEN_PID/LISTEN_FDS are not numbers")
    try:
        if int(pid) != os.getpid():
            return {}
        n = int(count)
    except ValueError:
        raise NotifyError(f"LISTEN_PID={pid[:20]!r} / LISTEN_FDS={count[:20]!r} are not numbers") from None
    if not 0 <= n <= 65536:
        raise NotifyError(f"LISTEN_FDS={n} is out of range")
    names = names_text.split(":") if names_text else ["unknown"] * n
    if len(names) != n:
        raise NotifyError(f"LISTEN_FDNAMES has {len(names)} names for {n} fds")
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        fd = LISTEN_FDS_START + i
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        out.setdefault(name, []).append(fd)
    return out
