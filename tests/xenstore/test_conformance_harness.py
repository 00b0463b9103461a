"""The C-daemon harness itself: the stub makes xenstored take its normal start-up path, and every
daemon it starts is reaped with its directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.cxenstored import CTools, Daemon, build_stub, start_cxenstored
from tests.support.xsraw import DIRECTORY, READ, RawConnection, arg


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is reaped when its stat says so
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return state != "Z"


def test_stub_is_built_once_and_cached(cxenstored_tools: CTools) -> None:
    first = build_stub()
    assert first == build_stub()
    assert first.suffix == ".so"
    assert ".cache" in first.parts or os.environ.get("XENBLOCKCTL_XSSTUB")


def test_daemon_ran_dom0_init_through_the_stub(cxenstored: Daemon) -> None:
    # /tool/xenstored is created by setup_structure(), reached only via dom0_init() ->
    # introduce_domain(): without the stub (or with -D) the daemon exits or segfaults instead.
    with RawConnection(str(cxenstored.socket)) as xs:
        assert xs.request(DIRECTORY, arg("/tool")).payload == b"xenstored\0"
        assert xs.request(READ, arg("/")).payload == b""
    assert cxenstored.trace is not None
    assert "CREATE connection" in cxenstored.trace.read_text()


def test_without_the_stub_the_daemon_cannot_start(cxenstored_tools: CTools, tmp_path: Path) -> None:
    """Guards the premise of the lane: if this ever starts passing without the stub, the stub
    (and its version coupling) deserves a second look."""
    env = cxenstored_tools.env(XENSTORED_PATH=str(tmp_path / "s"), XENSTORED_RUNDIR=str(tmp_path))
    result = subprocess.run(
        [str(cxenstored_tools.xenstored), "--no-fork", "--output-pid"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "hypervisor" in result.stderr or "xencall" in result.stderr


def test_stop_reaps_the_process_and_removes_its_directory(cxenstored_tools: CTools) -> None:
    daemon = start_cxenstored(cxenstored_tools)
    assert daemon.pid is not None
    rundir = daemon.socket.parent
    assert _alive(daemon.pid)
    assert daemon.socket.is_socket()
    daemon.stop()
    assert not _alive(daemon.pid)
    assert not rundir.exists()
    daemon.stop()  # idempotent


def test_a_killed_daemon_is_still_cleaned_up(cxenstored_tools: CTools) -> None:
    daemon = start_cxenstored(cxenstored_tools)
    rundir = daemon.socket.parent
    daemon.kill()
    daemon.stop()
    assert daemon.pid is not None
    assert not _alive(daemon.pid)
    assert not rundir.exists()


@pytest.mark.parametrize("count", [8])
def test_daemons_are_cheap_and_independent(cxenstored_tools: CTools, count: int) -> None:
    daemons = [start_cxenstored(cxenstored_tools) for _ in range(count)]
    try:
        for i, daemon in enumerate(daemons):
            with RawConnection(str(daemon.socket)) as xs:
                xs.request(11, f"/mine\0{i}".encode())
        for i, daemon in enumerate(daemons):
            with RawConnection(str(daemon.socket)) as xs:
                assert xs.request(READ, arg("/mine")).payload == str(i).encode()
    finally:
        for daemon in daemons:
            daemon.stop()
