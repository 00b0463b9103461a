"""XenStore.stream (Link.exchange_stream): reads and listings whose next requests depend on the
replies. On a socket the synchronous link sends a reply's follow-ups as soon as it has read it,
without waiting for the rest of its level (the block script's 128-backend walk, bench/README.md
issue 18 round 6); every other link goes level by level. Both links, real daemons, and a scripted
peer for what a daemon will not do on demand (answer out of turn)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.fixtures.cxenstored import Daemon
from tests.xenstore.test_client_faults import FakePeer, _read_request
from xenblockctl.xenstore import wire
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreError, XenstoreInvalid, XenstoreNoEntry

pytestmark = pytest.mark.usefixtures("link")

Result = str | list[str] | XenstoreError


def _walk(store: XenStore, roots: list[str]) -> dict[str, Result]:
    """List `roots`, then each child, then read each grandchild's `v`: every result by path."""
    made: list[str] = list(roots)
    seen: dict[str, Result] = {}

    def follow(results: list[tuple[int, Result]]) -> list[tuple[int, str]]:
        more: list[tuple[int, str]] = []
        for index, result in results:
            path = made[index]
            seen[path] = result
            if isinstance(result, list) and path.count("/") < 4:
                for name in result:
                    child = f"{path}/{name}"
                    more.append((wire.DIRECTORY, child) if path.count("/") < 3 else (wire.READ, f"{child}/v"))
        made.extend(path for _op, path in more)
        return more

    store.stream([(wire.DIRECTORY, root) for root in roots], follow)
    return seen


def test_a_walk_in_three_levels_gets_every_result_once(daemon: Daemon) -> None:
    """100 domains (a burst of listings spread over several connections on the synchronous link),
    one or two disks each, one without the node read, one root missing: every request's result
    reaches `follow` exactly once, errors included, and the store stays usable."""
    with XenStore.connect(timeout=10) as store:
        store.write_many(
            {f"/s/vbd/{d}/{768 + 16 * k}/v": f"{d}.{k}" for d in range(100) for k in range(1 + d % 2)}
        )
        store.write("/s/vbd/7/999/other", "x")  # a disk without `v`
        seen = _walk(store, ["/s/vbd", "/s/none"])
        assert isinstance(seen.pop("/s/none"), XenstoreNoEntry)
        assert isinstance(seen.pop("/s/vbd/7/999/v"), XenstoreNoEntry)
        reads = {path: value for path, value in seen.items() if path.endswith("/v")}
        assert reads == {
            f"/s/vbd/{d}/{768 + 16 * k}/v": f"{d}.{k}" for d in range(100) for k in range(1 + d % 2)
        }
        assert sorted(seen.pop("/s/vbd")) == sorted(str(d) for d in range(100))  # type: ignore[arg-type]
        assert len(seen) == 100 + len(reads)  # the domains' listings, and nothing else
        assert store.read("/s/vbd/3/784/v") == "3.1"


def test_what_follow_raises_comes_after_every_reply_is_in(daemon: Daemon) -> None:
    """`follow` fails on its first call: no later reply reaches it, the requests already sent
    are still collected (no stray reply is left to confuse the next request), then it is raised."""
    with XenStore.connect(timeout=10) as store:
        store.write_many({f"/f/n{i}": str(i) for i in range(200)})
        calls = []

        def follow(results: list[tuple[int, Result]]) -> list[tuple[int, str]]:
            calls.append(len(results))
            raise RuntimeError("the caller's own failure")

        with pytest.raises(RuntimeError, match="the caller's own failure"):
            store.stream([(wire.READ, f"/f/n{i}") for i in range(200)], follow)
        assert len(calls) == 1
        assert store.read_many([f"/f/n{i}" for i in range(200)]) == [str(i) for i in range(200)]


def test_only_reads_and_listings_stream(daemon: Daemon) -> None:
    with XenStore.connect(timeout=10) as store, pytest.raises(XenstoreInvalid):
        store.stream([(wire.WRITE, "/x")], lambda results: [])


def _answer(conn: socket.socket, request: tuple[int, int, int, bytes], payload: bytes) -> None:
    op, rq, tx, _ = request
    conn.sendall(wire.encode(op, rq, tx, payload))


def _out_of_turn(conn: socket.socket) -> None:
    """Answers the first listing, then holds the second one's reply back until the follow-up
    read of the first has arrived: only a link that sends follow-ups at once gets through."""
    first, second = _read_request(conn), _read_request(conn)
    _answer(conn, first, b"x\0")
    read = _read_request(conn)  # waits (10 s) for the follow-up
    assert read[0] == wire.READ, read
    assert read[3] == b"/a/x\0", read
    _answer(conn, second, b"")
    _answer(conn, read, b"value")


def test_a_follow_up_leaves_before_the_rest_of_its_level_is_answered(
    fake_peer: Callable[[Callable[[socket.socket], None]], FakePeer], link: str
) -> None:
    peer = fake_peer(_out_of_turn)
    store = XenStore.connect(peer.path, timeout=3)
    try:
        made = ["/a", "/b"]
        got: dict[str, Result] = {}

        def follow(results: list[tuple[int, Result]]) -> list[tuple[int, str]]:
            more = []
            for index, result in results:
                got[made[index]] = result
                if isinstance(result, list):
                    more += [(wire.READ, f"{made[index]}/{name}") for name in result]
            made.extend(path for _op, path in more)
            return more

        if link == "threaded":
            # level by level: the read waits for /b's reply, which waits for the read
            with pytest.raises(XenstoreError, match="no reply within"):
                store.stream([(wire.DIRECTORY, "/a"), (wire.DIRECTORY, "/b")], follow)
            return
        store.stream([(wire.DIRECTORY, "/a"), (wire.DIRECTORY, "/b")], follow)
        assert got == {"/a": ["x"], "/b": [], "/a/x": "value"}
    finally:
        store.close()
