"""How replies arrive: split anywhere across reads, many per read, with watch events and faults
among them. A peer here writes real bytes on a real Unix socket (tests/xenstore/test_client_faults'
FakePeer) in the shapes a daemon may produce; both links must assemble them the same way. The
synchronous link reads a batch's replies with as few reads as the kernel allows (SO_RCVLOWAT, the
smallest possible rest of the batch), which must never wait for bytes that cannot come."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import pytest

from tests.xenstore.test_client_faults import HEADER, Behaviour, FakePeer, _outcome_within, _read_request
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreDisconnected, XenstoreTimeout
from xenblockctl.xenstore.synchronous import SPREAD_MIN

#: Every test runs over both links: threaded (pyxs reader) and synchronous (the block script's).
pytestmark = pytest.mark.usefixtures("link")

WATCH_EVENT = 15


def _replies(requests: list[tuple[int, int, int, bytes]]) -> bytes:
    """Each READ answered with its path upper-cased (so a reply shows which request it answers)."""
    out = b""
    for op, rq, tx, payload in requests:
        body = payload.split(b"\0")[0].upper()
        out += HEADER.pack(op, rq, tx, len(body)) + body
    return out


def _event(path: bytes, token: bytes) -> bytes:
    body = path + b"\0" + token + b"\0"
    return HEADER.pack(WATCH_EVENT, 0, 0, len(body)) + body


PATHS = [f"/split/n{i}" for i in range(5)]
EXPECTED = [p.upper() for p in PATHS]


@pytest.mark.parametrize("step", [1, 3, 7, 16, 17, 40])
def test_replies_split_anywhere_across_reads(fake_peer: Callable[[Behaviour], FakePeer], step: int) -> None:
    """Header and payload cut at every offset (step 1: a byte per write), with pauses so that each
    piece is a read of its own: the link must neither lose a piece nor wait for more bytes than the
    batch's rest can hold (a too-high low-water mark would sit out the 5 s timeout here)."""

    def trickle(conn: socket.socket) -> None:
        data = _replies([_read_request(conn) for _ in PATHS])
        for start in range(0, len(data), step):
            conn.sendall(data[start : start + step])
            time.sleep(0.002)

    with XenStore.connect(fake_peer(trickle).path, timeout=5) as store:
        start = time.monotonic()
        assert store.read_many(PATHS) == EXPECTED
        assert time.monotonic() - start < 3.0
        assert store.read_many([]) == []  # nothing left over, the link still usable for nothing


