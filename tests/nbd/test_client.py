"""Our NBD client against real servers on unix sockets (and 127.0.0.1 where TCP matters).

Data written through our client is read back through another client (libnbd's nbdcopy) or from
the image file; faults come from real servers (nbdkit's error/pause filters, a killed server, a
socket that is no NBD server). Every connection is bounded by a timeout, so nothing hangs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.nbd import NbdServer, NbdServerFactory
from xenblockctl.nbd import client, proto, uri
from xenblockctl.nbd.errors import NbdError

MiB = 1 << 20


def read_back(server: NbdServer, offset: int, length: int) -> bytes:
    """The export's bytes through libnbd's nbdcopy: a second, independent client."""
    nbdcopy = shutil.which("nbdcopy")
    if nbdcopy is None:
        pytest.skip("nbdcopy not installed (Debian package libnbd-bin)")
    out = subprocess.run([nbdcopy, server.uri, "-"], capture_output=True, timeout=60, check=True)
    return out.stdout[offset : offset + length]


def start(nbd_server: NbdServerFactory, kind: str, tmp_path: Path) -> NbdServer:
    if kind == "nbdkit":
        image = tmp_path / "kit.raw"
        with open(image, "wb") as f:
            f.truncate(16 * MiB)
        server = nbd_server("nbdkit", extra=["file", f"file={image}"])
        server.image = image
        return server
    if kind.endswith("qcow2"):
        return nbd_server(kind.removesuffix("-qcow2"), fmt="qcow2")
    return nbd_server(kind)


KINDS = ["nbdkit", "qemu-nbd", "qemu-nbd-qcow2", "qsd", "qsd-qcow2"]


@pytest.mark.parametrize("kind", KINDS)
def test_handshake_write_flush_trim_read_back(
    nbd_server: NbdServerFactory, kind: str, tmp_path: Path
) -> None:
    server = start(nbd_server, kind, tmp_path)
    data = os.urandom(64 * 1024)
    with client.NbdClient.connect(uri.parse(server.uri), timeout=5) as c:
        assert c.info.size == 16 * MiB
        assert c.info.has(proto.TFLAG_SEND_FLUSH)
        assert c.info.min_block <= 512
        c.write(3 * MiB + 512, data)
        c.write(5 * MiB, b"\xaa" * 4096, fua=c.info.has(proto.TFLAG_SEND_FUA))
        c.flush()
        assert c.read(3 * MiB + 512, len(data)) == data
        if c.info.has(proto.TFLAG_SEND_TRIM):
            c.trim(8 * MiB, MiB)
    assert read_back(server, 3 * MiB + 512, len(data)) == data
    assert read_back(server, 5 * MiB, 4096) == b"\xaa" * 4096
    if server.image is not None and not kind.endswith("qcow2"):
        with open(server.image, "rb") as f:
            f.seek(3 * MiB + 512)
            assert f.read(len(data)) == data


def test_read_only_export_refuses_writes_before_sending(nbd_server: NbdServerFactory, tmp_path: Path) -> None:
    server = start(nbd_server, "nbdkit", tmp_path)
    ro = nbd_server("nbdkit", extra=["-r", "file", f"file={server.image}"])
    with client.NbdClient.connect(uri.parse(ro.uri), timeout=5) as c:
        assert c.info.read_only
        with pytest.raises(NbdError, match="read-only") as info:
            c.write(0, b"x" * 512)
        assert info.value.code == "nbd-io"
        with pytest.raises(NbdError, match="TRIM"):
            c.trim(0, 512)
        assert c.read(0, 512) == b"\0" * 512  # the connection is still in step


def test_unknown_export_is_refused_with_the_servers_reason(nbd_server: NbdServerFactory) -> None:
    server = nbd_server("qemu-nbd", export="disk")
    with pytest.raises(NbdError) as info:
        client.NbdClient.connect(uri.parse(f"nbd+unix:///nope?socket={server.socket_path}"), timeout=5)
    assert info.value.code == "nbd-export-refused"
    assert "'nope'" in str(info.value)


def test_size_zero_export_is_refused(nbd_server: NbdServerFactory) -> None:
    server = nbd_server("nbdkit", extra=["memory", "size=0"])
    with pytest.raises(NbdError) as info:
        client.NbdClient.connect(uri.parse(server.uri), timeout=5)
    assert info.value.code == "nbd-export-empty"


def test_export_needing_blocks_above_512_is_refused(nbd_server: NbdServerFactory) -> None:
    server = nbd_server(
        "nbdkit", extra=["--filter=blocksize-policy", "memory", "size=1M", "blocksize-minimum=4096"]
    )
    with pytest.raises(NbdError, match="4096-byte blocks") as info:
        client.NbdClient.connect(uri.parse(server.uri), timeout=5)
    assert info.value.code == "nbd-export-refused"


def test_unreachable_servers(tmp_path: Path) -> None:
    with pytest.raises(NbdError) as info:
        client.NbdClient.connect(uri.parse(f"nbd+unix:///d?socket={tmp_path}/missing.sock"), timeout=2)
    assert info.value.code == "nbd-unreachable"
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(NbdError) as info:
            client.NbdClient.connect(uri.parse(f"nbd://127.0.0.1:{port}/d"), timeout=2)
    assert info.value.code == "nbd-unreachable"


class _FakeServer:
    """A unix socket that answers each connection with `reply` and then holds it open: no NBD
    server, or one that stalls mid-handshake."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.reply = reply
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5)


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[[bytes], _FakeServer]]:
    made: list[_FakeServer] = []

    class Factory(_FakeServer):
        def __init__(self, reply: bytes) -> None:
            super().__init__(tmp_path / f"fake{len(made)}.sock", reply)
            made.append(self)

    yield Factory
    for server in made:
        server.close()


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n" + b"\0" * 8, "not an NBD server"),
        (proto.GREETING.pack(proto.NBDMAGIC, 0x00420281861253, 0), "oldstyle"),
        (proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, 0), "fixed newstyle"),
        (proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, 1), "no answer within"),  # stalls
        (
            proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, 1)
            + proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_INFO, 1 << 30),
            "option reply of 1073741824 bytes",  # never allocated
        ),
        (
            proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, 1)
            + proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_ACK, 0),
            "without NBD_INFO_EXPORT",
        ),
        (
            proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, 1)
            + proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_INFO, 12)
            + proto.INFO_EXPORT_BODY.pack(proto.INFO_EXPORT, 1 << 20, 0)
            + proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_ACK, 0),
            "lack NBD_FLAG_HAS_FLAGS",
        ),
        (
            proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, 1)
            + proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_INFO, 12)
            + proto.INFO_EXPORT_BODY.pack(proto.INFO_EXPORT, 1000, 1)
            + proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_ACK, 0),
            "whole number of 512-byte sectors",
        ),
        (
            proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, 1)
            + proto.OPTION_REPLY.pack(proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_ERR_TLS_REQD, 5)
            + b"\xffTLS\n",
            "requires TLS",
        ),
    ],
)
def test_broken_or_hostile_servers_get_coded_errors(
    fake_server: Callable[[bytes], _FakeServer], reply: bytes, match: str
) -> None:
    server = fake_server(reply)
    started = time.monotonic()
    with pytest.raises(NbdError, match=match) as info:
        client.NbdClient.connect(uri.parse(f"nbd+unix:///d?socket={server.sock.getsockname()}"), timeout=0.5)
    assert info.value.code in ("nbd-handshake", "nbd-export-refused", "nbd-export-empty")
    assert time.monotonic() - started < 5
    assert info.value.one_line().isprintable()


