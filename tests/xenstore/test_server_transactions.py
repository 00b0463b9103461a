"""Embedded xenstored transactions: isolation, the C daemon's conflict matrix, commit-time events."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.fixtures.xenstore import ERROR, EmbeddedXenstored, RawClient

DIRECTORY, READ, WATCH, TX_START, TX_END, WRITE, MKDIR, RM, CONTROL = 1, 2, 4, 6, 7, 11, 12, 13, 0


@pytest.fixture
def daemon(xenstored_session: EmbeddedXenstored) -> EmbeddedXenstored:
    return xenstored_session


@pytest.fixture
def a(c: RawClient) -> RawClient:
    """Transactions are symmetric: client a (conftest's `c`, which made `base`) and client b."""
    return c


@pytest.fixture
def b(w: RawClient) -> RawClient:
    return w


def start(c: RawClient) -> int:
    reply = c.call(TX_START, b"")
    assert reply.type == TX_START, reply
    return int(reply.payload.rstrip(b"\0"))


def end(c: RawClient, tx: int, commit: bool = True) -> bytes:
    reply = c.call(TX_END, b"T" if commit else b"F", tx_id=tx)
    assert reply.type in (TX_END, ERROR), reply
    return reply.payload


def write(c: RawClient, path: str, value: bytes, tx: int = 0) -> bytes:
    return c.call(WRITE, raw=path.encode() + b"\0" + value, tx_id=tx).payload


def read(c: RawClient, path: str, tx: int = 0) -> bytes:
    return c.call(READ, path.encode(), tx_id=tx).payload


def test_ids_start_at_one_per_connection_and_are_echoed(a: RawClient, b: RawClient, base: str) -> None:
    t1 = start(a)
    t2 = start(a)
    assert (t1, t2) == (1, 2)
    assert start(b) == 1
    reply = a.call(WRITE, raw=f"{base}/x\0v".encode(), tx_id=t2)
    assert (reply.tx_id, reply.payload) == (t2, b"OK\0")
    assert end(a, t1, commit=False) == b"OK\0"
    assert end(a, t2) == b"OK\0"
    assert end(b, 1, commit=False) == b"OK\0"


def test_isolation_until_commit(a: RawClient, b: RawClient, base: str) -> None:
    write(a, f"{base}/k", b"old")
    tx = start(a)
    write(a, f"{base}/k", b"new", tx)
    write(a, f"{base}/created", b"c", tx)
    assert read(a, f"{base}/k", tx) == b"new"
    assert read(b, f"{base}/k") == b"old"
    assert read(b, f"{base}/created") == b"ENOENT\0"
    assert end(a, tx) == b"OK\0"
    assert read(b, f"{base}/k") == b"new"
    assert read(b, f"{base}/created") == b"c"


def test_abort_discards(a: RawClient, base: str) -> None:
    tx = start(a)
    write(a, f"{base}/gone", b"x", tx)
    assert end(a, tx, commit=False) == b"OK\0"
    assert read(a, f"{base}/gone") == b"ENOENT\0"


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        ("read X", "write X", b"EAGAIN\0"),
        ("write X", "write X", b"EAGAIN\0"),
        ("read X", "write unrelated", b"OK\0"),
        ("write X", "write unrelated", b"OK\0"),
        ("create P/c1", "create P/c2", b"EAGAIN\0"),
        ("list P", "create P/c2", b"EAGAIN\0"),
        ("read missing M", "create M", b"EAGAIN\0"),
        ("read X", "rm X", b"EAGAIN\0"),
    ],
)
def test_conflict_matrix(  # noqa: PLR0917 (fixtures + parameters)
    a: RawClient, b: RawClient, base: str, ours: str, theirs: str, expected: bytes
) -> None:
    write(a, f"{base}/X", b"0")
    write(a, f"{base}/U", b"0")
    a.call(MKDIR, f"{base}/P".encode())
    tx = start(a)
    if ours == "read X":
        assert read(a, f"{base}/X", tx) == b"0"
    elif ours == "write X":
        write(a, f"{base}/X", b"ours", tx)
    elif ours == "create P/c1":
        write(a, f"{base}/P/c1", b"1", tx)
    elif ours == "list P":
        assert a.call(DIRECTORY, f"{base}/P".encode(), tx_id=tx).payload == b""
        write(a, f"{base}/U2", b"x", tx)
    elif ours == "read missing M":
        assert read(a, f"{base}/M", tx) == b"ENOENT\0"
    if theirs == "write X":
        write(b, f"{base}/X", b"theirs")
    elif theirs == "write unrelated":
        write(b, f"{base}/U", b"theirs")
    elif theirs == "create P/c2":
        write(b, f"{base}/P/c2", b"2")
    elif theirs == "create M":
        write(b, f"{base}/M", b"m")
    elif theirs == "rm X":
        b.call(RM, f"{base}/X".encode())
    assert end(a, tx) == expected
    # A failed commit leaves the transaction gone and the tree as the other client left it.
    assert a.call(READ, f"{base}/X".encode(), tx_id=tx).payload == b"ENOENT\0"
    if expected == b"EAGAIN\0" and theirs == "write X":
        assert read(a, f"{base}/X") == b"theirs"


