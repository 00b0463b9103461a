"""Embedded xenstored as a process: framing errors, slow clients, sockets, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from bench.common import process_cpu
from tests.fixtures.xenstore import ERROR, REPO, EmbeddedXenstored, RawClient

READ, WATCH, TX_START, WRITE, MKDIR = 2, 4, 6, 11, 12


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xsd-t-", dir="/tmp")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def alive(daemon: EmbeddedXenstored) -> bool:
    with RawClient(daemon.socket_path) as c:
        return c.call(READ, b"/tool/xenstored").payload == b""


@pytest.mark.parametrize("msg_type", [15, 16, 20, 23, 26, 1000, 2**32 - 1])
def test_unknown_and_server_only_types_get_enosys(
    xenstored_session: EmbeddedXenstored, msg_type: int
) -> None:
    with RawClient(xenstored_session.socket_path) as c:
        req_id = c.send(msg_type, b"/x\0", tx_id=77, req_id=4242)
        reply = c.reply()
        assert (reply.type, reply.req_id, reply.tx_id, reply.payload) == (ERROR, req_id, 77, b"ENOSYS\0")


def test_oversize_length_closes_only_that_connection(xenstored_session: EmbeddedXenstored) -> None:
    with (
        RawClient(xenstored_session.socket_path) as bystander,
        RawClient(xenstored_session.socket_path) as bad,
    ):
        bad.send_raw(WRITE.to_bytes(4, "little") + bytes(8) + (4097).to_bytes(4, "little") + b"/x\0v")
        assert bad.recv_msg() is None  # closed, nothing written
        assert bystander.call(READ, b"/x").payload == b"ENOENT\0"
    assert alive(xenstored_session)


def test_payload_of_exactly_4096_is_accepted(xenstored_session: EmbeddedXenstored) -> None:
    with RawClient(xenstored_session.socket_path) as c:
        path = b"/max-payload"
        value = b"v" * (4096 - len(path) - 1)
        assert c.call(WRITE, raw=path + b"\0" + value).payload == b"OK\0"
        assert c.call(READ, path).payload == value


def test_requests_split_anywhere_and_pipelined(xenstored_session: EmbeddedXenstored) -> None:
    with RawClient(xenstored_session.socket_path) as c:
        msgs = b"".join(
            (WRITE).to_bytes(4, "little")
            + i.to_bytes(4, "little")
            + bytes(4)
            + len(p).to_bytes(4, "little")
            + p
            for i, p in enumerate([b"/split/a\0one", b"/split/b\0two"], start=1)
        )
        msgs += READ.to_bytes(4, "little") + (3).to_bytes(4, "little") + bytes(4) + (9).to_bytes(4, "little")
        msgs += b"/split/b\0"
        for i in range(0, len(msgs), 3):  # three bytes at a time, headers included
            c.send_raw(msgs[i : i + 3])
            time.sleep(0.001)
        replies = [c.reply() for _ in range(3)]
        assert [(r.req_id, r.payload) for r in replies] == [(1, b"OK\0"), (2, b"OK\0"), (3, b"two")]


def test_truncated_header_then_disconnect(xenstored_session: EmbeddedXenstored) -> None:
    for partial in (b"\x0b", b"\x0b\0\0\0\x01\0\0\0\0\0\0\0", b"\x0b" + bytes(11) + b"\x10\0\0\0/half"):
        with RawClient(xenstored_session.socket_path) as c:
            c.send_raw(partial)
    assert alive(xenstored_session)
    with RawClient(xenstored_session.socket_path) as c:
        assert c.call(READ, b"/half").payload == b"ENOENT\0"


def test_slow_reader_does_not_stall_others(xenstored: EmbeddedXenstored) -> None:
    """A watcher that never reads gets its events queued; writers and readers carry on."""
    sleeper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.connect(xenstored.socket_path)
    try:
        token = b"t" * 2000  # big events: a few hundred overflow any socket buffer
        payload = b"/flood\0" + token + b"\0"
        sleeper.sendall(WATCH.to_bytes(4, "little") + bytes(8) + len(payload).to_bytes(4, "little") + payload)
        with RawClient(xenstored.socket_path) as writer, RawClient(xenstored.socket_path) as reader:
            start = time.monotonic()
            for i in range(1000):  # ~2 MB of events for the sleeper
                assert writer.call(WRITE, raw=f"/flood/node-{i:05d}\0x".encode()).payload == b"OK\0"
            worst = 0.0
            for _ in range(50):
                t = time.monotonic()
                assert reader.call(READ, b"/flood/node-00999").payload == b"x"
                worst = max(worst, time.monotonic() - t)
            assert time.monotonic() - start < 30
            assert worst < 1.0
        # The sleeper finally reads: everything arrives, in order.
        sleeper.settimeout(10)
        with RawClient.adopt(sleeper) as late:
            ack = late.reply()
            assert ack.payload == b"OK\0"
            first = late.next_event()
            assert first.strings == [b"/flood", token]
            got = [late.next_event().strings for _ in range(1000)]
            assert got == [[f"/flood/node-{i:05d}".encode(), token] for i in range(1000)]
    finally:
        sleeper.close()


def test_client_that_never_reads_replies_is_throttled_not_fatal(xenstored: EmbeddedXenstored) -> None:
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.setblocking(False)
    hog.connect(xenstored.socket_path)
    request = READ.to_bytes(4, "little") + bytes(8) + (16).to_bytes(4, "little") + b"/tool/xenstored\0"
    sent = 0
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                sent += hog.send(request * 256)
            except BlockingIOError:
                break  # the daemon stopped reading us: backpressure works
        assert time.monotonic() < deadline, "daemon kept reading a client that never reads"
        assert alive(xenstored)
    finally:
        hog.close()
    assert alive(xenstored)


def closed_after_at_most_one_message(c: RawClient) -> bool:
    """The daemon hung up (a reset counts: it may not have read our last bytes before exiting)."""
    try:
        return c.recv_msg() is None or c.recv_msg() is None  # a queued event, then EOF
    except ConnectionResetError:
        return True


def _run_daemon(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "xenblockctl", "xenstored", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _ready(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    return proc.stdout.readline()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_busy_clients_stops_cleanly(short_dir: str, signum: int) -> None:
    sock, dom = os.path.join(short_dir, "s"), os.path.join(short_dir, "d3")
    proc = _run_daemon("--socket", sock, "--domain-socket", f"3:{dom}")
    try:
        assert _ready(proc) == f"xenstored ready socket={sock} domain-socket=3:{dom}\n".encode()
        clients = [RawClient(sock), RawClient(sock), RawClient(dom)]
        clients[0].call(TX_START, b"")
        clients[0].call(WRITE, raw=b"/pending\0x", tx_id=1)
        clients[1].call(WATCH, b"/", b"all")
        clients[2].send_raw(b"\x02\0\0")  # half a header
        proc.send_signal(signum)
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else b""
        assert not os.path.exists(sock)
        assert not os.path.exists(dom)
        for c in clients:
            assert closed_after_at_most_one_message(c)
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_stale_socket_is_replaced_and_live_one_refused(short_dir: str) -> None:
    path = os.path.join(short_dir, "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    proc = _run_daemon("--socket", path)
    try:
        assert _ready(proc).startswith(b"xenstored ready")
        second = _run_daemon("--socket", path)
        out, err = second.communicate(timeout=10)
        assert second.returncode == 1
        assert out == b""
        assert b"xenstored-socket-busy" in err
        with RawClient(path) as c:  # the first daemon still owns and serves it
            assert c.call(READ, b"/tool").payload == b""
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    assert not os.path.exists(path)


def test_bad_socket_paths_are_coded_errors(short_dir: str) -> None:
    regular = os.path.join(short_dir, "file")
    with open(regular, "w") as f:
        f.write("not a socket")
    for path in (regular, "/tmp/" + "x" * 120, os.path.join(short_dir, "missing-dir", "s")):
        result = subprocess.run(
            [sys.executable, "-m", "xenblockctl", "xenstored", "--socket", path],
            cwd=REPO,
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 1, result
        assert result.stdout == b""
        assert result.stderr.startswith(b"xenblockctl: xenstored-socket-path: "), result.stderr
    with open(regular) as f:
        assert f.read() == "not a socket"


def test_ready_fd_and_socket_mode(short_dir: str) -> None:
    path = os.path.join(short_dir, "s")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenblockctl", "xenstored", "--socket", path, "--ready-fd", str(w)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        pass_fds=(w,),
    )
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            assert ready.readline() == f"xenstored ready socket={path}\n".encode()
            assert ready.read() == b""  # the daemon closed its end
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_out_of_file_descriptors_neither_spins_nor_dies(short_dir: str) -> None:
    path = os.path.join(short_dir, "s")
    limit = 24  # the daemon cannot raise a hard limit: it runs out after ~15 clients

    # Lower the hard limit in a tiny exec wrapper, so the daemon cannot raise it back.
    wrapper = (
        "import os, resource, sys; n = int(sys.argv[1]); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.executable, sys.argv[2:])"
    )
    argv = [sys.executable, "-m", "xenblockctl", "xenstored", "--socket", path]
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, str(limit), *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    clients: list[socket.socket] = []
    try:
        assert _ready(proc).startswith(b"xenstored ready")
        for _ in range(limit + 8):  # more than it can accept; the rest wait in the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(path)
            clients.append(s)
        time.sleep(0.3)
        before = process_cpu(proc.pid)
        time.sleep(1.0)
        assert process_cpu(proc.pid) - before < 0.5, "daemon spins on accept() at EMFILE"
        for s in clients:
            s.close()
        clients.clear()
        deadline = time.monotonic() + 10
        while True:  # once descriptors are free again it accepts and serves
            try:
                with RawClient(path, timeout=2) as c:
                    assert c.call(READ, b"/tool").payload == b""
                    break
            except (OSError, ConnectionError):
                assert time.monotonic() < deadline, "daemon never recovered from EMFILE"
                time.sleep(0.1)
        assert proc.poll() is None
    finally:
        for s in clients:
            s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        if proc.stdout:
            proc.stdout.close()


def test_trace_file_records_messages_both_ways(xenstored: EmbeddedXenstored) -> None:
    with RawClient(xenstored.socket_path) as c:
        c.call(WRITE, raw=b"/traced\0value")
        c.call(READ, b"/missing-node")
    with open(xenstored.trace_path) as f:
        lines = f.read().splitlines()
    assert any(line.endswith(" WRITE (/traced value)") and line.startswith("IN ") for line in lines)
    assert any(line.endswith(" WRITE (OK )") and line.startswith("OUT ") for line in lines)
    assert any(line.endswith(" ERROR (ENOENT )") for line in lines)


@pytest.mark.parametrize("spec", ["5", "x:/tmp/s", "32752:/tmp/s", "5:"])
def test_bad_domain_socket_spec_is_a_usage_error(spec: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenblockctl",
            "xenstored",
            "--socket",
            "/tmp/unused",
            f"--domain-socket={spec}",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert b"Invalid value for '--domain-socket'" in result.stderr
    assert not os.path.exists("/tmp/unused")


def test_exit_with_parent_stops_an_orphaned_daemon(short_dir: str) -> None:
    """A killed test runner never runs its finalisers: the daemon must go away by itself."""
    path = os.path.join(short_dir, "s")
    launcher = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'xenblockctl', 'xenstored', '--socket', sys.argv[1],"
        " '--exit-with-parent'], stdout=subprocess.PIPE)\n"
        "print(p.pid, p.stdout.readline().decode().strip(), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher, path], cwd=REPO, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    line = parent.stdout.readline().decode().split(" ", 1)
    daemon_pid = int(line[0])
    try:
        assert line[1].startswith("xenstored ready")
        assert alive(EmbeddedXenstored(path, {}, daemon_pid, ""))
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _is_our_daemon(daemon_pid, path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _is_our_daemon(daemon_pid, path), "the orphaned daemon is still running"
        assert not os.path.exists(path), "the orphaned daemon left its socket behind"
    finally:
        parent.stdout.close()
        if _is_our_daemon(daemon_pid, path):  # only if the test failed: never leave it running
            os.kill(daemon_pid, signal.SIGKILL)


def _is_our_daemon(pid: int, socket_path: str) -> bool:
    """Alive (not a zombie) and still the daemon this test started (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if socket_path.encode() not in f.read().split(b"\0"):
                return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
