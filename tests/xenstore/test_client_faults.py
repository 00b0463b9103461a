"""Deadlines and failure reporting: a daemon that never answers, dies mid-request, or talks nonsense.

pyxs alone hangs forever in each of these cases (xenstore-for-tests.md §4.3 #3, #4); a block
script that hangs is SIGKILLed by libxl at 40 s with its cleanup unrun. Fake peers here are fault
injection only; the real-daemon cases SIGSTOP / SIGKILL Debian's C xenstored."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable

import pytest

from tests.fixtures.cxenstored import Daemon
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreDisconnected, XenstoreError, XenstoreTimeout

#: Every test runs over both links: threaded (pyxs reader) and synchronous (the block script's).
pytestmark = pytest.mark.usefixtures("link")

HEADER = struct.Struct("<IIII")
Behaviour = Callable[[socket.socket], None]


def _router_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "xenstore-router" and t.is_alive()]


def _no_router_left(before: list[threading.Thread], wait: float = 2.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not [t for t in _router_threads() if t not in before]:
            return True
        time.sleep(0.01)
    return False


def _outcome_within(limit: float, fn: Callable[[], object]) -> BaseException | None:
    """Run `fn` in a thread; fail the test (instead of hanging it) if it is still blocked after
    `limit` seconds. Returns the exception `fn` raised, or None."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            box.append(exc)
        else:
            box.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"still blocked after {limit} s: no deadline fired")
    return box[0]


