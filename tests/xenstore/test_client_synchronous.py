"""The synchronous link (what the block script uses) keeps its promises, seen from the kernel's
side with strace: a batch of requests leaves in one send(), replies are read by the calling thread
(no thread is ever started), and nothing of pyxs, socket or threading is imported."""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fixtures.cxenstored import Daemon
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreDisconnected
from xenblockctl.xenstore.synchronous import SPREAD_MIN
from xenblockctl.xenstore.wire import FrameDecoder, encode

ROOT = Path(__file__).resolve().parents[2]
STRACE = ["strace", "-f", "-e", "trace=clone,clone3,sendto,sendmsg,write"]
CLIENT = """
import sys
sys.path.insert(0, sys.argv[1])
from xenblockctl.xenstore.client import XenStore
with XenStore.connect(timeout=5, synchronous=True) as store:
    store.write_many({f"/sync/n{i}": str(i) for i in range(6)})
    print("MARK", flush=True)
    assert store.read_many([f"/sync/n{i}" for i in range(6)]) == [str(i) for i in range(6)]
    print("MARK", flush=True)
    store.watch("/sync", "tok")
    assert store.wait_watch(5) == ("/sync", "tok")
    store.unwatch("/sync", "tok")
loaded = [m for m in ("socket", "threading", "queue", "pyxs", "platform") if m in sys.modules]
print("LOADED", loaded, flush=True)
"""


