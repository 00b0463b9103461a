"""Logging for code that runs where stderr is usually lost (libxl, udev, daemons).

Each record goes to the systemd journal with structured fields when its socket exists, else to
syslog (/dev/log), and always to stderr. Stdlib only and cheap to import: the hotplug path uses it."""

from __future__ import annotations

import _socket
import posix
import sys

from xenblockctl import pathsteps

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"

ERR = 3
WARNING = 4
INFO = 6
DEBUG = 7

#: Fields every record of this process carries: the warm server's worker adds CLIENT_PID, the pid
#: libxl logs for the run (blockscript/warm.py), so libxl's log and the journal can be matched.
PROCESS_FIELDS: dict[str, str] = {}


class Journal:
    def __init__(self, identifier: str, *, stderr: bool = True, **fields: object) -> None:
        self.identifier = identifier
        self.fields = {**PROCESS_FIELDS, **{k.upper(): str(v) for k, v in fields.items()}}
        self.stderr = stderr
        # `_socket`, not `socket`: the latter costs ~5 ms at every hotplug start (bench/README.md).
        self._sock: _socket.socket | None = None
        self._target: str | None = next(
            (p for p in (JOURNAL_SOCKET, SYSLOG_SOCKET) if pathsteps.exists(p)), None
        )

    def bind(self, **fields: object) -> None:
        self.fields.update({k.upper(): str(v) for k, v in fields.items()})

    def log(self, priority: int, message: str, **fields: object) -> None:
        if self.stderr:
            print(f"{self.identifier}: {message}", file=sys.stderr, flush=True)
        if self._target is None:
            return
        try:
            if self._sock is None:
                self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
            self._sock.sendto(self._encode(priority, message, fields), self._target)
        except OSError:
            self._target = None  # a logging failure must never fail an attach

    def _encode(self, priority: int, message: str, fields: dict[str, object]) -> bytes:
        if self._target == JOURNAL_SOCKET:
            items = {"MESSAGE": message, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": self.identifier}
            items.update(self.fields)
            items.update({k.upper(): str(v) for k, v in fields.items()})
            # Values with newlines would need the binary form; our messages are one line.
            return "".join(f"{k}={' '.join(v.splitlines())}\n" for k, v in items.items()).encode()
        context = " ".join(f"{k}={v}" for k, v in {**self.fields, **fields}.items())
        # syslog: facility daemon (3) << 3 | priority
        return f"<{(3 << 3) | priority}>{self.identifier}[{posix.getpid()}]: {message} {context}".encode()

    def info(self, message: str, **fields: object) -> None:
        self.log(INFO, message, **fields)

    def warning(self, message: str, **fields: object) -> None:
        self.log(WARNING, message, **fields)

    def error(self, message: str, **fields: object) -> None:
        self.log(ERR, message, **fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
