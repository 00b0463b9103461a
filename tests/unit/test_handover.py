"""backend/handover.py: the engine's side of the fd store, against a store receiving exactly what
systemd's manager receives (tests/fixtures/fdstore.py). The whole takeover, with real loop devices
and engine processes: tests/flows/test_engine_restart.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.fdstore import Store
from xenblockctl.backend.handover import (
    FdStore,
    HandedOver,
    HandoverError,
    HandoverServer,
    Send,
    fd_name,
    take_over,
)
from xenblockctl.journal import Journal


def _journal() -> Journal:
    return Journal("xbc-test-handover", stderr=True)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_names_identify_the_backend() -> None:
    assert fd_name("vbd", 5, 51712) == "vbd-5-51712"
    assert fd_name("vbd3", 5, 51712) != fd_name("vbd", 5, 51712)
    assert fd_name("vbd", 1, 12) != fd_name("vbd", 11, 2)


def test_without_a_manager_nothing_is_parked_or_inherited() -> None:
    store = FdStore({}, _journal())
    r, w = os.pipe()
    try:
        assert store.park("vbd-1-2", r) is False
        store.unpark("vbd-1-2")
        store.ready("serving")
        assert store.inherited == {}
        assert store.take("vbd-1-2") is None
    finally:
        os.close(r)
        os.close(w)


def test_bad_listen_variables_are_logged_and_nothing_is_taken(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"}
    store = FdStore(env, _journal())
    assert store.inherited == {}
    assert "ignoring the fds passed at start" in capsys.readouterr().err


def test_a_second_fd_under_one_name_and_unclaimed_fds_are_closed_and_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manager = Store(str(tmp_path / "notify.sock"))
    try:
        store = FdStore({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}, _journal())
        fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(3)]
        store.inherited = {"vbd-1-51712": fds[:2], "vbd-9-51712": fds[2:]}
        assert store.take("vbd-1-51712") == fds[0]
        assert _closed(fds[1])
        assert not _closed(fds[0])
        os.close(fds[0])
        assert store.close_unclaimed() == ["vbd-9-51712"]
        assert _closed(fds[2])
        assert manager.receive() == (["FDSTOREREMOVE=1", "FDNAME=vbd-9-51712"], [])
        assert "vbd-9-51712 names no backend" in capsys.readouterr().err
    finally:
        manager.sock.close()


# --- the hand-over socket (backend --takeover) ------------------------------------------------------
def test_a_takeover_passes_every_fd_by_name_and_the_socket_moves_to_the_successor(tmp_path: Path) -> None:
    path = str(tmp_path / "engine.handover")
    requests: list[object] = []
    r, w = os.pipe()

    def on_request(send: Send) -> None:
        requests.append(send)
        # the engine drains, then hands over dups of its device fds (here: enough to need 2 chunks)
        # and its transport's state
        send({f"vbd-1-{i}": os.dup(r) for i in range(250)}, ({"registry": [1, 2]}, [os.dup(w), os.dup(r)]))

    server = HandoverServer(path, _journal(), on_request)
    got = HandedOver()
    try:
        got = take_over(path, _journal())
        assert len(requests) == 1
        assert sorted(got.devices) == sorted(f"vbd-1-{i}" for i in range(250))
        assert all(len(fds) == 1 for fds in got.devices.values())
        os.write(w, b"x")
        assert os.read(got.devices["vbd-1-7"][0], 1) == b"x", "the same open file"
        assert got.transport == {"registry": [1, 2]}
        assert len(got.transport_fds) == 2
        os.write(got.transport_fds[0], b"y")  # in order: the write end first
        assert os.read(got.transport_fds[1], 1) == b"y"
        assert not os.path.exists(path), "the old engine's socket is gone: the successor listens next"
        successor = HandoverServer(path, _journal(), on_request)
        successor.close()
        assert not os.path.exists(path)
    finally:
        server.close()
        got.close()
        os.close(r)
        os.close(w)


def test_takeover_without_an_engine_is_a_coded_error(tmp_path: Path) -> None:
    with pytest.raises(HandoverError) as exc:
        take_over(str(tmp_path / "nobody"), _journal())
    assert exc.value.code == "handover"
    assert "no engine to take over" in exc.value.message


def test_a_second_engine_does_not_steal_a_live_socket_but_replaces_a_dead_one(tmp_path: Path) -> None:
    path = str(tmp_path / "engine.handover")
    first = HandoverServer(path, _journal(), lambda send: send({}, None))
    try:
        with pytest.raises(HandoverError, match="another engine listens"):
            HandoverServer(path, _journal(), lambda send: send({}, None))
    finally:
        first.close(unlink=False)  # dies without removing its socket, as a killed engine does
    assert os.path.exists(path)
    second = HandoverServer(path, _journal(), lambda send: send({}, None))
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600", "root only"
    finally:
        second.close()