def test_repeatable_read_inside_transaction(a: RawClient, b: RawClient, base: str) -> None:
    write(a, f"{base}/k", b"1")
    tx = start(a)
    assert read(a, f"{base}/k", tx) == b"1"
    write(b, f"{base}/k", b"2")
    assert read(a, f"{base}/k", tx) == b"1"
    assert end(a, tx) == b"EAGAIN\0"


def test_unknown_and_foreign_tx_ids_are_enoent(a: RawClient, b: RawClient, base: str) -> None:
    tx = start(a)
    assert read(b, f"{base}", tx + 100) == b"ENOENT\0"
    assert b.call(TX_END, b"T", tx_id=tx).payload == b"ENOENT\0"  # ids are per connection
    assert a.call(TX_END, b"T", tx_id=0).payload == b"ENOENT\0"
    assert a.call(TX_END, b"X", tx_id=tx).payload == b"EINVAL\0"
    assert a.call(TX_START, b"", tx_id=tx).payload == b"EBUSY\0"
    assert end(a, tx) == b"OK\0"


def test_watch_events_fire_only_at_commit_in_write_order(a: RawClient, b: RawClient, base: str) -> None:
    assert b.call(WATCH, base.encode(), b"tok").payload == b"OK\0"
    assert b.next_event().strings == [base.encode(), b"tok"]
    tx = start(a)
    write(a, f"{base}/physical-device-luid", b"luid", tx)
    write(a, f"{base}/physical-device", b"8:0", tx)
    assert b.no_event_within(0.2)
    assert end(a, tx) == b"OK\0"
    write(a, f"{base}/hotplug-status", b"connected")
    paths = [b.next_event().strings[0] for _ in range(3)]
    assert paths == [
        f"{base}/{n}".encode() for n in ("physical-device-luid", "physical-device", "hotplug-status")
    ]
    assert b.no_event_within(0.1)


def test_aborted_transaction_fires_nothing(a: RawClient, b: RawClient, base: str) -> None:
    b.call(WATCH, base.encode(), b"tok")
    b.next_event()
    tx = start(a)
    write(a, f"{base}/k", b"v", tx)
    end(a, tx, commit=False)
    assert b.no_event_within(0.2)


def test_dropped_connection_discards_open_transaction(
    daemon: EmbeddedXenstored, a: RawClient, base: str
) -> None:
    with RawClient(daemon.socket_path) as gone:
        tx = start(gone)
        write(gone, f"{base}/half", b"x", tx)
        # Leave mid-message too: half a header of the commit.
        gone.send_raw(b"\x07\0\0\0\x01")
    assert a.call(DIRECTORY, base.encode()).payload == b""
    assert read(a, f"{base}/half") == b"ENOENT\0"


def test_forced_eagain_control_hook(a: RawClient, base: str) -> None:
    assert a.call(CONTROL, b"fail-commits", b"2").payload == b"OK\0"
    results = []
    for attempt in range(3):
        tx = start(a)
        write(a, f"{base}/k", str(attempt).encode(), tx)
        results.append(end(a, tx))
    assert results == [b"EAGAIN\0", b"EAGAIN\0", b"OK\0"]
    assert read(a, f"{base}/k") == b"2"


def _increment(args: tuple[str, str, int]) -> int:
    socket_path, path, rounds = args
    retries = 0
    with RawClient(socket_path) as c:
        for _ in range(rounds):
            while True:
                tx = start(c)
                value = int(read(c, path, tx))
                write(c, path, str(value + 1).encode(), tx)
                result = end(c, tx)
                if result == b"OK\0":
                    break
                assert result == b"EAGAIN\0", result
                retries += 1
    return retries


def test_concurrent_read_increment_write_loses_nothing(
    daemon: EmbeddedXenstored, a: RawClient, base: str
) -> None:
    counter = f"{base}/counter"
    write(a, counter, b"0")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        retries = pool.map(_increment, [(daemon.socket_path, counter, 200)] * 4)
    assert read(a, counter) == b"800", f"lost updates ({sum(retries)} EAGAIN retries)"
