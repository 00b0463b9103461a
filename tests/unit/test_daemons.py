"""ReadyDaemon: started only once it printed its ready line, always reaped, stderr kept in its log."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from xenblockctl.toolstack.daemons import DaemonNotReady, ReadyDaemon

#: A daemon in miniature: logs, says it is ready, exits 0 on SIGTERM (Python's default is -15).
READY = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
    "print('oops on stderr', file=sys.stderr, flush=True); print('toy ready now', flush=True); time.sleep(60)"
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ready_line_then_sigterm_stop(tmp_path: Path) -> None:
    daemon = ReadyDaemon("toy", [sys.executable, "-c", READY], "toy ready", tmp_path / "toy.log")
    try:
        assert daemon.alive()
        assert daemon.ready_line == "toy ready now\n"
    finally:
        code = daemon.stop()
    assert code == 0
    assert _gone(daemon.pid)
    assert "oops on stderr" in daemon.log_text()
    assert daemon.stop() == 0, "a second stop is harmless"


def test_wrong_ready_line_is_refused_and_reaped(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; print('something else', flush=True); time.sleep(60)"]
    with pytest.raises(DaemonNotReady, match="toy did not start: something else; see ") as info:
        ReadyDaemon("toy", argv, "toy ready", tmp_path / "toy.log")
    assert info.value.code == "daemon-not-ready"
    assert info.value.log_path == tmp_path / "toy.log"


def test_silent_daemon_times_out(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = time.monotonic()
    with pytest.raises(DaemonNotReady, match="no ready line"):
        ReadyDaemon("toy", argv, "toy ready", tmp_path / "toy.log", timeout=0.5)
    assert time.monotonic() - start < 30, "a silent daemon must not hold the caller for long"


def test_daemon_exiting_early_is_reported(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad flag', file=sys.stderr); sys.exit(2)"]
    with pytest.raises(DaemonNotReady, match="no ready line") as info:
        ReadyDaemon("toy", argv, "toy ready", tmp_path / "toy.log")
    assert "bad flag" in info.value.log_path.read_text()


def test_sigterm_ignored_means_sigkill(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('toy ready', flush=True); time.sleep(60)"
    )
    daemon = ReadyDaemon("toy", [sys.executable, "-c", stubborn], "toy ready", tmp_path / "toy.log")
    assert daemon.stop(timeout=0.5) == -9
    assert _gone(daemon.pid)
