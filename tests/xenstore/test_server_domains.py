"""Embedded xenstored as seen by an unprivileged domain: permissions, quotas, domain life cycle."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.xenstore import ERROR, EmbeddedXenstored, RawClient

DIRECTORY, READ, GET_PERMS, WATCH, TX_START, INTRODUCE, RELEASE = 1, 2, 3, 4, 6, 8, 9
GET_DOMAIN_PATH, WRITE, MKDIR, RM, SET_PERMS, IS_INTRODUCED = 10, 11, 12, 13, 14, 17


@pytest.fixture
def daemon(xenstored_factory: Callable[..., EmbeddedXenstored]) -> EmbeddedXenstored:
    return xenstored_factory(domain_sockets=[5])


@pytest.fixture
def dom0(daemon: EmbeddedXenstored) -> Iterator[RawClient]:
    with RawClient(daemon.socket_path) as client:
        yield client


@pytest.fixture
def dom5(daemon: EmbeddedXenstored) -> Iterator[RawClient]:
    with RawClient(daemon.domain_socket(5)) as client:
        yield client


def write(c: RawClient, path: str | bytes, value: bytes = b"v") -> bytes:
    raw = path.encode() if isinstance(path, str) else path
    return c.call(WRITE, raw=raw + b"\0" + value).payload


def perms(c: RawClient, path: str, *entries: bytes) -> bytes:
    return c.call(SET_PERMS, path.encode(), *entries).payload


def test_relative_paths_resolve_to_the_domain_home(dom0: RawClient, dom5: RawClient) -> None:
    dom0.call(MKDIR, b"/local/domain/5")
    assert perms(dom0, "/local/domain/5", b"n5") == b"OK\0"
    assert write(dom5, "name", b"guest") == b"OK\0"
    assert dom0.call(READ, b"/local/domain/5/name").payload == b"guest"
    assert dom5.call(GET_DOMAIN_PATH, b"5").payload == b"/local/domain/5\0"


def test_read_write_rights_follow_the_permission_list(dom0: RawClient, dom5: RawClient) -> None:
    write(dom0, "/p/node", b"secret")
    assert dom5.call(READ, b"/p/node").payload == b"EACCES\0"
    assert perms(dom0, "/p/node", b"n0", b"r5") == b"OK\0"
    assert dom5.call(READ, b"/p/node").payload == b"secret"
    assert write(dom5, "/p/node", b"x") == b"EACCES\0"
    assert perms(dom0, "/p/node", b"n0", b"b5") == b"OK\0"
    assert write(dom5, "/p/node", b"mine") == b"OK\0"
    # The first entry is the default for unlisted domains.
    assert perms(dom0, "/p/node", b"r0") == b"OK\0"
    assert dom5.call(READ, b"/p/node").payload == b"mine"


def test_missing_nodes_do_not_leak_through_unreadable_parents(dom0: RawClient, dom5: RawClient) -> None:
    dom0.call(MKDIR, b"/open")
    perms(dom0, "/open", b"r0")
    dom0.call(MKDIR, b"/closed")
    assert dom5.call(READ, b"/open/missing").payload == b"ENOENT\0"
    assert dom5.call(READ, b"/closed/missing").payload == b"EACCES\0"
    assert dom5.call(DIRECTORY, b"/closed").payload == b"EACCES\0"


def test_guest_creations_are_owned_by_the_guest(dom0: RawClient, dom5: RawClient) -> None:
    dom0.call(MKDIR, b"/shared")
    perms(dom0, "/shared", b"n0", b"b5", b"r7")
    assert write(dom5, "/shared/a/b", b"x") == b"OK\0"
    assert dom0.call(GET_PERMS, b"/shared/a").payload == b"n5\0b5\0r7\0"
    assert dom0.call(GET_PERMS, b"/shared/a/b").payload == b"n5\0b5\0r7\0"
    # Owners may change the rest of the list but not hand the node away.
    assert perms(dom5, "/shared/a/b", b"n5", b"r9") == b"OK\0"
    assert perms(dom5, "/shared/a/b", b"n9") == b"EPERM\0"
    # Not the owner: write access is not enough to change permissions.
    assert perms(dom5, "/shared", b"n0", b"b5") == b"EACCES\0"


def test_privileged_operations_are_refused(dom5: RawClient) -> None:
    assert dom5.call(INTRODUCE, b"9", b"0", b"1").payload == b"EACCES\0"
    assert dom5.call(RELEASE, b"9").payload == b"EACCES\0"
    assert dom5.call(IS_INTRODUCED, b"0").payload == b"EACCES\0"
    assert dom5.call(0, b"help").payload == b"EACCES\0"


def test_guest_watch_sees_only_readable_nodes(dom0: RawClient, dom5: RawClient) -> None:
    dom0.call(MKDIR, b"/w")
    perms(dom0, "/w", b"n0", b"r5")
    assert dom5.call(WATCH, b"/w", b"t").payload == b"OK\0"
    dom5.next_event()
    write(dom0, "/w/visible")  # inherits n0,r5: readable
    assert dom5.next_event().strings == [b"/w/visible", b"t"]
    dom0.call(MKDIR, b"/w/hidden")
    perms(dom0, "/w/hidden", b"n0")
    dom5.next_event()  # the mkdir itself was visible (inherited n0,r5)
    dom5.next_event()  # and so was the set_perms (old permissions were readable)
    write(dom0, "/w/hidden/x")  # n0 and parent n0: not for the guest
    assert dom5.no_event_within(0.2)


def test_special_event_permissions(dom0: RawClient, dom5: RawClient) -> None:
    assert dom5.call(WATCH, b"@introduceDomain", b"i").payload == b"OK\0"
    assert dom5.next_event().strings == [b"@introduceDomain", b"i"]
    dom0.call(INTRODUCE, b"8", b"0", b"1")
    assert dom5.no_event_within(0.2)
    assert perms(dom5, "@introduceDomain", b"r5") == b"EACCES\0"
    assert perms(dom0, "@introduceDomain", b"n0", b"r5") == b"OK\0"
    dom0.call(INTRODUCE, b"9", b"0", b"1")
    assert dom5.next_event().strings == [b"@introduceDomain", b"i"]
    assert perms(dom0, "@bogus", b"n0") == b"EINVAL\0"


def test_entry_size_quota(dom0: RawClient, dom5: RawClient) -> None:
    dom0.call(MKDIR, b"/big")
    perms(dom0, "/big", b"n0", b"b5")
    # record = 24 header + 8 per permission + value + children; 2048 is already too much.
    assert write(dom5, "/big/ok", b"x" * (2048 - 24 - 16 - 1)) == b"OK\0"
    assert write(dom5, "/big/ok", b"x" * (2048 - 24 - 16)) == b"ENOSPC\0"
    assert dom0.call(READ, b"/big/ok").payload == b"x" * 2007
    # dom0 is exempt.
    assert write(dom0, "/big/ok", b"y" * 4000) == b"OK\0"


def test_node_quota_counts_owned_nodes(dom0: RawClient, dom5: RawClient) -> None:
    dom0.call(MKDIR, b"/q")
    perms(dom0, "/q", b"n0", b"b5")
    created = 0
    i = 0
    while True:
        reply = write(dom5, f"/q/d{i // 20}/n{i % 20}")
        if reply != b"OK\0":
            assert reply == b"ENOSPC\0"
            break
        created += 1 if i % 20 else 2  # the first write in a directory creates it too
        i += 1
        assert i < 2000, "quota never hit"
    assert created == 1000  # 47 directories of 21 nodes, then 13 more
    # The failed write left nothing behind, and freeing a node makes room again.
    dirs = dom0.call(DIRECTORY, b"/q").payload.split(b"\0")[:-1]
    owned = len(dirs) + sum(len(dom0.call(DIRECTORY, b"/q/" + d).payload.split(b"\0")[:-1]) for d in dirs)
    assert owned == created
    assert dom0.call(RM, b"/q/d0/n5").payload == b"OK\0"
    assert write(dom5, "/q/d0/n5") == b"OK\0"
    assert write(dom5, "/q/d0/n99") == b"ENOSPC\0"
    assert write(dom0, "/q/d0/extra") == b"OK\0"  # dom0 is exempt


def test_watch_transaction_and_permission_count_quotas(dom0: RawClient, dom5: RawClient) -> None:
    for i in range(129):  # the C daemon checks `count > 128` before adding
        assert dom5.call(WATCH, f"/w{i}".encode(), b"t").payload == b"OK\0"
    assert dom5.call(WATCH, b"/w-too-many", b"t").payload == b"E2BIG\0"
    for _ in range(11):  # likewise `started > 10`
        assert dom5.call(TX_START, b"").type == TX_START
    assert dom5.call(TX_START, b"").payload == b"ENOSPC\0"
    dom0.call(MKDIR, b"/pq")
    perms(dom0, "/pq", b"n0", b"b5")
    write(dom5, "/pq/mine")
    assert perms(dom5, "/pq/mine", b"n5", b"r1", b"r2", b"r3", b"r4", b"r6") == b"ENOSPC\0"
    assert perms(dom5, "/pq/mine", b"n5", b"r1", b"r2", b"r3", b"r4") == b"OK\0"
    for _ in range(12):
        assert dom0.call(TX_START, b"").type == TX_START


def test_release_drops_domain_state_and_owned_nodes(dom0: RawClient, dom5: RawClient) -> None:
    assert dom0.call(IS_INTRODUCED, b"5").payload == b"F\0"
    assert dom0.call(INTRODUCE, b"5", b"1234", b"9").payload == b"OK\0"
    assert dom0.call(IS_INTRODUCED, b"5").payload == b"T\0"
    dom0.call(MKDIR, b"/local/domain/5")
    perms(dom0, "/local/domain/5", b"n0", b"r5")
    dom0.call(MKDIR, b"/local/domain/5/data")
    perms(dom0, "/local/domain/5/data", b"n5")
    write(dom5, "data/x")
    dom0.call(MKDIR, b"/local/domain/0/backend/vbd/5/51712")
    perms(dom0, "/local/domain/0/backend/vbd/5/51712", b"n0", b"r5")
    assert dom5.call(WATCH, b"/local/domain/5", b"g").payload == b"OK\0"
    dom5.next_event()
    assert dom0.call(WATCH, b"/local/domain/5", b"h").payload == b"OK\0"
    dom0.next_event()
    assert dom0.call(WATCH, b"@releaseDomain", b"r").payload == b"OK\0"
    dom0.next_event()

    assert dom0.call(RELEASE, b"5").payload == b"OK\0"
    got = [dom0.events.pop(0).strings for _ in range(len(dom0.events))]
    assert got == [[b"/local/domain/5/data", b"h"], [b"@releaseDomain", b"r"]]
    assert dom0.call(IS_INTRODUCED, b"5").payload == b"F\0"
    assert dom0.call(DIRECTORY, b"/local/domain/5").payload == b""  # the guest-owned subtree is gone
    assert dom0.call(READ, b"/local/domain/0/backend/vbd/5/51712").payload == b""  # dom0's stays
    # The guest connection's watches went with the domain.
    assert dom5.no_event_within(0.2)


def test_domain_management_errors(dom0: RawClient) -> None:
    assert dom0.call(RELEASE, b"0").payload == b"EINVAL\0"
    assert dom0.call(RELEASE, b"9").payload == b"ENOENT\0"
    assert dom0.call(INTRODUCE, b"9", b"0").payload == b"EINVAL\0"
    assert dom0.call(INTRODUCE, b"9", b"0", b"0").payload == b"EINVAL\0"
    assert dom0.call(IS_INTRODUCED, b"0").payload == b"T\0"
    assert dom0.call(IS_INTRODUCED, str(0x7FF0).encode()).payload == b"T\0"
    reply = dom0.call(IS_INTRODUCED, raw=b"0")
    assert (reply.type, reply.payload) == (ERROR, b"EINVAL\0")


def test_guest_transaction_touching_too_many_nodes_cannot_commit(dom0: RawClient, dom5: RawClient) -> None:
    dom0.call(MKDIR, b"/many")
    perms(dom0, "/many", b"n0", b"r5")
    tx = int(dom5.call(TX_START, b"").payload.rstrip(b"\0"))
    replies = {dom5.call(READ, f"/many/n{i}".encode(), tx_id=tx).payload for i in range(1030)}
    # Each missing node costs one entry (its existing parent one more): the 1025th is refused.
    assert replies == {b"ENOENT\0", b"ENOSPC\0"}
    assert dom5.call(7, b"T", tx_id=tx).payload == b"ENOMEM\0"
    # dom0 has no such limit.
    tx0 = int(dom0.call(TX_START, b"").payload.rstrip(b"\0"))
    assert {dom0.call(READ, f"/many/n{i}".encode(), tx_id=tx0).payload for i in range(1030)} == {b"ENOENT\0"}
    assert dom0.call(7, b"T", tx_id=tx0).payload == b"OK\0"
