"""One scenario suite, two daemons: Debian 12's C xenstored (the oracle) and our embedded one.

Every test runs once per `daemon` param ("c", "embedded") and asserts the same observable bytes:
replies, error names, watch events, conflict outcomes. Expected values were measured against C
xenstored 4.17.7 (run by tests/fixtures/cxenstored.py); where they differ from the docs the test
says so. Requests go through the raw wire client so both daemons see exactly the same bytes,
including ones our XenStore client would refuse to send."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.cxenstored import Daemon
from tests.support.xsraw import (
    DIRECTORY,
    DIRECTORY_PART,
    GET_DOMAIN_PATH,
    GET_PERMS,
    INTRODUCE,
    IS_DOMAIN_INTRODUCED,
    MKDIR,
    READ,
    RELEASE,
    RESET_WATCHES,
    RM,
    SET_PERMS,
    TRANSACTION_END,
    TRANSACTION_START,
    UNWATCH,
    WATCH,
    WATCH_EVENT,
    WRITE,
    RawConnection,
    Reply,
    arg,
)

Connect = Callable[[], RawConnection]


@pytest.fixture
def connect(daemon: Daemon) -> Iterator[Connect]:
    conns: list[RawConnection] = []

    def new() -> RawConnection:
        conn = RawConnection(str(daemon.socket))
        conns.append(conn)
        return conn

    yield new
    for conn in conns:
        conn.close()


@pytest.fixture
def xs(connect: Connect) -> RawConnection:
    return connect()


def value(reply: Reply) -> bytes:
    assert reply.error is None, f"unexpected error {reply.error}"
    return reply.payload


def ok(reply: Reply) -> None:
    assert reply.error is None, f"unexpected error {reply.error}"
    assert reply.payload == b"OK\0"


def write(xs: RawConnection, path: str, data: bytes | str = b"", tx: int = 0) -> Reply:
    raw = data.encode() if isinstance(data, str) else data
    return xs.request(WRITE, path.encode() + b"\0" + raw, tx)


def start_tx(xs: RawConnection) -> int:
    reply = xs.request(TRANSACTION_START, b"\0")
    text = value(reply).rstrip(b"\0")
    assert text.isdigit()
    assert int(text) != 0
    return int(text)


def children(reply: Reply) -> list[str]:
    payload = value(reply)
    return sorted(payload.rstrip(b"\0").decode().split("\0")) if payload else []


def next_event(xs: RawConnection) -> tuple[str, str]:
    """The next watch event, whether it was already collected during a request or is still due."""
    if xs.events:
        return xs.events.pop(0)
    reply = xs.recv()
    assert reply.type == WATCH_EVENT, reply
    assert (reply.req_id, reply.tx_id) == (0, 0)
    path, token = reply.payload.split(b"\0")[:2]
    assert reply.payload == path + b"\0" + token + b"\0"
    return path.decode(), token.decode()


def no_event(xs: RawConnection) -> bool:
    """True when no watch event is pending (checked with a round trip the daemon must answer
    after delivering anything it had queued)."""
    xs.request(READ, arg("/"))
    return not xs.events


# -- tree, values, paths -----------------------------------------------------------------------


def test_initial_tree(xs: RawConnection) -> None:
    assert "tool" in children(xs.request(DIRECTORY, arg("/")))
    assert value(xs.request(READ, arg("/"))) == b""
    assert value(xs.request(GET_PERMS, arg("/"))) == b"n0\0"


def test_write_creates_parents_with_empty_values(xs: RawConnection) -> None:
    ok(write(xs, "/a/b/c", "v"))
    assert value(xs.request(READ, arg("/a"))) == b""
    assert value(xs.request(READ, arg("/a/b"))) == b""
    assert value(xs.request(READ, arg("/a/b/c"))) == b"v"  # READ replies carry no NUL
    assert children(xs.request(DIRECTORY, arg("/a"))) == ["b"]
    assert value(xs.request(DIRECTORY, arg("/a/b/c"))) == b""  # a leaf lists as empty


def test_directory_lists_children_in_creation_order(xs: RawConnection) -> None:
    # Measured on C xenstored: insertion order, a re-created child moves to the end. Tools print
    # in this order (xenstore-ls), so a sorted listing would be a visible difference.
    for name in ("zeta", "alpha", "mid", "beta"):
        ok(write(xs, f"/o/{name}", "v"))
    ok(xs.request(RM, arg("/o/alpha")))
    ok(write(xs, "/o/alpha", "v"))
    assert value(xs.request(DIRECTORY, arg("/o"))) == b"zeta\0mid\0beta\0alpha\0"


def test_values_are_arbitrary_bytes(xs: RawConnection) -> None:
    ok(write(xs, "/v/empty", b""))
    assert value(xs.request(READ, arg("/v/empty"))) == b""
    raw = b"\x80\xff\n\x00z\x01"
    ok(write(xs, "/v/bin", raw))
    assert value(xs.request(READ, arg("/v/bin"))) == raw


def test_mkdir(xs: RawConnection) -> None:
    ok(write(xs, "/m", "keep"))
    ok(xs.request(MKDIR, arg("/m")))
    assert value(xs.request(READ, arg("/m"))) == b"keep"
    ok(xs.request(MKDIR, arg("/m/n/o")))
    assert value(xs.request(READ, arg("/m/n/o"))) == b""


def test_rm(xs: RawConnection) -> None:
    ok(write(xs, "/r/a/b", "1"))
    ok(write(xs, "/r/c", "2"))
    ok(xs.request(RM, arg("/r/a")))
    assert xs.request(READ, arg("/r/a/b")).error == "ENOENT"
    assert children(xs.request(DIRECTORY, arg("/r"))) == ["c"]
    ok(xs.request(RM, arg("/r/missing")))  # missing node, existing parent: OK
    assert xs.request(RM, arg("/r/missing/deeper")).error == "ENOENT"  # parent missing
    assert xs.request(RM, arg("/")).error == "EINVAL"


def test_missing_nodes(xs: RawConnection) -> None:
    for op in (READ, DIRECTORY, GET_PERMS):
        assert xs.request(op, arg("/no/such/node")).error == "ENOENT"


@pytest.mark.parametrize("path", ["/a//b", "/a/", "/a b", "@foo", "/ä", "/a\nb", "/a/../x", "/a/./x", "/a.b"])
def test_invalid_paths(xs: RawConnection, path: str) -> None:
    assert write(xs, path, "v").error == "EINVAL"
    assert xs.request(READ, arg(path)).error == "EINVAL"


@pytest.mark.parametrize("path", ["/a@b", "/@b", "/A-Z_0-9"])
def test_unusual_but_valid_paths(xs: RawConnection, path: str) -> None:
    ok(write(xs, path, "v"))
    assert value(xs.request(READ, arg(path))) == b"v"


def test_relative_paths_resolve_against_local_domain_0(xs: RawConnection) -> None:
    # What libxl's XENBUS_PATH relies on with C xenstored (reference xen-block-protocol.md §1.3)
    ok(write(xs, "backend/vbd/5/51712/state", "1"))
    assert value(xs.request(READ, arg("/local/domain/0/backend/vbd/5/51712/state"))) == b"1"
    assert value(xs.request(READ, arg("backend/vbd/5/51712/state"))) == b"1"
    assert "backend" in children(xs.request(DIRECTORY, arg("/local/domain/0")))
    assert xs.request(READ, arg("nothing-here")).error == "ENOENT"


def test_path_length_limits(xs: RawConnection) -> None:
    # Measured on C xenstored 4.17: the 2048-byte path-max quota applies to socket (dom0)
    # connections too, counted after a `/local/domain/<id>/` prefix; the 3072 absolute limit of
    # xenstore.txt is never reached.
    ok(write(xs, "/" + "p" * 2047, "v"))
    assert write(xs, "/" + "q" * 2048, "v").error == "EINVAL"
    ok(write(xs, "r" * 2048, "v"))
    ok(write(xs, "/local/domain/5/" + "s" * 2048, "v"))


def test_payload_limit(connect: Connect) -> None:
    xs = connect()
    ok(write(xs, "/big", b"x" * (4096 - len("/big") - 1)))  # exactly XENSTORE_PAYLOAD_MAX
    assert len(value(xs.request(READ, arg("/big")))) == 4091
    xs.send(WRITE, b"/big\0" + b"y" * 5000)
    assert xs.is_closed_by_peer(), "an oversize payload must close the connection"
    other = connect()
    assert len(value(other.request(READ, arg("/big")))) == 4091  # and change nothing


def test_malformed_argument_framing(xs: RawConnection, daemon: Daemon) -> None:
    """A single-argument request whose argument is not NUL-terminated (or has extra arguments).
    C xenstored answers ENOENT, and ENOMEM (!) for MKDIR/RM, as artefacts of its parser.
    DELIBERATE DEVIATION: the embedded daemon answers EINVAL for all of them. No client sends
    these (libxenstore and pyxs always terminate), so nothing can depend on the C answers."""
    requests = [
        (READ, b"/"),
        (READ, b"/tool\0extra\0"),
        (DIRECTORY, b""),
        (GET_PERMS, b"/"),
        (MKDIR, b"/m"),
        (RM, b"/m"),
    ]
    answers = [xs.request(op, payload).error for op, payload in requests]
    if daemon.name == "c":
        assert answers == ["ENOENT", "ENOENT", "ENOENT", "ENOENT", "ENOMEM", "ENOMEM"]
    else:
        assert answers == ["EINVAL"] * 6
    assert xs.request(WATCH, b"/w\0").error == "EINVAL"  # both: token missing
    assert xs.request(GET_DOMAIN_PATH, b"7").error == "EINVAL"  # both


def test_unknown_operation(xs: RawConnection) -> None:
    assert xs.request(99, b"x\0").error == "ENOSYS"
    assert value(xs.request(READ, arg("/"))) == b""  # the connection survives


# -- permissions -------------------------------------------------------------------------------


def test_permissions(xs: RawConnection) -> None:
    ok(write(xs, "/p", "v"))
    assert value(xs.request(GET_PERMS, arg("/p"))) == b"n0\0"
    ok(xs.request(SET_PERMS, arg("/p", "n0", "r5")))
    assert value(xs.request(GET_PERMS, arg("/p"))) == b"n0\0r5\0"
    ok(write(xs, "/p/child", "c"))  # inherits the parent's list (owner = creator, dom0)
    assert value(xs.request(GET_PERMS, arg("/p/child"))) == b"n0\0r5\0"
    ok(xs.request(SET_PERMS, arg("/p", "b7", "w0")))
    assert value(xs.request(GET_PERMS, arg("/p"))) == b"b7\0w0\0"
    assert xs.request(SET_PERMS, arg("/p", "x5")).error == "EINVAL"
    assert xs.request(SET_PERMS, arg("/p")).error == "EINVAL"
    assert xs.request(SET_PERMS, arg("/missing", "n0")).error == "ENOENT"


# -- watches -----------------------------------------------------------------------------------


def test_watch_fires_on_register(xs: RawConnection) -> None:
    ok(xs.request(WATCH, arg("/w/missing", "t1")))
    assert next_event(xs) == ("/w/missing", "t1")
    assert xs.request(WATCH, arg("/w/missing", "t1")).error == "EEXIST"
    ok(xs.request(WATCH, arg("/w/missing", "t2")))  # same path, other token: a second watch
    assert next_event(xs) == ("/w/missing", "t2")
    assert xs.request(UNWATCH, arg("/w/other", "t1")).error == "ENOENT"
    assert no_event(xs)


def test_watch_covers_the_subtree_only(connect: Connect) -> None:
    xs, writer = connect(), connect()
    ok(xs.request(WATCH, arg("/be/vbd", "tok")))
    assert next_event(xs) == ("/be/vbd", "tok")
    ok(write(writer, "/be/vbd/5/51712/state", "2"))
    assert next_event(xs) == ("/be/vbd/5/51712/state", "tok")
    ok(write(writer, "/be/vbdx", "not below"))
    ok(write(writer, "/be", "parent"))
    ok(write(writer, "/be/vbd", "itself"))
    assert next_event(xs) == ("/be/vbd", "tok")
    ok(writer.request(SET_PERMS, arg("/be/vbd", "n0", "r5")))  # permission changes fire too
    assert next_event(xs) == ("/be/vbd", "tok")
    assert no_event(xs)


def test_rm_fires_for_every_watched_removed_node(connect: Connect) -> None:
    xs, writer = connect(), connect()
    ok(write(writer, "/rmw/a/b/c/d", "1"))
    ok(write(writer, "/rmw/a/e", "2"))
    watches = [("/rmw/a/b/c/d", "d"), ("/rmw/a/b", "b"), ("/rmw/a/e", "e"), ("/rmw/a", "a"), ("/rmw", "top")]
    for path, token in watches:
        ok(xs.request(WATCH, arg(path, token)))
    # Consume the registration events first: C xenstored drops an event identical (path and
    # token) to one still queued for the connection ("dropping duplicate watch"), so a
    # registration event not yet flushed would swallow a later identical one.
    assert sorted(next_event(xs) for _ in watches) == sorted(watches)
    ok(writer.request(RM, arg("/rmw/a")))
    events = [next_event(xs) for _ in range(5)]
    # Every watch on a removed descendant fires with its own path, deepest first; watches at or
    # above the removed node fire with the removed node's path.
    assert sorted(events[:3]) == [("/rmw/a/b", "b"), ("/rmw/a/b/c/d", "d"), ("/rmw/a/e", "e")]
    assert events.index(("/rmw/a/b/c/d", "d")) < events.index(("/rmw/a/b", "b"))
    assert sorted(events[3:]) == [("/rmw/a", "a"), ("/rmw/a", "top")]
    assert no_event(xs)


def test_watch_tokens(xs: RawConnection) -> None:
    ok(xs.request(WATCH, arg("/tk", "has space")))
    ok(xs.request(WATCH, b"/tk\0\0"))  # an empty token is accepted
    assert xs.request(WATCH, arg("/tk")).error == "EINVAL"  # token missing
    assert xs.request(WATCH, arg("/tk", "a", "b")).error == "EINVAL"  # one argument too many
    assert sorted(next_event(xs) for _ in range(2)) == [("/tk", ""), ("/tk", "has space")]


def test_unwatch_stops_events(connect: Connect) -> None:
    xs, writer = connect(), connect()
    ok(xs.request(WATCH, arg("/uw", "t")))
    assert next_event(xs) == ("/uw", "t")
    ok(xs.request(UNWATCH, arg("/uw", "t")))
    ok(write(writer, "/uw/x", "1"))
    assert no_event(xs)


def test_relative_watch_reports_relative_paths(connect: Connect) -> None:
    xs, writer = connect(), connect()
    ok(xs.request(WATCH, arg("backend/vbd", "rel")))
    assert next_event(xs) == ("backend/vbd", "rel")
    ok(write(writer, "/local/domain/0/backend/vbd/5/51712/state", "4"))
    assert next_event(xs) == ("backend/vbd/5/51712/state", "rel")


def test_transaction_events_fire_at_commit_in_order(connect: Connect) -> None:
    xs, writer = connect(), connect()
    ok(xs.request(WATCH, arg("/txw", "be")))
    assert next_event(xs) == ("/txw", "be")
    tx = start_tx(writer)
    ok(write(writer, "/txw/physical-device-luid", "1", tx))
    ok(write(writer, "/txw/physical-device", "7:0", tx))
    assert no_event(xs), "nothing may fire before commit"
    ok(writer.request(TRANSACTION_END, b"T\0", tx))
    ok(write(writer, "/txw/hotplug-status", "connected"))
    assert [next_event(xs)[0] for _ in range(3)] == [
        "/txw/physical-device-luid",
        "/txw/physical-device",
        "/txw/hotplug-status",
    ]
    tx = start_tx(writer)
    ok(write(writer, "/txw/aborted", "1", tx))
    ok(writer.request(TRANSACTION_END, b"F\0", tx))
    assert no_event(xs), "an aborted transaction fires nothing"


def test_special_watches_and_domains(connect: Connect) -> None:
    xs, toolstack = connect(), connect()
    ok(xs.request(WATCH, arg("@introduceDomain", "intro")))
    assert next_event(xs) == ("@introduceDomain", "intro")
    ok(xs.request(WATCH, arg("@releaseDomain", "rel")))
    assert next_event(xs) == ("@releaseDomain", "rel")
    assert value(toolstack.request(GET_DOMAIN_PATH, arg("7"))) == b"/local/domain/7\0"
    assert value(toolstack.request(IS_DOMAIN_INTRODUCED, arg("7"))) == b"F\0"
    ok(toolstack.request(INTRODUCE, arg("7", "100", "5")))
    assert next_event(xs) == ("@introduceDomain", "intro")
    assert value(toolstack.request(IS_DOMAIN_INTRODUCED, arg("7"))) == b"T\0"
    ok(toolstack.request(RELEASE, arg("7")))
    assert next_event(xs) == ("@releaseDomain", "rel")
    assert value(toolstack.request(IS_DOMAIN_INTRODUCED, arg("7"))) == b"F\0"
    assert toolstack.request(RELEASE, arg("7")).error == "ENOENT"


def test_reset_watches(connect: Connect) -> None:
    xs, writer = connect(), connect()
    ok(xs.request(WATCH, arg("/rw", "t")))
    assert next_event(xs) == ("/rw", "t")
    ok(xs.request(RESET_WATCHES, b"\0"))
    ok(write(writer, "/rw/x", "1"))
    assert no_event(xs)
    ok(xs.request(WATCH, arg("/rw", "t")))  # the old registration is gone: no EEXIST
    assert next_event(xs) == ("/rw", "t")


# -- transactions ------------------------------------------------------------------------------


def test_transaction_isolation(connect: Connect) -> None:
    xs, other = connect(), connect()
    tx = start_tx(xs)
    ok(write(xs, "/iso/a", "1", tx))
    assert value(xs.request(READ, arg("/iso/a"), tx)) == b"1"  # own writes visible inside
    assert other.request(READ, arg("/iso/a")).error == "ENOENT"  # invisible outside
    assert xs.request(READ, arg("/iso/a")).error == "ENOENT"  # also to the same connection outside tx
    ok(xs.request(TRANSACTION_END, b"T\0", tx))
    assert value(other.request(READ, arg("/iso/a"))) == b"1"


def test_transactions_read_current_state_until_first_access(connect: Connect) -> None:
    """Not a snapshot: a node first read after another client changed it shows the new value,
    and the commit succeeds (generations are recorded at first access). Measured on C 4.17."""
    xs, other = connect(), connect()
    ok(write(xs, "/tv/a", "old"))
    tx = start_tx(xs)
    ok(write(other, "/tv/b", "new"))
    ok(write(other, "/tv/a", "new"))
    assert value(xs.request(READ, arg("/tv/b"), tx)) == b"new"
    assert value(xs.request(READ, arg("/tv/a"), tx)) == b"new"
    assert children(xs.request(DIRECTORY, arg("/tv"), tx)) == ["a", "b"]
    ok(xs.request(TRANSACTION_END, b"T\0", tx))


@pytest.mark.parametrize(
    ("setup", "ours", "theirs", "outcome"),
    [
        # we saw a node missing, they created it
        ([], (READ, "/t1/x"), (WRITE, b"/t1/x\0v"), "EAGAIN"),
        # we listed a directory, they added a child
        ([(MKDIR, b"/t2\0")], (DIRECTORY, "/t2"), (WRITE, b"/t2/x\0v"), "EAGAIN"),
        # we listed a directory, they changed a child's value: the list did not change
        ([(WRITE, b"/t3/x\0v")], (DIRECTORY, "/t3"), (WRITE, b"/t3/x\0w"), "OK"),
        # we read a node, they changed its permissions
        ([(WRITE, b"/t4\0v")], (READ, "/t4"), (SET_PERMS, b"/t4\0n0\0r3\0"), "EAGAIN"),
        # they rewrote the same value: still a change
        ([(WRITE, b"/t5\0v")], (READ, "/t5"), (WRITE, b"/t5\0v"), "EAGAIN"),
        # they removed the parent of what we are creating
        ([(WRITE, b"/t6/a\0v")], (WRITE, "/t6/a/b"), (RM, b"/t6\0"), "EAGAIN"),
    ],
    ids=["read-missing", "ls-then-create", "ls-then-value", "perms", "same-value", "rm-parent"],
)
def test_more_conflicts(
    connect: Connect,
    setup: list[tuple[int, bytes]],
    ours: tuple[int, str],
    theirs: tuple[int, bytes],
    outcome: str,
) -> None:
    xs, other = connect(), connect()
    for op, payload in setup:
        assert xs.request(op, payload).error is None
    tx = start_tx(xs)
    op, path = ours
    payload = path.encode() + b"\0" + (b"v" if op == WRITE else b"")
    assert xs.request(op, payload, tx).error in (None, "ENOENT")
    ok(write(xs, "/unrelated", "x", tx))
    assert other.request(*theirs).error is None
    assert (xs.request(TRANSACTION_END, b"T\0", tx).error or "OK") == outcome


def _read_x(xs: RawConnection, tx: int) -> None:
    value(xs.request(READ, arg("/c/x"), tx))


def _write_x(xs: RawConnection, tx: int) -> None:
    ok(write(xs, "/c/x", "ours", tx))


def _create_child(xs: RawConnection, tx: int) -> None:
    ok(write(xs, "/c/p/ours", "1", tx))


@pytest.mark.parametrize(
    ("ours", "theirs", "outcome"),
    [
        (_read_x, "/c/x", "EAGAIN"),  # they wrote what we read
        (_write_x, "/c/x", "EAGAIN"),  # they wrote what we wrote
        (_write_x, "/c/elsewhere", "OK"),  # unrelated node
        # A different child of P appears while we create a child of P: the parent's child list
        # changed. This is the row that makes a block script's retry loop mandatory.
        (_create_child, "/c/p/theirs", "EAGAIN"),
    ],
    ids=["read-vs-write", "write-vs-write", "unrelated", "sibling-create"],
)
def test_conflict_matrix(
    connect: Connect, ours: Callable[[RawConnection, int], None], theirs: str, outcome: str
) -> None:
    """xenstore-for-tests.md §1.6, measured on C xenstored (per-node generation counts)."""
    xs, other = connect(), connect()
    ok(write(xs, "/c/x", "0"))
    ok(xs.request(MKDIR, arg("/c/p")))
    tx = start_tx(xs)
    ours(xs, tx)
    ok(write(other, theirs, "theirs"))
    reply = xs.request(TRANSACTION_END, b"T\0", tx)
    assert (reply.error or "OK") == outcome


def test_failed_commit_applies_nothing(connect: Connect) -> None:
    xs, other = connect(), connect()
    ok(write(xs, "/fc/x", "0"))
    tx = start_tx(xs)
    value(xs.request(READ, arg("/fc/x"), tx))
    ok(write(xs, "/fc/mine", "1", tx))
    ok(write(other, "/fc/x", "2"))
    assert xs.request(TRANSACTION_END, b"T\0", tx).error == "EAGAIN"
    assert xs.request(READ, arg("/fc/mine")).error == "ENOENT"
    assert xs.request(READ, arg("/fc/x"), tx).error == "ENOENT"  # the id is gone


def test_transaction_ids(connect: Connect) -> None:
    xs, other = connect(), connect()
    assert xs.request(READ, arg("/"), 999).error == "ENOENT"  # unknown id
    tx = start_tx(xs)
    assert other.request(TRANSACTION_END, b"T\0", tx).error == "ENOENT"  # another connection's id
    assert xs.request(TRANSACTION_END, b"T\0", tx + 1000).error == "ENOENT"
    assert xs.request(TRANSACTION_END, b"X\0", tx).error == "EINVAL"
    ok(xs.request(TRANSACTION_END, b"F\0", tx))
    # dom0 is exempt from the transaction quota (10 for guests)
    ids = [start_tx(xs) for _ in range(12)]
    assert len(set(ids)) == 12
    for i in ids:
        ok(xs.request(TRANSACTION_END, b"F\0", i))


def test_replies_echo_request_and_transaction_ids(xs: RawConnection) -> None:
    req = xs.send(READ, arg("/"), tx_id=0, req_id=0xDEADBEEF)
    reply = xs.recv()
    assert (reply.req_id, reply.tx_id) == (req, 0)
    tx = start_tx(xs)
    xs.send(READ, arg("/no/such"), tx_id=tx, req_id=77)
    reply = xs.recv()
    assert (reply.error, reply.req_id, reply.tx_id) == ("ENOENT", 77, tx)  # errors too


def test_big_directory_needs_directory_part(xs: RawConnection) -> None:
    names = [f"n{k:03d}" + "x" * 40 for k in range(120)]  # 5400 bytes of names > 4096
    for name in names:
        ok(write(xs, f"/bd/{name}", "v"))
    assert xs.request(DIRECTORY, arg("/bd")).error == "E2BIG"
    listed: list[str] = []
    generation = None
    while True:
        offset = sum(len(n) + 1 for n in listed)
        payload = value(xs.request(DIRECTORY_PART, arg("/bd", str(offset))))
        gen, rest = payload.split(b"\0", 1)
        assert generation in (None, gen), "the directory did not change: same generation"
        generation = gen
        chunk = rest.split(b"\0")
        listed += [c.decode() for c in chunk if c]
        if rest.endswith(b"\0\0") or rest == b"\0":
            break
        assert len(payload) <= 4096
    assert listed == names


def test_directory_part(xs: RawConnection) -> None:
    ok(write(xs, "/dp/a", "1"))
    ok(write(xs, "/dp/b", "2"))
    payload = value(xs.request(DIRECTORY_PART, arg("/dp", "0")))
    # "<generation>\0<child>\0...\0\0": the generation is daemon-specific, the names are not
    generation, rest = payload.split(b"\0", 1)
    assert generation.isdigit()
    assert rest.endswith(b"\0\0")
    assert sorted(rest.rstrip(b"\0").decode().split("\0")) == ["a", "b"]