def test_many_replies_and_events_in_one_write(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    """63 replies (one fewer than a batch the synchronous link spreads over connections) in one
    segment, watch events before, among and after them: every reply lands in its slot, the
    subscribed events are kept in order for wait_watch, the others dropped."""
    paths = [f"/many/n{i}" for i in range(SPREAD_MIN - 1)]  # one connection: FakePeer serves one

    def burst(conn: socket.socket) -> None:
        op, rq, tx, _payload = _read_request(conn)  # the watch
        conn.sendall(HEADER.pack(op, rq, tx, 3) + b"OK\0")
        requests = [_read_request(conn) for _ in paths]
        data = _replies(requests)
        cut = len(_replies(requests[:30]))  # on a frame boundary
        conn.sendall(
            _event(b"/w/first", b"tok")
            + data[:cut]
            + _event(b"/w/other", b"not-ours")
            + _event(b"/w/middle", b"tok")
            + data[cut:]
            + _event(b"/w/last", b"tok")
        )

    with XenStore.connect(fake_peer(burst).path, timeout=5) as store:
        store.watch("/w", "tok")
        assert store.read_many(paths) == [p.upper() for p in paths]
        events = [store.wait_watch(2) for _ in range(3)]
        assert [(e.path, e.token) for e in events if e is not None] == [
            ("/w/first", "tok"),
            ("/w/middle", "tok"),
            ("/w/last", "tok"),
        ]


def test_stray_reply_after_a_batch_fails_the_next_request(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    """A reply nobody asked for, in the same segment as the batch's last reply: the batch's own
    replies stand (they came first), but the stream can no longer be trusted."""

    def stray(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in PATHS]
        conn.sendall(_replies(requests) + HEADER.pack(2, 999_999, 0, 1) + b"x")

    with XenStore.connect(fake_peer(stray).path, timeout=5) as store:
        # (the threaded link's reader may meet the stray reply before the batch returns: also honest)
        with contextlib.suppress(XenstoreDisconnected):
            assert store.read_many(PATHS) == EXPECTED
        exc = _outcome_within(5, lambda: store.read("/split/n0"))
        assert isinstance(exc, XenstoreDisconnected), exc


def test_duplicate_reply_loses_the_link(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    def twice(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in PATHS]
        conn.sendall(_replies(requests[:1]) + _replies(requests))

    with XenStore.connect(fake_peer(twice).path, timeout=5) as store:
        exc = _outcome_within(5, lambda: store.read_many(PATHS))
        assert isinstance(exc, XenstoreDisconnected), exc


@pytest.mark.parametrize("where", ["first", "after-two"])
def test_oversize_header_in_a_batch_loses_the_link_at_once(
    fake_peer: Callable[[Behaviour], FakePeer], where: str
) -> None:
    """A header announcing more than XENSTORE_PAYLOAD_MAX, alone or after good replies in the same
    segment: the framing is lost, so the client gives up at once (not after the 10 s timeout) and
    never tries to read (or allocate) the announced gigabyte."""

    def oversize(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in PATHS]
        good = _replies(requests[:2]) if where == "after-two" else b""
        op, rq, tx, _payload = requests[len(good) and 2]
        conn.sendall(good + HEADER.pack(op, rq, tx, 1 << 30) + b"abc")

    with XenStore.connect(fake_peer(oversize).path, timeout=10) as store:
        start = time.monotonic()
        exc = _outcome_within(5, lambda: store.read_many(PATHS))
        assert isinstance(exc, XenstoreDisconnected), exc
        assert time.monotonic() - start < 2.0
        assert isinstance(_outcome_within(5, lambda: store.read("/a")), XenstoreDisconnected)


@pytest.mark.parametrize("cut", [4, 16, 20])
def test_truncated_batch_then_close_is_reported_at_once(
    fake_peer: Callable[[Behaviour], FakePeer], cut: int
) -> None:
    """Two whole replies, then a frame cut inside its header (4), after it (16) or inside its
    payload (20), then the peer closes: disconnected at once, not after the 10 s timeout."""

    def truncated(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in PATHS]
        data = _replies(requests)
        whole = len(_replies(requests[:2]))
        conn.sendall(data[: whole + cut])
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    with XenStore.connect(fake_peer(truncated).path, timeout=10) as store:
        start = time.monotonic()
        exc = _outcome_within(5, lambda: store.read_many(PATHS))
        assert isinstance(exc, XenstoreDisconnected), exc
        assert time.monotonic() - start < 2.0


def test_truncated_batch_then_silence_times_out_on_the_deadline(
    fake_peer: Callable[[Behaviour], FakePeer], link: str
) -> None:
    """Most of a batch, then a stall mid-frame: the deadline still fires (the kernel's wait for the
    batch's rest is bounded by it), and the connection is dropped. (pyxs's reader may hit its own
    socket timeout first and report the connection lost, as in test_partial_reply_is_bounded.)"""

    def stall(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in PATHS]
        data = _replies(requests)
        conn.sendall(data[: len(data) - 3])

    store = XenStore.connect(fake_peer(stall).path, timeout=0.3)
    try:
        start = time.monotonic()
        exc = _outcome_within(5, lambda: store.read_many(PATHS))
        expected = XenstoreTimeout if link == "synchronous" else (XenstoreTimeout, XenstoreDisconnected)
        assert isinstance(exc, expected), exc
        assert 0.29 <= time.monotonic() - start < 2.0
        assert store.closed
    finally:
        store.close()
