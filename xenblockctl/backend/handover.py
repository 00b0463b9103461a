"""What outlives the engine process: each served device's fd, parked in the service manager's fd
store under its backend's name, and taken back by the next engine (issue 21).

Under systemd (`Type=notify`, `FileDescriptorStoreMax=` > 0, $NOTIFY_SOCKET set) every device the
engine opens is parked (FDSTORE=1, FDNAME=`<kind>-<domid>-<devid>`: the engine serves only its own
domain's backend/<kind>, so kind, domid and devid name the backend directory unambiguously) and
dropped (FDSTOREREMOVE=1) when that backend is torn down. A restarted engine gets them back
(LISTEN_FDS/LISTEN_FDNAMES), and the manager keeps its copies while it restarts the unit: so an
auto-clearing loop device or a deferred-remove dm device that only the store held stays alive across
an engine crash. Taken back, an fd is only a candidate: the state machine re-verifies it against the
published identity (backend/xenbus.py) before serving it.

Delete-on-close still holds: if nothing takes the fds back (the unit is stopped, systemd gives up
restarting it), the manager closes its copies and the devices go as before. An fd nobody claims at
start (no such backend any more) is closed here, with the reason logged.

Without $NOTIFY_SOCKET nothing is parked and nothing changes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import MutableMapping

from xenblockctl.backend import sdnotify
from xenblockctl.journal import Journal


def fd_name(kind: str, domid: int, devid: int) -> str:
    """The FDNAME of backend/<kind>/<domid>/<devid> in the engine's own domain."""
    return sdnotify.fd_name(f"{kind}-{domid}-{devid}")


class FdStore:
    """The engine's side of the fd store: what it inherited at start, and park/unpark."""

    def __init__(self, env: MutableMapping[str, str], journal: Journal) -> None:
        self.env = env
        self.journal = journal
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        try:
            self.inherited = sdnotify.listen_fds(env)
        except sdnotify.NotifyError as exc:
            # fds we cannot attribute are never served; the manager still holds its copies
            journal.error(f"ignoring the fds passed at start: {exc.one_line()}", CODE=exc.code)
            self.inherited = {}
        if self.inherited:
            names = ", ".join(f"{name} ({len(fds)})" for name, fds in sorted(self.inherited.items()))
            journal.info(f"fd store handed back: {names}")

    @classmethod
    def from_environ(cls, journal: Journal) -> FdStore:
        return cls(os.environ, journal)

    def take(self, name: str) -> int | None:
        """The fd parked under `name` by a previous engine, now ours to verify (None if none). Extra
        fds under the same name (cannot happen with one park per open) are closed and logged."""
        fds = self.inherited.pop(name, [])
        for extra in fds[1:]:
            self.journal.warning(f"fd store: closing a second fd parked under {name}")
            with contextlib.suppress(OSError):
                os.close(extra)
        return fds[0] if fds else None

    def park(self, name: str, fd: int) -> bool:
        """Hand a copy of `fd` to the manager. A failure is logged and costs only the takeover."""
        if not self.enabled:
            return False
        try:
            return sdnotify.store_fds(self.env, name, [fd])
        except sdnotify.NotifyError as exc:
            self.journal.warning(
                f"{name}: cannot park the device in the fd store ({exc.one_line()}); an engine"
                " restart will lose it",
                CODE=exc.code,
            )
            return False

    def unpark(self, name: str) -> None:
        """The backend is torn down: the manager closes its copy (delete-on-close proceeds)."""
        if not self.enabled:
            return
        try:
            sdnotify.remove_fds(self.env, name)
        except sdnotify.NotifyError as exc:
            self.journal.error(
                f"{name}: cannot remove the device from the fd store ({exc.one_line()}); it stays"
                " held until the unit stops",
                CODE=exc.code,
            )

    def close_unclaimed(self) -> list[str]:
        """Close every inherited fd no backend claimed, and tell the manager to drop its copies."""
        names = sorted(self.inherited)
        for name in names:
            for fd in self.inherited.pop(name):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.journal.warning(f"fd store: {name} names no backend waiting for its device; closed it")
            self.unpark(name)
        return names

    def ready(self, status: str) -> None:
        if not self.enabled:
            return
        try:
            sdnotify.ready(self.env, status)
        except sdnotify.NotifyError as exc:
            self.journal.error(f"cannot tell the manager we are ready: {exc.one_line()}", CODE=exc.code)
