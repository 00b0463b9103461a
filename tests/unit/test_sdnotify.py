"""The sd_notify / fd-store protocol (backend/sdnotify.py) against a store that receives exactly
what systemd's manager receives (an AF_UNIX datagram with SCM_RIGHTS), and against systemd's own
`systemd-notify` for the message format. systemd 252 (Debian 12) cannot be run as a manager here."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fdstore import Store
from xenblockctl.backend import sdnotify


@pytest.fixture(params=["path", "abstract"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, dict[str, str]]]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        env = {"NOTIFY_SOCKET": address}
    else:
        name = f"xbc-test-{os.getpid()}-{id(tmp_path)}"
        address = "\0" + name
        env = {"NOTIFY_SOCKET": "@" + name}
    s = Store(address)
    yield s, env
    s.sock.close()


def test_fds_are_parked_under_their_name(store: tuple[Store, dict[str, str]], tmp_path: Path) -> None:
    s, env = store
    path = tmp_path / "disk"
    path.write_bytes(b"x" * 512)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sdnotify.store_fds(env, "vbd-5-51712", [fd])
        lines, fds = s.receive()
        assert lines == ["FDSTORE=1", "FDNAME=vbd-5-51712"]
        assert len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino  # the same open file
        os.close(fds[0])
        assert sdnotify.remove_fds(env, "vbd-5-51712")
        assert s.receive() == (["FDSTOREREMOVE=1", "FDNAME=vbd-5-51712"], [])
    finally:
        os.close(fd)


def test_our_ready_message_is_systemd_notifys(store: tuple[Store, dict[str, str]]) -> None:
    program = shutil.which("systemd-notify")
    if program is None:
        pytest.skip("systemd-notify not installed (Debian package systemd)")
    s, env = store
    subprocess.run(
        [program, "--no-block", "--ready", "--status=serving"],
        env={**os.environ, **env},
        check=True,
        timeout=10,
    )
    theirs, _ = s.receive()
    assert sdnotify.ready(env, "serving")
    ours, _ = s.receive()
    assert sorted(ours) == sorted(theirs)


def test_no_manager_sends_nothing() -> None:
    assert sdnotify.notify({}, ["READY=1"]) is False
    with pytest.raises(sdnotify.NotifyError):
        sdnotify.notify({"NOTIFY_SOCKET": "relative/path"}, ["READY=1"])


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256, "caf\u00e9", "tab\there"])
def test_invalid_fd_names_are_refused(name: str) -> None:
    with pytest.raises(sdnotify.NotifyError):
        sdnotify.fd_name(name)


def test_listen_fds_by_name_and_only_for_us() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "vbd-1:vbd-2:vbd-1"}
    got = sdnotify.listen_fds(env)
    assert got == {"vbd-1": [3, 5], "vbd-2": [4]}
    assert not any(k.startswith("LISTEN_") for k in env)  # consumed: children do not inherit them
    assert sdnotify.listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == {}  # another process's
    for bad in (
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"},
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"},
        {"LISTEN_PID": "\u0661", "LISTEN_FDS": "1"},
    ):
        with pytest.raises(sdnotify.NotifyError):
            sdnotify.listen_fds(bad)
