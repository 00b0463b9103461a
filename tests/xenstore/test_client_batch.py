"""Batched requests (read_many, write_many, rm_many): sent as a pipeline, one round trip.

Against both real daemons (Debian's C xenstored and ours) for results and error mapping, and a
fault-injection peer that answers only after it has received the whole batch: a client that
waited for each reply before sending the next request would time out there."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.cxenstored import Daemon
from tests.xenstore.test_client_faults import HEADER, Behaviour, FakePeer, _read_request
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import (
    TransactionConflict,
    XenstoreDisconnected,
    XenstoreError,
    XenstoreNoEntry,
    XenstorePermissionDenied,
)

#: Every test runs over both links: threaded (pyxs reader) and synchronous (the block script's).
pytestmark = pytest.mark.usefixtures("link")

READ = 2
ERROR = 16


@pytest.fixture
def store(daemon: Daemon) -> Iterator[XenStore]:
    with XenStore.connect(timeout=5) as s:
        yield s


def test_read_many_gives_values_in_order_and_none_for_missing(store: XenStore) -> None:
    store.write_many({"/b/a": "1", "/b/c": "", "/b/d": "x" * 3000})
    assert store.read_many(["/b/d", "/b/missing", "/b/a", "/b/c", "/b", "/nothing/here"]) == [
        "x" * 3000,
        None,
        "1",
        "",
        "",
        None,
    ]
    assert store.read_many([]) == []


def test_read_many_raises_errors_other_than_missing(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    def second_refused(conn: socket.socket) -> None:
        for i, (op, rq, tx, _payload) in enumerate([_read_request(conn) for _ in range(3)]):
            body = b"EACCES\0" if i == 1 else b"v"
            conn.sendall(HEADER.pack(ERROR if i == 1 else op, rq, tx, len(body)) + body)

    with (
        XenStore.connect(fake_peer(second_refused).path, timeout=2) as store,
        pytest.raises(XenstorePermissionDenied),
    ):
        store.read_many(["/x/a", "/x/b", "/x/c"])


def test_ls_many_gives_lists_in_order_none_for_missing_and_long_lists_in_parts(store: XenStore) -> None:
    long = [f"n{k:03d}" + "x" * 40 for k in range(200)]  # ~9 KB of names: DIRECTORY_PART
    store.write_many({"/l/a/x": "1", "/l/a/y": "2", "/l/e": "", **{f"/l/big/{n}": "v" for n in long}})
    assert store.ls_many(["/l/a", "/l/missing", "/l/big", "/l/e", "/l"]) == [
        ["x", "y"],
        None,
        long,
        [],
        ["a", "e", "big"],
    ]
    assert store.ls_many([]) == []
    with store.transaction() as tx:
        assert tx.ls_many(["/l/a", "/nothing"]) == [["x", "y"], None]


def test_write_many_writes_then_removes_missing_ok(store: XenStore) -> None:
    store.write_many({"/w/old": "1", "/w/keep": "2"})
    store.write_many({"/w/new": "3", "/w/keep": "4"}, remove=["/w/old", "/w/never-existed"])
    assert store.read_dir("/w") == {"keep": "4", "new": "3"}
    store.rm_many(["/w/new", "/w/gone", "/w/keep"])
    assert store.read_dir("/w") == {}


def test_batch_inside_a_transaction_is_invisible_until_commit(store: XenStore) -> None:
    store.write("/t/state", "2")
    with store.transaction() as tx:
        tx.write_many({"/t/x": "1", "/t/y": "2"}, remove=["/t/state"])
        assert tx.read_many(["/t/x", "/t/y", "/t/state"]) == ["1", "2", None]
        assert store.read_many(["/t/x", "/t/state"]) == [None, "2"]
    assert store.read_many(["/t/x", "/t/y", "/t/state"]) == ["1", "2", None]


def test_batched_reads_take_part_in_conflict_detection(store: XenStore) -> None:
    store.write("/c/v", "0")
    tx = store.transaction()
    assert tx.read_many(["/c/v"]) == ["0"]
    store.write("/c/v", "other writer")
    tx.write_many({"/c/w": "1"})
    with pytest.raises(TransactionConflict):
        tx.commit()
    assert store.read_optional("/c/w") is None


def test_read_dir_still_skips_children_removed_while_listing(store: XenStore) -> None:
    store.write_many({f"/r/n{i}": str(i) for i in range(40)})
    assert store.read_dir("/r") == {f"n{i}": str(i) for i in range(40)}


def _answer_after_whole_batch(count: int, seen: list[tuple[int, int, int, bytes]]) -> Behaviour:
    def behaviour(conn: socket.socket) -> None:
        for _ in range(count):
            seen.append(_read_request(conn))
        for op, rq, tx, payload in seen:
            path = payload.split(b"\0")[0]
            body = b"value of " + path if op == READ else b"OK\0"
            conn.sendall(HEADER.pack(op, rq, tx, len(body)) + body)

    return behaviour


def test_batch_is_pipelined(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    seen: list[tuple[int, int, int, bytes]] = []
    with XenStore.connect(fake_peer(_answer_after_whole_batch(3, seen)).path, timeout=2) as store:
        assert store.read_many(["/p/a", "/p/b", "/p/c"]) == [
            "value of /p/a",
            "value of /p/b",
            "value of /p/c",
        ]
    assert [op for op, *_ in seen] == [READ, READ, READ]
    assert len({rq for _op, rq, _tx, _p in seen}) == 3  # distinct request ids


def test_replies_are_matched_by_id_not_order(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    def reversed_answers(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in range(3)]
        for op, rq, tx, payload in reversed(requests):
            body = payload.split(b"\0")[0].upper()
            conn.sendall(HEADER.pack(op, rq, tx, len(body)) + body)

    with XenStore.connect(fake_peer(reversed_answers).path, timeout=2) as store:
        assert store.read_many(["/q/a", "/q/b", "/q/c"]) == ["/Q/A", "/Q/B", "/Q/C"]


def test_lost_peer_mid_batch_is_reported(fake_peer: Callable[[Behaviour], FakePeer]) -> None:
    done = threading.Event()

    def answer_one_then_die(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in range(3)]
        op, rq, tx, _payload = requests[0]
        conn.sendall(HEADER.pack(op, rq, tx, 1) + b"x")
        done.set()  # before close: the client may see the EOF and return before this line runs
        conn.close()

    started = fake_peer(answer_one_then_die)
    with XenStore.connect(started.path, timeout=5) as store, pytest.raises(XenstoreDisconnected):
        store.read_many(["/l/a", "/l/b", "/l/c"])
    # the client may see the EOF before the peer's thread runs its next line: wait, bounded
    assert done.wait(5)


def test_error_reply_in_a_batch_does_not_desync_the_rest(store: XenStore) -> None:
    # ENOENT in the middle of a batch: the replies after it still belong to their own requests.
    store.write_many({"/e/1": "one", "/e/3": "three"})
    for _ in range(3):
        assert store.read_many(["/e/1", "/e/2", "/e/3"]) == ["one", None, "three"]
    with pytest.raises(XenstoreNoEntry):
        store.read("/e/2")


def test_watch_many_fires_for_each_path_and_unwatch_many_stops_them(store: XenStore) -> None:
    store.write_many({"/w1/a": "0", "/w2/b": "0"})
    store.watch_many(["/w1", "/w2"], "tok")
    initial = {store.wait_watch(2), store.wait_watch(2)}
    assert {(e.path, e.token) for e in initial if e is not None} == {("/w1", "tok"), ("/w2", "tok")}
    store.write("/w2/b", "1")
    event = store.wait_watch(2)
    assert event is not None
    assert (event.path, event.token) == ("/w2/b", "tok")
    store.unwatch_many(["/w1", "/w2"], "tok")
    store.drain_watches()
    store.write_many({"/w1/a": "2", "/w2/b": "2"})
    assert store.wait_watch(0.3) is None


WATCH = 4
UNWATCH = 5


def test_watch_many_undoes_the_watches_that_were_set_when_one_is_refused(
    fake_peer: Callable[[Behaviour], FakePeer],
) -> None:
    seen: list[tuple[int, bytes]] = []

    def second_watch_refused(conn: socket.socket) -> None:
        for i in range(3):  # two watches, then the unwatch of the first
            op, rq, tx, payload = _read_request(conn)
            seen.append((op, payload))
            refused = op == WATCH and i == 1
            body = b"ENOSPC\0" if refused else b"OK\0"
            conn.sendall(HEADER.pack(ERROR if refused else op, rq, tx, len(body)) + body)

    with XenStore.connect(fake_peer(second_watch_refused).path, timeout=2) as store:
        with pytest.raises(XenstoreError) as caught:
            store.watch_many(["/a", "/b"], "t")
        assert caught.value.errno == errno.ENOSPC
        assert [op for op, _ in seen] == [WATCH, WATCH, UNWATCH]
        assert seen[2][1] == b"/a\0t\0"


def test_a_later_unwatch_is_sent_with_the_next_request_and_its_events_stop_at_once(store: XenStore) -> None:
    """unwatch_many(later=True) (the hand-off's, issue 18 session 14): no event of the token is
    delivered from the call on; the unwatch reaches the daemon with the next request, so the same
    watch can be set again afterwards (a daemon refuses a duplicate path and token: EEXIST)."""
    store.write_many({"/w1/a": "0"})
    store.watch_many(["/w1"], "tok")
    assert store.wait_watch(2) is not None  # the initial event
    store.unwatch_many(["/w1"], "tok", later=True)
    store.write("/w1/a", "1")  # carries the unwatch, which the daemon handles first
    assert store.wait_watch(0.3) is None
    store.watch_many(["/w1"], "tok")
    event = store.wait_watch(2)
    assert event is not None
    assert (event.path, event.token) == ("/w1", "tok")


TRANSACTION_START = 6


def test_a_later_unwatch_costs_no_round_trip_of_its_own(
    fake_peer: Callable[[Behaviour], FakePeer],
) -> None:
    """The peer answers only once it has both the unwatch and the next request: a client that
    sent the unwatch alone and waited for its reply would time out here. A refused unwatch
    changes nothing for the request it rode with."""
    seen: list[int] = []

    def both_then_answer(conn: socket.socket) -> None:
        requests = [_read_request(conn) for _ in range(2)]
        for op, rq, tx, _payload in requests:
            seen.append(op)
            body, kind = (b"ENOENT\0", ERROR) if op == UNWATCH else (b"7\0", op)
            conn.sendall(HEADER.pack(kind, rq, tx, len(body)) + body)

    with XenStore.connect(fake_peer(both_then_answer).path, timeout=2) as store:
        store.unwatch_many(["/a"], "t", later=True)
        assert seen == []
        tx = store.transaction()
        assert tx.id == 7
        assert seen == [UNWATCH, TRANSACTION_START]
