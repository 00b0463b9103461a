"""Embedded xenstored watches: first event, subtree matching, rm events, ordering, bookkeeping."""

from __future__ import annotations

import uuid

from tests.fixtures.xenstore import ERROR, WATCH_EVENT, EmbeddedXenstored, RawClient

READ, WATCH, UNWATCH, WRITE, MKDIR, RM, SET_PERMS, RESET_WATCHES = 2, 4, 5, 11, 12, 13, 14, 21
INTRODUCE, RELEASE = 8, 9


def watch(client: RawClient, path: str, token: bytes = b"tok") -> None:
    assert client.call(WATCH, path.encode(), token).payload == b"OK\0"
    assert client.next_event().strings == [path.encode(), token]


def write(c: RawClient, path: str, value: bytes = b"v") -> None:
    assert c.call(WRITE, raw=path.encode() + b"\0" + value).payload == b"OK\0"


def events(client: RawClient, n: int) -> list[str]:
    return [client.next_event().strings[0].decode() for _ in range(n)]


def test_first_event_follows_ack_even_for_missing_node(w: RawClient, base: str) -> None:
    req_id = w.send(WATCH, f"{base}/not/there\0t\0".encode())
    ack = w.recv_msg()
    assert ack is not None
    assert (ack.type, ack.req_id, ack.payload) == (WATCH, req_id, b"OK\0")
    event = w.recv_msg()
    assert event is not None
    assert (event.type, event.req_id, event.tx_id) == (WATCH_EVENT, 0, 0)
    assert event.payload == f"{base}/not/there\0t\0".encode()


def test_subtree_matching_by_component(w: RawClient, c: RawClient, base: str) -> None:
    watch(w, f"{base}/a")
    write(c, f"{base}/a/b/c")
    write(c, f"{base}/a")
    write(c, f"{base}/abc")  # a sibling sharing the prefix: no event
    write(c, f"{base}/other")
    assert events(w, 2) == [f"{base}/a/b/c", f"{base}/a"]
    assert w.no_event_within(0.2)


def test_event_precedes_the_reply_of_the_request_that_caused_it(w: RawClient, base: str) -> None:
    watch(w, base)
    req_id = w.send(WRITE, f"{base}/self\0x".encode())
    first = w.recv_msg()
    second = w.recv_msg()
    assert first is not None
    assert second is not None
    assert first.type == WATCH_EVENT
    assert first.strings[0] == f"{base}/self".encode()
    assert (second.type, second.req_id) == (WRITE, req_id)


def test_mkdir_of_existing_node_fires_nothing(w: RawClient, c: RawClient, base: str) -> None:
    write(c, f"{base}/d")
    watch(w, f"{base}/d")
    assert c.call(MKDIR, f"{base}/d".encode()).payload == b"OK\0"
    assert w.no_event_within(0.2)
    assert c.call(MKDIR, f"{base}/d/new".encode()).payload == b"OK\0"
    assert events(w, 1) == [f"{base}/d/new"]


def test_rm_reports_removed_root_to_ancestors_and_existing_descendant_watches(
    w: RawClient, c: RawClient, base: str
) -> None:
    write(c, f"{base}/a/b/c")
    watch(w, base, b"up")
    watch(w, f"{base}/a/b/c", b"leaf")
    watch(w, f"{base}/a/b/never", b"missing")
    assert c.call(RM, f"{base}/a".encode()).payload == b"OK\0"
    got = [w.next_event().strings for _ in range(2)]
    # Children go first (exact: only the watch on that very node), then the root (to ancestors).
    assert got == [[f"{base}/a/b/c".encode(), b"leaf"], [f"{base}/a".encode(), b"up"]]
    assert w.no_event_within(0.2)


def test_rm_of_missing_node_fires_nothing(w: RawClient, c: RawClient, base: str) -> None:
    watch(w, base)
    assert c.call(RM, f"{base}/ghost".encode()).payload == b"OK\0"
    assert w.no_event_within(0.2)


def test_set_perms_fires(w: RawClient, c: RawClient, base: str) -> None:
    write(c, f"{base}/p")
    watch(w, f"{base}/p")
    assert c.call(SET_PERMS, f"{base}/p".encode(), b"n0", b"r3").payload == b"OK\0"
    assert events(w, 1) == [f"{base}/p"]


