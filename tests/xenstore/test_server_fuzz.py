"""Hypothesis against the embedded xenstored: garbage never kills it or corrupts the tree."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.xenstore import EmbeddedXenstored, RawClient
from xenblockctl.xenstore.server import paths
from xenblockctl.xenstore.server.core import Xenstored
from xenblockctl.xenstore.server.wire import HEADER, Frame, FrameDecoder, OversizeFrame

DIRECTORY, READ, GET_PERMS = 1, 2, 3


def tree(client: RawClient, path: bytes = b"/") -> dict[bytes, tuple[bytes, bytes]]:
    """Every node with its value and permissions, read over the wire as dom0."""
    out: dict[bytes, tuple[bytes, bytes]] = {}
    stack = [path]
    while stack:
        p = stack.pop()
        out[p] = (client.call(READ, p).payload, client.call(GET_PERMS, p).payload)
        for name in client.call(DIRECTORY, p).payload.split(b"\0")[:-1]:
            stack.append(p.rstrip(b"/") + b"/" + name)
    return out


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedXenstored]:
    # One daemon for all examples (a fresh one per example would take minutes); module-scoped
    # through the fixture module's own start/stop so the clean-exit check still applies.
    from tests.fixtures.xenstore import _start

    proc = _start([7])
    yield proc.info
    problems = proc.stop()
    assert not problems, problems


@pytest.fixture(scope="module")
def seeded(fuzz_daemon: EmbeddedXenstored) -> dict[bytes, tuple[bytes, bytes]]:
    with RawClient(fuzz_daemon.socket_path) as c:
        for path, value in ((b"/data/a", b"1"), (b"/data/b/c", b"2"), (b"/local/domain/7/x", b"3")):
            assert c.call(11, raw=path + b"\0" + value).payload == b"OK\0"
        return tree(c)


header_like = st.builds(
    lambda t, r, x, n, body: HEADER.pack(t, r, x, n) + body,
    st.one_of(st.integers(0, 30), st.integers(0, 2**32 - 1)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 3),
    st.one_of(st.integers(0, 64), st.integers(4090, 4100), st.integers(0, 2**32 - 1)),
    st.binary(max_size=128),
)
garbage = st.lists(st.one_of(st.binary(max_size=256), header_like), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=garbage, hang_up_early=st.booleans())
def test_garbage_from_a_guest_socket_changes_nothing(
    fuzz_daemon: EmbeddedXenstored,
    seeded: dict[bytes, tuple[bytes, bytes]],
    chunks: list[bytes],
    hang_up_early: bool,
) -> None:
    # Domain 7 may not write anywhere (every node is n0), so whatever the bytes decode to, the
    # tree must come out unchanged; and the daemon must keep serving.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(fuzz_daemon.domain_socket(7))
    try:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the daemon hung up on an oversize header: allowed
        if not hang_up_early:
            sock.settimeout(0.05)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
    finally:
        sock.close()
    with RawClient(fuzz_daemon.socket_path) as c:
        assert tree(c) == seeded


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_decoder_reassembles_any_split(chunks: list[bytes]) -> None:
    stream = b"".join(chunks)
    decoder = FrameDecoder()
    frames: list[Frame] = []
    try:
        for chunk in chunks:
            frames.extend(decoder.feed(chunk))
    except OversizeFrame:
        return
    # Whatever was decoded, re-encoding it gives back a prefix of the stream.
    encoded = b"".join(HEADER.pack(f.type, f.req_id, f.tx_id, len(f.payload)) + f.payload for f in frames)
    assert stream.startswith(encoded)
    assert len(stream) - len(encoded) == decoder.pending


# In-process: random well-formed requests from dom0 and a guest, then check tree invariants.

# A small set of paths, so that requests keep hitting the same nodes (and some are invalid).
rel_or_abs = st.sampled_from(
    ["/", "/a", "/a/b", "/a/b/c", "/b", "/local/domain/5", "/local/domain/5/x", "x", "x/y", "/a//b", "/@z"]
)
perm_entry = st.builds(
    lambda k, d: f"{k}{d}", st.sampled_from("rwbnq"), st.sampled_from(["0", "5", "7", "x"])
)


@st.composite
def request(draw: st.DrawFn) -> tuple[int, int, bytes, int]:
    conn = draw(st.sampled_from([0, 1]))
    op = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 21, 22]))
    path = draw(rel_or_abs).encode()
    if op == 11:
        payload = path + b"\0" + draw(st.binary(max_size=16))
    elif op == 14:
        entries = draw(st.lists(perm_entry, min_size=0, max_size=3))
        payload = path + b"\0" + b"".join(e.encode() + b"\0" for e in entries)
    elif op in (4, 5):
        payload = path + b"\0tok\0"
    elif op == 7:
        payload = draw(st.sampled_from([b"T\0", b"F\0", b"X\0"]))
    elif op == 22:
        payload = path + b"\0" + str(draw(st.integers(0, 20))).encode() + b"\0"
    else:
        payload = path + b"\0"
    tx = draw(st.sampled_from([0, 0, 0, 1, 2]))
    return conn, op, payload, tx


def check_invariants(core: Xenstored) -> None:
    store = core.store
    nodes = {p: store.get(p) for p, _ in store.walk("/")}
    assert len(nodes) == len(store), "nodes unreachable from / (or dangling children)"
    owned: Counter[int] = Counter()
    for path, node in nodes.items():
        assert node is not None
        owned[node.owner] += 1
        assert len(set(node.children)) == len(node.children), f"duplicate child in {path}"
        for name in node.children:
            assert store.get(paths.child(path, name)) is not None, f"dangling child {name} of {path}"
        if path != "/":
            parent = store.get(paths.parent(path))
            assert parent is not None
            assert paths.basename(path) in parent.children
    assert +store.owned == +owned


@settings(max_examples=200, deadline=None)
@given(st.lists(request(), max_size=40))
def test_random_requests_keep_the_tree_consistent(reqs: list[tuple[int, int, bytes, int]]) -> None:
    core = Xenstored()
    conns = [core.connect(0), core.connect(5)]
    core.handle(conns[0], Frame(11, 1, 0, b"/local/domain/5\0"))
    core.handle(conns[0], Frame(14, 2, 0, b"/local/domain/5\0n5\0"))
    for i, (who, op, payload, tx) in enumerate(reqs):
        core.handle(conns[who], Frame(op, i, tx, payload))
        check_invariants(core)
    for conn in conns:
        while conn.has_output():
            chunk = conn.output_chunk()
            conn.consume_output(len(chunk))
        assert conn.queued_bytes == 0
    for conn in conns:
        core.disconnect(conn)
    check_invariants(core)