def test_error_replies_reach_the_caller(nbd_server: NbdServerFactory) -> None:
    server = nbd_server(
        "nbdkit", extra=["--filter=error", "memory", "size=1M", "error=EIO", "error-pread-rate=1"]
    )
    with client.NbdClient.connect(uri.parse(server.uri), timeout=5) as c:
        with pytest.raises(NbdError, match="READ 0\\+4096 failed: EIO") as info:
            c.read(0, 4096)
        assert info.value.code == "nbd-io"
        c.write(0, b"w" * 4096)  # writes are not failed by this filter: the connection is in step


def test_server_killed_mid_session_fails_the_next_request_at_once(
    nbd_server: NbdServerFactory, tmp_path: Path
) -> None:
    server = start(nbd_server, "qemu-nbd", tmp_path)
    with client.NbdClient.connect(uri.parse(server.uri), timeout=5) as c:
        c.write(0, b"a" * 4096)
        server.kill()
        started = time.monotonic()
        with pytest.raises(NbdError) as info:
            c.read(0, 4096)
        assert info.value.code == "nbd-io"
        assert time.monotonic() - started < 2


def test_stalled_server_times_out(nbd_server: NbdServerFactory) -> None:
    server = nbd_server("nbdkit", extra=["--filter=delay", "memory", "size=1M", "rdelay=30"])
    with client.NbdClient.connect(uri.parse(server.uri), timeout=0.5) as c:
        started = time.monotonic()
        with pytest.raises(NbdError, match="no answer within") as info:
            c.read(0, 512)
        assert info.value.code == "nbd-io"
        assert time.monotonic() - started < 3


def test_requests_beyond_the_export_are_refused_locally(nbd_server: NbdServerFactory) -> None:
    server = nbd_server("nbdkit", extra=["memory", "size=1M"])
    with client.NbdClient.connect(uri.parse(server.uri), timeout=5) as c:
        with pytest.raises(NbdError, match="beyond"):
            c.read(MiB - 512, 1024)
        assert c.read(MiB - 512, 512) == b"\0" * 512


def test_socket_identity_names_the_socket_file(nbd_server: NbdServerFactory, tmp_path: Path) -> None:
    server = start(nbd_server, "nbdkit", tmp_path)
    parsed = uri.parse(server.uri)
    st = os.stat(server.socket_path)
    assert client.socket_identity(parsed) == (st.st_dev, st.st_ino, st.st_ctime_ns)
    assert client.socket_identity(uri.parse("nbd://127.0.0.1/d")) is None