def _strace(trace: Path, calls: str, client: str) -> subprocess.CompletedProcess[str]:
    """Run `client` (a -c program, given this checkout's root) under strace -f, tracing `calls`."""
    argv = ["strace", "-f", "-o", str(trace), "-e", f"trace={calls}", sys.executable, "-c", client, str(ROOT)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode:
        print(result.stderr)
    return result


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_one_send_per_batch_and_no_thread(daemon: Daemon, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    result = _strace(trace, "clone,clone3,sendto,sendmsg,write", CLIENT)
    assert "LOADED []" in result.stdout, result.stdout
    calls = trace.read_text().splitlines()
    assert not [c for c in calls if "clone" in c], "the synchronous link must not start a thread"
    # The socket's sends between the two MARK lines (stdout writes): the read_many batch of 6 READs.
    # (send() on a socket is the sendto syscall; the threaded link made 12 sends: header, payload.)
    marks = [i for i, c in enumerate(calls) if "MARK" in c]
    assert len(marks) == 2, calls
    between = [
        c for c in calls[marks[0] + 1 : marks[1]] if c.split(None, 1)[-1].startswith(("sendto", "sendmsg"))
    ]
    assert len(between) == 1, f"6 reads must leave in one send, saw {between}"


BATCH_CLIENT = """
import sys
sys.path.insert(0, sys.argv[1])
from xenblockctl.xenstore.client import XenStore
paths = [f"/batch/n{i}" for i in range(256)]
values = ["v" * (i % 9) for i in range(256)]
with XenStore.connect(timeout=5, synchronous=True) as store:
    for start in range(0, 256, 64):
        store.write_many(dict(zip(paths[start : start + 64], values[start : start + 64])))
    print("MARK", flush=True)
    assert store.read_many(paths) == values
    print("MARK", flush=True)
    assert store.read_many(paths[:63]) == values[:63]
    print("MARK", flush=True)
    store.write_many({p: "w" for p in paths[:100]})
    print("MARK", flush=True)
    with store.transaction() as tx:
        assert tx.read_many(paths[:100]) == ["w"] * 100
        print("MARK", flush=True)
    print("MARK", flush=True)
"""


def _phases(trace: Path) -> list[list[str]]:
    """The syscalls between consecutive MARK lines (stdout writes), without the pid column."""
    calls = trace.read_text().splitlines()
    marks = [i for i, c in enumerate(calls) if "MARK" in c]
    return [[c.split(None, 1)[-1] for c in calls[a + 1 : b]] for a, b in itertools.pairwise(marks)]


def _named(calls: list[str], *names: str) -> list[str]:
    return [c for c in calls if c.startswith(names)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_batch_of_replies_is_read_in_a_few_reads_without_polling(daemon: Daemon, tmp_path: Path) -> None:
    """The kernel holds each read until at least a header per outstanding reply is there
    (SO_RCVLOWAT), so a batch costs a handful of reads and no poll/select; before, every wake-up
    (one per reply or few, as the daemon wrote them) cost select + the socket timeout's poll +
    recv, ~50 of each for 256 replies. 256 reads go over up to 4 connections (opened for them and
    kept; a connect that meets C xenstored's full listen backlog is not waited for), 63 over one;
    writes and a transaction's reads never leave the first connection (bench/README.md, issue 18
    round 5)."""
    trace = tmp_path / "trace"
    assert _strace(trace, "network,poll,ppoll,select,pselect6,write", BATCH_CLIENT).returncode == 0
    phases = _phases(trace)
    assert len(phases) == 5, phases
    spread, one, writes, in_tx, _commit = phases
    for calls in phases:
        assert not _named(calls, "poll", "ppoll", "select", "pselect6"), calls
    # C xenstored's listen backlog of 1 may refuse the third connect (EAGAIN): not waited for
    connected = [c for c in _named(spread, "connect") if c.endswith("= 0")]
    assert 2 <= len(connected) <= 3, spread
    assert len(_named(spread, "sendto", "sendmsg")) == 1 + len(connected), spread
    # each read takes at least 16 bytes per reply still outstanding on its connection (replies are
    # 17-24 bytes), so the count falls by about two thirds per read, plus reads cut by the 50 ms check
    assert 4 <= len(_named(spread, "recvfrom", "recvmsg")) <= 24, spread
    assert len(_named(one, "sendto", "sendmsg")) == 1, one
    main = _named(one, "sendto", "sendmsg")[0].split(",")[0]  # "sendto(3"
    for calls in (one, writes, in_tx):
        assert not _named(calls, "connect"), calls
        sends = _named(calls, "sendto", "sendmsg")
        assert sends, calls
        assert all(c.split(",")[0] == main for c in sends), calls  # write_many is a transaction
        assert 1 <= len(_named(calls, "recvfrom", "recvmsg")) <= 8 * len(sends), calls


SHORT_WAIT_CLIENT = """
import sys
sys.path.insert(0, sys.argv[1])
from xenblockctl.xenstore.client import XenStore
with XenStore.connect(timeout=5, synchronous=True) as store:
    store.watch("/short", "tok")
    assert store.wait_watch(5) == ("/short", "tok")  # the watch's first event
    print("MARK", flush=True)
    for _ in range(5):
        assert store.wait_watch(0.001) is None
    print("MARK", flush=True)
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_short_wait_is_timed_by_select_not_by_the_socket(daemon: Daemon, tmp_path: Path) -> None:
    """The block script's hand-off polls blkback's sysfs node every 0.5-5 ms between watch waits.
    SO_RCVTIMEO counts whole jiffies (a 0.5 ms wait took 6-8 ms at HZ=250, adding ~6 ms to every
    kernel-blkback add), so a wait shorter than EXACT_WAIT is timed by select's exact timer."""
    trace = tmp_path / "trace"
    calls = "select,pselect6,poll,ppoll,setsockopt,write"
    assert _strace(trace, calls, SHORT_WAIT_CLIENT).returncode == 0
    (waits,) = _phases(trace)
    timed = _named(waits, "select", "pselect6", "poll", "ppoll")
    assert len(timed) >= 5, waits
    # a receive timeout may still be set once select said readable (CHECK_INTERVAL), never a short one
    for call in _named(waits, "setsockopt"):
        found = re.search(r"tv_sec=(\d+), tv_usec=(\d+)", call)
        if "SO_RCVTIMEO" in call and found:
            assert int(found[1]) * 1_000_000 + int(found[2]) >= 20_000, call


def _serve_spread(listener: socket.socket, failing: int) -> None:
    """Answer every READ on every connection, except that connection number `failing` (0-based,
    in accept order) is closed once it has sent a request."""
    accepted = 0

    def serve(conn: socket.socket, fail: bool) -> None:
        # the client drops every connection when one fails: a reset here is expected
        with conn, contextlib.suppress(OSError):
            decoder = FrameDecoder()
            while data := conn.recv(65536):
                frames = decoder.feed(data)
                if fail and frames:
                    return
                conn.sendall(
                    b"".join(encode(f.type, f.req_id, f.tx_id, f.payload.rstrip(b"\0")) for f in frames)
                )

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn, accepted == failing), daemon=True).start()
        accepted += 1


@pytest.mark.parametrize("failing", [0, 2])
def test_a_spread_batch_fails_as_one_connection(tmp_path: Path, failing: int) -> None:
    """A batch spread over connections whose first or one extra connection dies: the client sees
    one disconnected link (XenstoreDisconnected, and every later request too), never a partial
    result."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "socket")
    listener.bind(path)
    listener.listen(8)
    server = threading.Thread(target=_serve_spread, args=(listener, failing), daemon=True)
    server.start()
    try:
        with XenStore.connect(path, timeout=5, synchronous=True) as store:
            paths = [f"/spread/n{i}" for i in range(SPREAD_MIN)]
            with pytest.raises(XenstoreDisconnected):
                store.read_many(paths)
            with pytest.raises(XenstoreDisconnected):
                store.read(paths[0])
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        server.join(5)


def test_a_spread_batch_answers_like_one_connection(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "socket")
    listener.bind(path)
    listener.listen(8)
    server = threading.Thread(target=_serve_spread, args=(listener, -1), daemon=True)
    server.start()
    try:
        with XenStore.connect(path, timeout=5, synchronous=True) as store:
            paths = [f"/spread/n{i}" for i in range(200)]
            assert store.read_many(paths) == paths  # each READ answered with its own path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        server.join(5)