def test_duplicate_watch_is_eexist_and_tokens_distinguish(w: RawClient, c: RawClient, base: str) -> None:
    watch(w, base, b"one")
    reply = w.call(WATCH, base.encode(), b"one")
    assert (reply.type, reply.payload) == (ERROR, b"EEXIST\0")
    watch(w, base, b"two")
    write(c, f"{base}/k")
    got = sorted(w.next_event().strings[1] for _ in range(2))
    assert got == [b"one", b"two"]


def test_unwatch_removes_only_that_pair(w: RawClient, c: RawClient, base: str) -> None:
    watch(w, base, b"one")
    watch(w, base, b"two")
    assert w.call(UNWATCH, base.encode(), b"one").payload == b"OK\0"
    assert w.call(UNWATCH, base.encode(), b"one").payload == b"ENOENT\0"
    write(c, f"{base}/k")
    assert w.next_event().strings == [f"{base}/k".encode(), b"two"]
    assert w.no_event_within(0.2)


def test_relative_watch_gets_relative_paths(w: RawClient, c: RawClient) -> None:
    name = f"relw-{uuid.uuid4().hex}"
    assert w.call(WATCH, name.encode(), b"r").payload == b"OK\0"
    assert w.next_event().strings == [name.encode(), b"r"]
    write(c, f"/local/domain/0/{name}/leaf")
    assert w.next_event().strings == [f"{name}/leaf".encode(), b"r"]
    c.call(RM, f"/local/domain/0/{name}".encode())


def test_reset_watches_forgets_everything(w: RawClient, c: RawClient, base: str) -> None:
    watch(w, base)
    assert w.call(RESET_WATCHES, b"").payload == b"OK\0"
    write(c, f"{base}/k")
    assert w.no_event_within(0.2)


def test_invalid_watch_requests(w: RawClient) -> None:
    assert w.call(WATCH, raw=b"/a\0").payload == b"EINVAL\0"
    assert w.call(WATCH, raw=b"/a\0t\0extra\0").payload == b"EINVAL\0"
    assert w.call(WATCH, b"/bad//path", b"t").payload == b"EINVAL\0"
    assert w.call(WATCH, b"@" + b"x" * 2048, b"t").payload == b"EINVAL\0"


def test_special_watches_fire_on_introduce_and_release(xenstored: EmbeddedXenstored) -> None:
    with RawClient(xenstored.socket_path) as w, RawClient(xenstored.socket_path) as c:
        watch(w, "@introduceDomain", b"in")
        watch(w, "@releaseDomain", b"out")
        assert c.call(INTRODUCE, b"7", b"0", b"3").payload == b"OK\0"
        assert w.next_event().strings == [b"@introduceDomain", b"in"]
        # Re-introducing an introduced domain is not news.
        assert c.call(INTRODUCE, b"7", b"0", b"3").payload == b"OK\0"
        assert w.no_event_within(0.2)
        assert c.call(RELEASE, b"7").payload == b"OK\0"
        assert w.next_event().strings == [b"@releaseDomain", b"out"]


def test_watch_ignores_tx_id(w: RawClient, base: str) -> None:
    reply = w.call(WATCH, base.encode(), b"t", tx_id=12345)
    assert reply.payload == b"OK\0"
    assert w.next_event().strings == [base.encode(), b"t"]


def test_write_in_other_connection_reaches_all_watchers(
    xenstored_session: EmbeddedXenstored, base: str
) -> None:
    clients = [RawClient(xenstored_session.socket_path) for _ in range(5)]
    try:
        for i, cl in enumerate(clients):
            watch(cl, base, str(i).encode())
        write(clients[0], f"{base}/k")
        for i, cl in enumerate(clients):
            assert cl.next_event().strings == [f"{base}/k".encode(), str(i).encode()]
    finally:
        for cl in clients:
            cl.close()


def test_read_is_unaffected_by_pending_events(w: RawClient, c: RawClient, base: str) -> None:
    watch(w, base)
    for i in range(50):
        write(c, f"{base}/n{i}")
    assert w.call(READ, f"{base}/n49".encode()).payload == b"v"
    assert len(w.events) == 50
