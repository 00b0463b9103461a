"""Start a daemon that says it is ready with one line on stdout (the embedded xenstored prints
`xenstored ready socket=...`, the engine `engine ready`), and stop it again: what xencommons does
on a Xen host, for `xenblockctl sandbox` and the tests, which run both as child processes.

    daemon = ReadyDaemon("xenstored", argv, "xenstored ready", log_path)   # raises DaemonNotReady
    daemon.stop() -> exit status                                           # SIGTERM, then SIGKILL

stderr goes to `log_path`, never to a pipe: nobody drains a pipe while the daemon runs, and a
chatty daemon would block once 64 KiB of log piled up. The child is always reaped."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from xenblockctl.errors import XenblockError

#: After SIGTERM a daemon tears down what it serves; past this it is killed.
STOP_TIMEOUT = 30.0


class DaemonNotReady(XenblockError):
    code = "daemon-not-ready"

    def __init__(self, message: str, *, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


class ReadyDaemon:
    """One child process that printed its ready line; `stop()` may be called any number of times."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: str,
        log_path: Path,
        *,
        timeout: float = 20.0,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the daemon
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=self._log,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                pass_fds=pass_fds,
            )
        except BaseException:
            self._log.close()
            raise
        assert self.proc.stdout is not None
        self.ready_line = _readline(self.proc.stdout.fileno(), timeout).decode(errors="replace")
        if not self.ready_line.startswith(ready):
            self.stop()
            found = self.ready_line.strip() or "no ready line"
            raise DaemonNotReady(
                f"{name} did not start: {found}; see {self.log_path}", log_path=self.log_path
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        """What the daemon wrote to stderr so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, SIGKILL if it is still there after `timeout`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


def _readline(fd: int, timeout: float) -> bytes:
    """One line from a child's stdout within the deadline (what came, b"" included, if it exited
    or the deadline passed): a plain readline would wait forever on a daemon that hangs."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf
