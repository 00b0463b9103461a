"""Differential tests: the same sessions on Debian's C xenstored and on ours, transcripts compared
byte for byte (replies, error names, watch events and their order, dedup included): four scripted
sessions, and hypothesis-generated sessions of two connections mixing node operations, permissions,
watches, transactions and domain introduction/release (1500 examples matched once by hand; 150
per run).

The C daemon is the oracle (tests/fixtures/cxenstored.py; skipped with its reason when it cannot
run). Deliberate deviations are kept out of the scripts and listed here:
- requests whose argument list is malformed in a way `onearg` rejects (no NUL, several strings,
  empty payload): the C daemon answers with a stale errno left over from an earlier request; we
  answer EINVAL;
- SET_PERMS on an unknown `@name`: same stale-errno path — and when the stale errno is 0 the C
  daemon 4.17.7 aborts (`consider_message: Assertion conn->in == NULL`); we answer EINVAL;
- DIRECTORY_PART's generation number (opaque; the counters start differently);
- CONTROL commands (ours: `help`, `fail-commits`, `drop-watching`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.cxenstored import Daemon
from tests.fixtures.xenstore import EmbeddedXenstored, RawClient

Transcript = list[tuple[str, object]]
Script = Callable[[str], Transcript]


def _drain(w: RawClient, out: Transcript, tag: str) -> None:
    """Events queued for `w` so far: both daemons answer requests in order, so every event
    caused before this round trip arrives before its reply (no timing involved)."""
    w.call(2, b"/")
    out.extend((tag, e.strings) for e in w.events)
    w.events.clear()


def script_requests(path: str) -> Transcript:
    """One request per line: odd arguments, limits, domain bookkeeping."""
    cases: list[tuple[int, bytes]] = [
        (11, b"/ex\0v"),
        (2, b"\0"),
        (11, b"/nonul"),
        (14, b"/ex\0"),
        (14, b"/ex\0r0"),
        (4, b"/ex\0"),
        (4, b"/ex\0t\0x\0"),
        (4, b"/ex\0t"),
        (6, b"junk"),
        (7, b"T"),
        (10, b"\0"),
        (10, b"-1\0"),
        (10, b"12abc\0"),
        (8, b"5\0\0"),
        (8, b"5\0\0-1\0"),
        (14, b"/ex\0r0x10\0"),
        (3, b"/ex\0"),
        (14, b"/ex\0r-1\0"),
        (14, b"/ex\0r 5\0"),
        (3, b"/ex\0"),
        (14, b"/ex\0n010\0b0\0"),
        (3, b"/ex\0"),
        (14, b"/ex\0n08\0"),
        (14, b"/ex\0x1\0"),
        (2, b"@introduceDomain\0"),
        (11, b"/\0x"),
        (2, b"/\0"),
        (12, b"/\0"),
        (13, b"/\0"),
        (19, b"5\0" + b"6\0"),
        (18, b"0\0"),
        (18, b"5\0"),
        (9, b"5\0"),
        (17, b"5\0"),
        (17, b"32752\0"),
        (5, b"/nope\0t\0"),
        (5, b"/no//pe\0t\0"),
        (4, b"rel\0t\0"),
        (5, b"/local/domain/0/rel\0t\0"),
        (14, b"@releaseDomain\0n0\0r5\0"),
        (1, b"/" + b"a" * 2047 + b"\0"),
        (1, b"/" + b"a" * 2048 + b"\0"),
        (1, b"/local/domain/1/" + b"a" * 2048 + b"\0"),
        (1, b"/local/domain/123456/" + b"a" * 2048 + b"\0"),
        (7, b"F\0"),
        (11, b"rel/a\0v"),
        (2, b"/local/domain/0/rel/a\0"),
        (13, b"/missing/child\0"),
        (13, b"/ex/missing\0"),
        (11, b"/bin\0\xff\x00\x01"),
        (2, b"/bin\0"),
        (1, b"/\0"),
        (15, b"x\0"),
        (16, b"x\0"),
        (20, b"x\0"),
        (23, b"x\0"),
        (21, b""),
    ]
    out: Transcript = []
    with RawClient(path) as c:
        for msg_type, payload in cases:
            reply = c.call(msg_type, raw=payload)
            out.append((f"{msg_type} {payload[:40]!r}", (reply.type, reply.payload)))
            out.extend(("event", e.strings) for e in c.events)
            c.events.clear()
    return out


def script_release_orphans(path: str) -> Transcript:
    out: Transcript = []
    with RawClient(path) as w, RawClient(path) as c:
        for node, token in (
            (b"/local/domain/5", b"h"),
            (b"@releaseDomain", b"r"),
            (b"/local/domain/5/d/x/y", b"deep"),
        ):
            out.append(("watch", w.call(4, node, token).payload))
        out.append(("intro", c.call(8, b"5", b"0", b"9").payload))
        out.append(("mkdir", c.call(12, b"/local/domain/5/d/x/y").payload))
        for node, perm in (
            (b"/local/domain/5/d", b"n5"),
            (b"/local/domain/5/d/x", b"n0"),
            (b"/local/domain/5/d/x/y", b"n5"),
        ):
            out.append(("perm", c.call(14, node, perm).payload))
        _drain(w, out, "before")
        out.append(("release", c.call(9, b"5").payload))
        _drain(w, out, "after")
        out.append(("introduced", c.call(17, b"5").payload))
        out.append(("ls", c.call(1, b"/local/domain/5").payload))
        out.append(("release again", c.call(9, b"5").payload))
    return out


def script_transactions(path: str) -> Transcript:
    out: Transcript = []
    with RawClient(path) as w, RawClient(path) as c, RawClient(path) as other:
        for node in (b"/t", b"/t/a/b", b"/t/z"):
            w.call(4, node, b"w" + node)
        for node in (b"/t/a/b/c", b"/t/y", b"/t/z"):
            c.call(11, raw=node + b"\0v")
        _drain(w, out, "setup")
        tx = int(c.call(6, b"").payload[:-1])
        steps: list[tuple[int, bytes]] = [
            (2, b"/t/z\0"),
            (11, b"/t/y\0v2"),
            (13, b"/t/a\0"),
            (11, b"/t/z\0v2"),
            (12, b"/t/n/m\0"),
            (1, b"/t\0"),
            (14, b"/t/y\0n0\0r3\0"),
            (13, b"/t/y\0"),
            (11, b"/t/y\0again"),
            (2, b"/t/a/b/c\0"),
        ]
        for msg_type, payload in steps:
            out.append((f"tx {msg_type} {payload!r}", c.call(msg_type, raw=payload, tx_id=tx).payload))
        out.append(("outside view", c.call(1, b"/t").payload))
        _drain(w, out, "before commit")
        out.append(("commit", c.call(7, b"T", tx_id=tx).payload))
        _drain(w, out, "commit")
        out.append(("perms y", c.call(3, b"/t/y").payload))
        out.append(("ls", c.call(1, b"/t").payload))
        tx = int(c.call(6, b"").payload[:-1])
        out.append(("rm n in tx", c.call(13, b"/t/n", tx_id=tx).payload))
        out.append(("outside write below", other.call(11, raw=b"/t/n/m/q\0x").payload))
        out.append(("commit", c.call(7, b"T", tx_id=tx).payload))
        _drain(w, out, "after")
        tx = int(c.call(6, b"").payload[:-1])
        out.append(("tx id", tx))
        out.append(("nested", c.call(6, b"", tx_id=tx).payload))
        out.append(("end F", c.call(7, b"F", tx_id=tx).payload))
        out.append(("end again", c.call(7, b"F", tx_id=tx).payload))
        out.append(("watch ignores tx", c.call(4, b"/t", b"x", tx_id=999).payload))
        out.append(("unwatch ignores tx", c.call(5, b"/t", b"x", tx_id=999).payload))
        out.append(("unknown tx", c.call(10, b"3", tx_id=999).payload))
        out.append(("reset", w.call(21, b"").payload))
        out.append(("write", c.call(11, raw=b"/t/q\0v").payload))
        _drain(w, out, "after reset")
    return out


def script_watch_rules(path: str) -> Transcript:
    out: Transcript = []
    with RawClient(path) as w, RawClient(path) as c:
        c.call(11, raw=b"/r/a/b/c\0v")
        for node, token in (
            (b"/r", b"root"),
            (b"/r/a/b/c", b"leaf"),
            (b"/r/a/never", b"never"),
            (b"r", b"rel"),
        ):
            out.append((f"watch {node!r}", w.call(4, node, token).payload))
            out.append(("first", w.next_event().strings))
        out.append(("dup", w.call(4, b"/r", b"root").payload))
        for msg_type, payload in ((11, b"/r/a\0x"), (12, b"/r/a\0"), (12, b"/r/new\0"), (13, b"/r/ghost\0")):
            out.append((f"{msg_type} {payload!r}", c.call(msg_type, raw=payload).payload))
            _drain(w, out, "ev")
        out.append(("rm", c.call(13, b"/r/a").payload))
        _drain(w, out, "rm")
        out.append(("unwatch", w.call(5, b"/r", b"root").payload))
        out.append(("write", c.call(11, raw=b"/r/z\0v").payload))
        _drain(w, out, "after unwatch")
        out.append(("relative", c.call(11, raw=b"/local/domain/0/r/x\0v").payload))
        _drain(w, out, "relative")
    return out


SCRIPTS = [script_requests, script_release_orphans, script_transactions, script_watch_rules]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__.removeprefix("script_"))
def test_same_transcript_as_the_c_daemon(
    cxenstored: Daemon, xenstored: EmbeddedXenstored, script: Script
) -> None:
    expected = script(str(cxenstored.socket))
    got = script(xenstored.socket_path)
    assert len(expected) > 5
    for i, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"step {i}: C daemon {want!r}, embedded {have!r}"
    assert len(got) == len(expected)


# Differential fuzzing: random well-formed sessions of two connections, on both daemons. -------

READ, WRITE, MKDIR, RM, DIRECTORY, GET_PERMS, SET_PERMS = 2, 11, 12, 13, 1, 3, 14
WATCH, UNWATCH, TX_START, TX_END = 4, 5, 6, 7

_SUFFIXES = ["", "/a", "/a/b", "/a/b/c", "/b", "/a/x-y", "/a//b", "/a/", "/a b"]
_PERMS = [b"n0", b"r0", b"b5", b"r7", b"w3", b"n5"]


_OPS = {
    "read": READ, "write": WRITE, "mkdir": MKDIR, "rm": RM, "ls": DIRECTORY, "getp": GET_PERMS,
    "setp": SET_PERMS, "watch": WATCH, "unwatch": UNWATCH, "start": TX_START, "commit": TX_END,
    "abort": TX_END, "dirpart": 22, "intro": 8, "release": 9, "isintro": 17,
}  # fmt: skip


@st.composite
def _session(draw: st.DrawFn) -> list[tuple[int, str, int, bytes]]:
    """(connection 0/1, op name, op, payload); BASE / REL stand for the example's directory,
    absolute or relative to the connection's home."""
    steps = []
    for _ in range(draw(st.integers(1, 25))):
        who = draw(st.integers(0, 1))
        op = draw(st.sampled_from(sorted(_OPS)))
        path = draw(st.sampled_from([b"BASE", b"REL"])) + draw(st.sampled_from(_SUFFIXES)).encode()
        if op == "write":
            payload = path + b"\0" + draw(st.sampled_from([b"", b"v", b"value\0with-nul"]))
        elif op == "setp":
            entries = draw(st.lists(st.sampled_from(_PERMS), min_size=1, max_size=3))
            payload = path + b"\0" + b"".join(e + b"\0" for e in entries)
        elif op in ("watch", "unwatch"):
            payload = path + b"\0" + draw(st.sampled_from([b"t1", b"t2"])) + b"\0"
        elif op in ("start", "commit", "abort"):
            payload = {"start": b"\0", "commit": b"T\0", "abort": b"F\0"}[op]
        elif op == "dirpart":
            payload = path + b"\0" + str(draw(st.integers(0, 6))).encode() + b"\0"
        elif op in ("intro", "release", "isintro"):
            domid = draw(st.sampled_from([b"5", b"7"]))
            payload = domid + b"\0" + (b"0\0" + b"1\0" if op == "intro" else b"")
        else:
            payload = path + b"\0"
        steps.append((who, op, _OPS[op], payload))
    return steps


def _run_session(path: str, rel: bytes, steps: list[tuple[int, str, int, bytes]]) -> Transcript:
    base = b"/local/domain/0/" + rel

    def mask(data: bytes) -> bytes:
        return data.replace(base, b"BASE").replace(rel, b"REL")

    out: Transcript = []
    clients = [RawClient(path), RawClient(path)]
    tx = [0, 0]
    try:
        clients[0].call(MKDIR, base)
        for who, op, number, payload in steps:
            c = clients[who]
            reply = c.call(number, raw=payload.replace(b"BASE", base).replace(b"REL", rel), tx_id=tx[who])
            text = mask(reply.payload)
            if op == "dirpart" and reply.type == 22:
                text = text.split(b"\0", 1)[1]  # the generation number is opaque
            out.append((f"{who} {op} {payload!r}", (reply.type, text)))
            if op == "start" and reply.type == TX_START:
                tx[who] = int(reply.payload.rstrip(b"\0"))
            elif op in ("commit", "abort"):
                tx[who] = 0
            for i, other in enumerate(clients):
                other.call(READ, b"/")  # everything caused so far arrives before this reply
                out.extend(
                    (f"event {i}", [s.replace(base, b"BASE") for s in e.strings]) for e in other.events
                )
                other.events.clear()
    finally:
        for c in clients:
            c.close()
    return out


@pytest.fixture(scope="module")
def both_daemons() -> Iterator[tuple[str, str]]:
    from tests.fixtures.cxenstored import Unavailable, find_tools, start_cxenstored
    from tests.fixtures.xenstore import _start

    try:
        tools = find_tools()
    except Unavailable as exc:
        pytest.skip(f"C xenstored unavailable: {exc}")
    c_daemon = start_cxenstored(tools)
    ours = _start()
    try:
        yield str(c_daemon.socket), ours.info.socket_path
    finally:
        c_daemon.stop()
        problems = ours.stop()
        assert not problems, problems


#: CI replays the same sessions every run (derandomized): a random search there kept finding a new,
#: unrelated quirk of the C daemon in one run out of many and failed CI for it. Exploring is a
#: deliberate act: XENBLOCKCTL_FUZZ=1 searches new sessions (and more of them); whatever it finds
#: becomes a fixed test below, matched or marked as a known difference.
FUZZ = os.environ.get("XENBLOCKCTL_FUZZ") == "1"


@settings(max_examples=2000 if FUZZ else 150, deadline=None, derandomize=not FUZZ, database=None)
@given(steps=_session())
def test_random_sessions_match_the_c_daemon(
    both_daemons: tuple[str, str], steps: list[tuple[int, str, int, bytes]]
) -> None:
    c_path, our_path = both_daemons
    rel = f"fz/{uuid.uuid4().hex[:12]}".encode()
    expected = _run_session(c_path, rel, steps)
    got = _run_session(our_path, rel, steps)
    for i, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert have == want, f"step {i}: C daemon {want!r}, embedded {have!r}"
    assert len(got) == len(expected)


@pytest.mark.parametrize("watched", [b"BASE", b"BASE/a"])
def test_a_node_created_and_removed_in_one_transaction_fires_nothing_at_commit(
    both_daemons: tuple[str, str], watched: bytes
) -> None:
    """Found by the random sessions above (a fresh-clone CI run): the C daemon sends a commit's
    event only to watchers who may read the node before or after the transaction, privileged ones
    included, so a node that existed at neither time (written, then removed with its parent,
    inside the transaction) fires nothing; the embedded daemon fired it to dom0's watches."""
    c_path, our_path = both_daemons
    steps = [
        (1, "start", _OPS["start"], b"\0"),
        (1, "write", _OPS["write"], b"BASE/a\0"),
        (1, "rm", _OPS["rm"], b"BASE\0"),
        (0, "watch", _OPS["watch"], watched + b"\0t1\0"),
        (1, "commit", _OPS["commit"], b"T\0"),
    ]
    rel = f"fz/{uuid.uuid4().hex[:12]}".encode()
    assert _run_session(our_path, rel, steps) == _run_session(c_path, rel, steps)


@pytest.mark.xfail(strict=True, reason="known difference: the C daemon answers EIO, the embedded daemon OK")
def test_rm_in_a_transaction_of_a_node_removed_outside_it(both_daemons: tuple[str, str]) -> None:
    """Found by a random session (not matched yet): a transaction lists BASE, another connection
    removes BASE, then the transaction removes BASE too. The C daemon 4.17 answers EIO (its
    transaction copy of BASE outlived the node); the embedded daemon answers OK, as for any
    removal of what is not there."""
    c_path, our_path = both_daemons
    steps = [
        (0, "start", _OPS["start"], b"\0"),
        (0, "dirpart", _OPS["dirpart"], b"BASE\x000\x00"),
        (1, "rm", _OPS["rm"], b"BASE\0"),
        (0, "rm", _OPS["rm"], b"BASE\0"),
    ]
    rel = f"fz/{uuid.uuid4().hex[:12]}".encode()
    assert _run_session(our_path, rel, steps) == _run_session(c_path, rel, steps)
