"""Embedded xenstored, node operations over raw wire messages: the Xen 4.17 C daemon's answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.fixtures.xenstore import ERROR, EmbeddedXenstored, RawClient

DIRECTORY, READ, GET_PERMS, WRITE, MKDIR, RM, SET_PERMS = 1, 2, 3, 11, 12, 13, 14
GET_DOMAIN_PATH, DIRECTORY_PART = 10, 22


def ok(msg_payload: bytes) -> None:
    assert msg_payload == b"OK\0"


def err(client: RawClient, msg_type: int, *args: bytes, raw: bytes | None = None) -> bytes:
    msg = client.call(msg_type, *args, raw=raw)
    assert msg.type == ERROR, msg
    return msg.payload


@pytest.fixture
def base(c: RawClient) -> Iterator[str]:
    """A unique path per test in the shared daemon, removed afterwards. Unlike conftest's `base` it
    is not made first: these tests make it themselves, by the operation they test."""
    path = f"/test/{uuid.uuid4().hex}"
    yield path
    c.call(RM, path.encode())


def write(c: RawClient, path: str, value: bytes) -> None:
    msg = c.call(WRITE, raw=path.encode() + b"\0" + value)
    assert msg.payload == b"OK\0", msg


def test_fresh_daemon_has_root_and_tool(xenstored: EmbeddedXenstored) -> None:
    with RawClient(xenstored.socket_path) as c:
        assert c.call(DIRECTORY, b"/").payload == b"tool\0"
        assert c.call(DIRECTORY, b"/tool").payload == b"xenstored\0"
        assert c.call(GET_PERMS, b"/").payload == b"n0\0"
        assert c.call(READ, b"/tool/xenstored").payload == b""


def test_write_read_echoes_ids_and_reads_without_nul(c: RawClient, base: str) -> None:
    req_id = c.send(WRITE, f"{base}/k".encode() + b"\0value", req_id=0xDEADBEEF)
    reply = c.reply()
    assert (reply.type, reply.req_id, reply.tx_id, reply.payload) == (WRITE, 0xDEADBEEF, 0, b"OK\0")
    assert req_id == 0xDEADBEEF
    assert c.call(READ, f"{base}/k".encode()).payload == b"value"


def test_values_are_arbitrary_bytes_including_empty_and_nul(c: RawClient, base: str) -> None:
    blob = bytes(range(256)) + b"\0\0tail"
    write(c, f"{base}/bin", blob)
    assert c.call(READ, f"{base}/bin".encode()).payload == blob
    write(c, f"{base}/empty", b"")
    assert c.call(READ, f"{base}/empty".encode()).payload == b""


def test_write_creates_parents_with_empty_values_and_inherited_perms(c: RawClient, base: str) -> None:
    write(c, base, b"top")
    ok(c.call(SET_PERMS, base.encode(), b"n0", b"r5").payload)
    write(c, f"{base}/x/y/z", b"leaf")
    assert c.call(READ, f"{base}/x".encode()).payload == b""
    assert c.call(DIRECTORY, f"{base}/x/y".encode()).payload == b"z\0"
    # dom0 creates: the parent's list is copied as is (owner not changed to the creator).
    assert c.call(GET_PERMS, f"{base}/x/y/z".encode()).payload == b"n0\0r5\0"


def test_directory_lists_children_in_creation_order(c: RawClient, base: str) -> None:
    for name in ("zeta", "alpha", "mid"):
        write(c, f"{base}/{name}", b"")
    assert c.call(DIRECTORY, base.encode()).payload == b"zeta\0alpha\0mid\0"
    assert c.call(DIRECTORY, f"{base}/zeta".encode()).payload == b""


def test_mkdir_is_idempotent_and_keeps_value(c: RawClient, base: str) -> None:
    write(c, f"{base}/d", b"keep")
    ok(c.call(MKDIR, f"{base}/d".encode()).payload)
    ok(c.call(MKDIR, f"{base}/new/deep".encode()).payload)
    assert c.call(READ, f"{base}/d".encode()).payload == b"keep"
    assert c.call(READ, f"{base}/new/deep".encode()).payload == b""


def test_rm_semantics(c: RawClient, base: str) -> None:
    write(c, f"{base}/a/b/c", b"1")
    ok(c.call(RM, f"{base}/a".encode()).payload)
    assert err(c, READ, f"{base}/a/b/c".encode()) == b"ENOENT\0"
    assert c.call(DIRECTORY, base.encode()).payload == b""
    # Missing node with an existing parent: fine. Missing parent: ENOENT.
    ok(c.call(RM, f"{base}/a".encode()).payload)
    assert err(c, RM, f"{base}/nope/child".encode()) == b"ENOENT\0"
    assert err(c, RM, b"/") == b"EINVAL\0"


def test_read_missing_is_enoent(c: RawClient, base: str) -> None:
    assert err(c, READ, f"{base}/missing".encode()) == b"ENOENT\0"
    assert err(c, DIRECTORY, f"{base}/missing".encode()) == b"ENOENT\0"


@pytest.mark.parametrize(
    "path",
    [b"/a//b", b"/a/", b"/a b", b"/a\xff", b"/a.b", b"", b"@introduceDomain", b"/" + b"x" * 2048],
    ids=["double-slash", "trailing-slash", "space", "high-byte", "dot", "empty", "special", "too-long"],
)
def test_invalid_paths_are_einval(c: RawClient, path: bytes) -> None:
    assert err(c, READ, path) == b"EINVAL\0"
    assert err(c, WRITE, raw=path + b"\0v") == b"EINVAL\0"


def test_path_limit_counts_below_local_domain(c: RawClient) -> None:
    # 2048 bytes are allowed below /local/domain/<id>/ (and in total elsewhere).
    name = "/local/domain/0/" + "x" * 2048
    ok(c.call(WRITE, raw=name.encode() + b"\0v").payload)
    ok(c.call(RM, b"/local/domain/0/" + b"x" * 2048).payload)
    assert err(c, WRITE, raw=b"/local/domain/0/" + b"x" * 2049 + b"\0v") == b"EINVAL\0"
    assert err(c, WRITE, raw=b"/" + b"x" * 2048 + b"\0v") == b"EINVAL\0"


def test_malformed_argument_lists_are_einval(c: RawClient, base: str) -> None:
    # Deliberate deviation: the C daemon answers some of these with a stale errno of an earlier
    # request (see test_server_differential.py); EINVAL is what its code means to say.
    write(c, f"{base}/k", b"v")
    assert err(c, READ, raw=f"{base}/k".encode()) == b"EINVAL\0"  # no NUL
    assert err(c, READ, raw=f"{base}/k\0extra\0".encode()) == b"EINVAL\0"  # two strings
    assert err(c, WRITE, raw=b"/no-nul-at-all") == b"EINVAL\0"
    assert err(c, SET_PERMS, raw=f"{base}/k\0".encode()) == b"EINVAL\0"  # no permission given


def test_relative_paths_resolve_against_dom0_home(c: RawClient) -> None:
    name = f"rel-{uuid.uuid4().hex}"
    ok(c.call(WRITE, raw=name.encode() + b"\0v").payload)
    assert c.call(READ, f"/local/domain/0/{name}".encode()).payload == b"v"
    ok(c.call(RM, name.encode()).payload)


def test_set_and_get_perms_round_trip_and_validation(c: RawClient, base: str) -> None:
    write(c, f"{base}/p", b"")
    ok(c.call(SET_PERMS, f"{base}/p".encode(), b"n5", b"r7", b"b9", b"w0x10").payload)
    assert c.call(GET_PERMS, f"{base}/p".encode()).payload == b"n5\0r7\0b9\0w16\0"
    for bad in (b"x5", b"r", b"r5x", b"r 5 "):
        assert err(c, SET_PERMS, f"{base}/p".encode(), bad) == b"EINVAL\0", bad
    assert c.call(GET_PERMS, f"{base}/p".encode()).payload == b"n5\0r7\0b9\0w16\0"


def test_get_domain_path(c: RawClient) -> None:
    assert c.call(GET_DOMAIN_PATH, b"7").payload == b"/local/domain/7\0"
    assert c.call(GET_DOMAIN_PATH, b"junk").payload == b"/local/domain/0\0"
    assert err(c, GET_DOMAIN_PATH, raw=b"7") == b"EINVAL\0"


def test_big_directory_is_e2big_and_directory_part_pages_it(c: RawClient, base: str) -> None:
    names = [f"child-{i:04d}-{'x' * 40}" for i in range(120)]  # > 4096 bytes of names
    for name in names:
        ok(c.call(MKDIR, f"{base}/big/{name}".encode()).payload)
    assert err(c, DIRECTORY, f"{base}/big".encode()) == b"E2BIG\0"
    got: list[bytes] = []
    offset = 0
    generation = None
    while True:
        reply = c.call(DIRECTORY_PART, f"{base}/big".encode(), str(offset).encode())
        assert reply.type == DIRECTORY_PART
        gen, _, rest = reply.payload.partition(b"\0")
        assert generation in (None, gen)
        generation = gen
        assert len(reply.payload) <= 4096
        parts = rest.split(b"\0")
        if rest.endswith(b"\0\0") or rest == b"\0":
            got.extend(p for p in parts if p)
            break
        chunk = [p for p in parts if p]
        got.extend(chunk)
        offset += sum(len(p) + 1 for p in chunk)
    assert [g.decode() for g in got] == names