class FakePeer:
    """A unix-socket server that accepts one client and runs `behaviour` on it in a thread."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.dir = tempfile.mkdtemp(prefix="xbc-fake-")
        self.path = os.path.join(self.dir, "socket")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(behaviour,), daemon=True)
        self.thread.start()

    def _serve(self, behaviour: Behaviour) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.conns.append(conn)
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            behaviour(conn)
        self.stop.wait(10)  # keep the socket open (silent peer) until the test ends

    def close(self) -> None:
        self.stop.set()
        for conn in self.conns:
            conn.close()
        self.listener.close()
        self.thread.join(5)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


def _read_request(conn: socket.socket) -> tuple[int, int, int, bytes]:
    header = b""
    while len(header) < HEADER.size:
        chunk = conn.recv(HEADER.size - len(header))
        if not chunk:
            raise OSError("client went away")
        header += chunk
    op, rq, tx, length = HEADER.unpack(header)
    payload = b""
    while len(payload) < length:
        payload += conn.recv(length - len(payload))
    return op, rq, tx, payload


def silent(conn: socket.socket) -> None:
    """Accepts and reads, never answers (a wedged or SIGSTOPped daemon)."""
    _read_request(conn)


def dies_mid_request(conn: socket.socket) -> None:
    _read_request(conn)
    conn.shutdown(socket.SHUT_RDWR)
    conn.close()


def half_header(conn: socket.socket) -> None:
    op, rq, tx, _ = _read_request(conn)
    conn.sendall(HEADER.pack(op, rq, tx, 10)[:8])  # then stalls with half a header sent


def half_payload(conn: socket.socket) -> None:
    op, rq, tx, _ = _read_request(conn)
    conn.sendall(HEADER.pack(op, rq, tx, 10) + b"abc")


def wrong_request_id(conn: socket.socket) -> None:
    op, rq, tx, _ = _read_request(conn)
    conn.sendall(HEADER.pack(op, rq + 1000, tx, 2) + b"hi")


def wrong_type(conn: socket.socket) -> None:
    _op, rq, tx, _ = _read_request(conn)
    conn.sendall(HEADER.pack(13, rq, tx, 3) + b"OK\0")  # an RM reply to a READ


def oversize_reply(conn: socket.socket) -> None:
    op, rq, tx, _ = _read_request(conn)
    conn.sendall(HEADER.pack(op, rq, tx, 1 << 30))  # would make a naive reader allocate 1 GiB


def test_peer_that_never_answers_times_out(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    before = _router_threads()
    peer = fake_peer(silent)
    store = XenStore.connect(peer.path, timeout=0.3)
    start = time.monotonic()
    exc = _outcome_within(5, lambda: store.read("/local/domain/0/backend/vbd/5/51712/params"))
    elapsed = time.monotonic() - start
    assert isinstance(exc, XenstoreTimeout)
    assert 0.29 <= elapsed < 2.0
    assert exc.code == "xenstore-timeout"
    assert "no reply within 0.3 s" in str(exc)
    # the stream position is unknown after a timeout: the connection is dropped, not reused
    assert store.closed
    with pytest.raises(XenstoreDisconnected):
        store.read("/x")
    store.close()
    assert _no_router_left(before)


@pytest.mark.parametrize(
    "behaviour", [dies_mid_request, wrong_request_id, wrong_type], ids=lambda b: b.__name__
)
def test_peer_failures_are_reported_at_once(
    fake_peer: Callable[[Behaviour], FakePeer], behaviour: Behaviour, capfd: pytest.CaptureFixture[str]
) -> None:
    before = _router_threads()
    peer = fake_peer(behaviour)
    store = XenStore.connect(peer.path, timeout=10)
    start = time.monotonic()
    exc = _outcome_within(5, lambda: store.read("/a"))
    assert time.monotonic() - start < 2.0, "must not wait for the 10 s deadline"
    assert isinstance(exc, XenstoreDisconnected)
    assert exc.code == "xenstore-disconnected"
    with pytest.raises(XenstoreDisconnected):
        store.read("/a")
    store.close()
    assert _no_router_left(before)
    # pyxs's router would print a thread traceback; libxl's log must get our one line instead
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("behaviour", [half_header, half_payload], ids=lambda b: b.__name__)
def test_partial_reply_is_bounded(fake_peer: Callable[[Behaviour], FakePeer], behaviour: Behaviour) -> None:
    before = _router_threads()
    peer = fake_peer(behaviour)
    store = XenStore.connect(peer.path, timeout=0.3)
    start = time.monotonic()
    # Either the request deadline or the reader's socket timeout fires first; both are bounded.
    exc = _outcome_within(5, lambda: store.read("/a"))
    assert isinstance(exc, XenstoreTimeout | XenstoreDisconnected)
    assert time.monotonic() - start < 2.0
    store.close()
    assert _no_router_left(before), "the reader thread must not stay parked in recv()"


def test_watch_waiter_is_woken_when_the_peer_dies(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    def answer_watch_then_die(conn: socket.socket) -> None:
        op, rq, tx, payload = _read_request(conn)
        conn.sendall(HEADER.pack(op, rq, tx, 3) + b"OK\0")
        path, token = payload.split(b"\0")[:2]
        event = path + b"\0" + token + b"\0"
        conn.sendall(HEADER.pack(15, 0, 0, len(event)) + event)
        time.sleep(0.2)
        conn.close()

    peer = fake_peer(answer_watch_then_die)
    with XenStore.connect(peer.path, timeout=10) as store:
        store.watch("/be", "tok")
        event = store.wait_watch(5)
        assert event is not None
        assert event.path == "/be"
        start = time.monotonic()
        assert isinstance(_outcome_within(5, lambda: store.wait_watch(10)), XenstoreDisconnected)
        assert time.monotonic() - start < 2.0
        with pytest.raises(XenstoreDisconnected):  # and keeps saying so
            store.wait_watch(0)


def test_stopped_real_daemon_times_out(cxenstored: Daemon) -> None:
    assert cxenstored.pid is not None
    store = XenStore.connect(timeout=0.3)
    store.write("/a", "1")
    os.kill(cxenstored.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert isinstance(_outcome_within(5, lambda: store.read("/a")), XenstoreTimeout)
        assert time.monotonic() - start < 2.0
    finally:
        os.kill(cxenstored.pid, signal.SIGCONT)
        store.close()
    with XenStore.connect(timeout=5) as fresh:  # the daemon itself is fine afterwards
        assert fresh.read("/a") == "1"


def test_killed_real_daemon_is_reported(cxenstored: Daemon) -> None:
    store = XenStore.connect(timeout=10)
    store.watch("/be", "tok")
    assert store.wait_watch(5) is not None
    tx = store.transaction()
    cxenstored.kill()
    start = time.monotonic()
    assert isinstance(_outcome_within(5, lambda: tx.write("/be/x", "1")), XenstoreDisconnected)
    assert isinstance(_outcome_within(5, lambda: store.wait_watch(10)), XenstoreDisconnected)
    assert time.monotonic() - start < 2.0
    store.close()
    with pytest.raises(XenstoreError) as info:
        XenStore.connect(timeout=1)
    assert info.value.code == "xenstore-unavailable"


def test_connect_to_a_socket_nobody_listens_on() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tempfile.mktemp(prefix="xbc-dead-", dir="/tmp")
    sock.bind(path)  # bound, never listening: connect() is refused
    try:
        with pytest.raises(XenstoreError) as info:
            XenStore.connect(path, timeout=1)
        assert info.value.code == "xenstore-unavailable"
        assert path in str(info.value)
    finally:
        sock.close()
        os.unlink(path)


def test_overall_deadline_caps_every_request(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    peer = fake_peer(silent)
    store = XenStore.connect(peer.path, timeout=10, deadline=time.monotonic() + 0.3)
    start = time.monotonic()
    exc = _outcome_within(5, lambda: store.read("/a"))
    assert isinstance(exc, XenstoreTimeout)
    assert "overall deadline" in str(exc)
    assert time.monotonic() - start < 2.0
    store.close()


def test_expired_deadline_fails_without_sending(cxenstored: Daemon) -> None:
    with XenStore.connect(timeout=5) as store:
        store.deadline = time.monotonic() - 1
        with pytest.raises(XenstoreTimeout, match="overall deadline passed"):
            store.write("/never", "1")
        start = time.monotonic()
        assert store.wait_watch(5) is None
        assert time.monotonic() - start < 1.0, "wait_watch must be capped by the deadline"
        store.deadline = None
        assert not store.exists("/never")  # nothing was sent, and the connection is still usable
    with pytest.raises(XenstoreTimeout):
        XenStore.connect(timeout=5, deadline=time.monotonic() - 1)
