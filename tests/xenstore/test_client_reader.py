"""The threaded link's system calls per batch (issue 20): a batch goes out in one write and its
replies, which xenstored sends back to back, come in with a read or two, not a select() and two
reads (header, payload) each. Under TCG in the real-Xen lane each system call of dom0 is a trip
through the hypervisor, and the reader thread's per-message cost was ~5 ms of dom0's CPU on the
pvgrub boot's connect path (bench/README.md, "the engine's connect steps under TCG")."""

from __future__ import annotations

import _socket
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.xenstore.test_client_faults import HEADER, Behaviour, FakePeer, _read_request
from xenblockctl.xenstore import endpoints, transport
from xenblockctl.xenstore.client import XenStore

READ = 2
WATCH_EVENT = 15
BATCH = 12


class CountingSocket:
    """The client's socket, counting the calls that move bytes."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.reads = 0
        self.writes = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return self.sock.recv(size)

    def recv_into(self, buf: Any, size: int = 0) -> int:
        self.reads += 1
        return self.sock.recv_into(buf, size)

    def sendall(self, data: bytes) -> None:
        self.writes += 1
        self.sock.sendall(data)

    def send(self, data: bytes) -> int:
        self.writes += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[CountingSocket]:
    made: list[CountingSocket] = []
    connect = endpoints.connect_unix

    def counting(path: str, timeout: float) -> Any:
        made.append(CountingSocket(connect(path, timeout)))
        return made[-1]

    monkeypatch.setattr(transport, "connect_unix", counting)
    return made


def _answer_all_at_once(count: int, events: int = 0) -> Behaviour:
    """Read `count` requests, then send `events` watch events and every reply in one write (with
    events, a WATCH is answered first)."""

    def behaviour(conn: socket.socket) -> None:
        if events:
            op, rq, tx, _ = _read_request(conn)
            conn.sendall(HEADER.pack(op, rq, tx, 3) + b"OK\0")
        requests = [_read_request(conn) for _ in range(count)]
        out = b""
        for i in range(events):
            body = f"/ev/{i}\0tok\0".encode()
            out += HEADER.pack(WATCH_EVENT, 0, 0, len(body)) + body
        for op, rq, tx, payload in requests:
            body = b"value of " + payload.split(b"\0")[0]
            out += HEADER.pack(op, rq, tx, len(body)) + body
        conn.sendall(out)

    return behaviour


def test_a_batch_is_one_write_and_its_replies_a_read_or_two(
    fake_peer: Callable[[Behaviour], FakePeer], counted: list[CountingSocket]
) -> None:
    paths = [f"/p/{i}" for i in range(BATCH)]
    with XenStore.connect(fake_peer(_answer_all_at_once(BATCH)).path, timeout=5) as store:
        (sock,) = counted
        reads_before, writes_before = sock.reads, sock.writes
        assert store.read_many(paths) == [f"value of {p}" for p in paths]
        # pyxs's router: a write per request, a select() and two reads per reply (12 and 24 here)
        assert sock.writes - writes_before == 1
        assert sock.reads - reads_before <= 2


def test_watch_events_in_the_same_burst_are_delivered_with_the_replies(
    fake_peer: Callable[[Behaviour], FakePeer], counted: list[CountingSocket]
) -> None:
    """The events xenstored sends ahead of a reply (our own commit's, say) are handed out from
    the same read as the reply, in order, and none is lost when the burst ends mid-buffer."""
    with XenStore.connect(fake_peer(_answer_all_at_once(2, events=5)).path, timeout=5) as store:
        store.watch("/ev", "tok")
        (sock,) = counted
        reads_before = sock.reads
        assert store.read_many(["/a", "/b"]) == ["value of /a", "value of /b"]
        got = [store.wait_watch(1) for _ in range(5)]
        assert [e.path if e is not None else None for e in got] == [f"/ev/{i}" for i in range(5)]
        assert {e.token for e in got if e is not None} == {"tok"}
        assert sock.reads - reads_before <= 2
