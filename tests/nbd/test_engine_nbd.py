"""The engine's data plane serving NBD exports (backend/nbdio.py): a simulated guest on the local
transport, real NBD servers, data checked through an independent client or the image file.

Faults come from the real servers: nbdkit's delay, error and pause filters, a SIGKILLed
qemu-nbd for a lost connection, a restarted server of another size for a changed export. The
nbdkit log filter shows what reached the server and in which order.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

from tests.fixtures.backend import PairFactory, on_disk
from tests.fixtures.nbd import NbdServer, NbdServerFactory
from xenblockctl.backend import blkif
from xenblockctl.backend.io import DiscardMode
from xenblockctl.backend.nbdio import NbdTarget
from xenblockctl.nbd import client, proto, uri

MiB = 1 << 20


def nbd_target(server: NbdServer, *, writable: bool = True, **kw: float) -> NbdTarget:
    parsed = uri.parse(server.uri)
    with client.NbdClient.connect(parsed, timeout=5) as c:
        info = c.info
    return NbdTarget(parsed, info, writable, **kw)  # type: ignore[arg-type]


def kit_file(nbd_server: NbdServerFactory, tmp_path: Path, *extra: str, size: int = 16 * MiB) -> NbdServer:
    """nbdkit's file plugin on a fresh image; `extra`: `--filter=...` options and filter params."""
    image = tmp_path / f"kit{len(list(tmp_path.glob('kit*.raw')))}.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    filters = [e for e in extra if e.startswith("--")]
    params = [e for e in extra if not e.startswith("--")]
    server = nbd_server("nbdkit", extra=[*filters, "file", f"file={image}", *params])
    server.image = image
    return server


def logged_ops(log: Path) -> list[str]:
    """The commands the server saw, in the order it started them (nbdkit's log filter)."""
    ops = re.findall(r"connection=\d+ (\w+) id=\d+ \w*", log.read_text()) if log.exists() else []
    return [op for op in ops if op not in ("Connect", "Disconnect", "Ready", "Fork", "Preconnect")]


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=lambda a: a.protocol)
@pytest.mark.parametrize("persistent", [False, True], ids=["per-request", "persistent"])
def test_guest_io_lands_in_the_export(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path, abi: blkif.Abi, persistent: bool
) -> None:
    server = kit_file(nbd_server, tmp_path)
    target = nbd_target(server)
    assert target.sectors == 16 * MiB // 512
    pair = make_pair(abi=abi, target=target, persistent=persistent, data_pages=512, indirect_pages=8)
    fe = pair.frontend
    small = os.urandom(8 * 1024)
    big = os.urandom(1 * MiB)  # indirect: 256 segments
    assert fe.write(8, small) == blkif.RSP_OKAY
    assert fe.write(4096, big) == blkif.RSP_OKAY
    assert fe.flush() == blkif.RSP_OKAY
    assert fe.read(8, len(small)) == small
    assert fe.read(4096, len(big)) == big
    assert server.image is not None
    assert on_disk(server.image, 8 * 512, len(small)) == small
    assert on_disk(server.image, 4096 * 512, len(big)) == big
    assert pair.dataplane.stats.errors == 0


def test_requests_are_split_at_the_servers_maximum_payload(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    log = tmp_path / "nbdkit.log"
    server = kit_file(
        nbd_server,
        tmp_path,
        "--filter=log",
        "--filter=blocksize-policy",
        f"logfile={log}",
        "blocksize-maximum=65536",
    )
    target = nbd_target(server)
    assert target.info.max_payload == 65536
    pair = make_pair(target=target, data_pages=512, indirect_pages=8)
    data = os.urandom(MiB)
    assert pair.frontend.write(0, data) == blkif.RSP_OKAY
    assert pair.frontend.read(0, MiB) == data
    counts = [
        int(c, 16)
        for c in re.findall(r"Write id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)", log.read_text())
    ]
    assert len(counts) == 16
    assert max(counts) == 65536


def test_flush_with_data_orders_flush_write_flush_without_fua(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    # a FLUSH carrying data is REQ_PREFLUSH|REQ_FUA: the trailing flush may only be sent after the
    # write's reply (NBD may reorder requests in flight), so the log must show Write before it
    log = tmp_path / "nbdkit.log"
    image = tmp_path / "eval.raw"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    # nbdkit 1.32's fua filter has no mode that stops advertising FUA: the eval plugin (a file
    # through dd) states can_fua=none itself
    server = nbd_server(
        "nbdkit",
        extra=[
            "--filter=log",
            "eval",
            f"get_size=stat -L -c %s {image}",
            f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
            f"pwrite=dd of={image} seek=$4 conv=notrunc oflag=seek_bytes status=none",
            "can_write=exit 0",
            "can_flush=exit 0",
            "flush=exit 0",
            "can_fua=echo none",
            f"logfile={log}",
        ],
    )
    target = nbd_target(server)
    assert not target.info.has(proto.TFLAG_SEND_FUA)
    pair = make_pair(target=target)
    rid = pair.frontend.submit_write(16, b"J" * 4096, op=blkif.OP_FLUSH_DISKCACHE)
    (done,) = pair.frontend.collect(1).values()
    assert done.response.id == rid
    assert done.response.status == blkif.RSP_OKAY
    ops = logged_ops(log)
    assert ops[-2:] == ["Write", "Flush"], ops
    assert "Flush" in ops[:-2]  # the preflush


def test_flush_with_data_uses_fua_when_offered(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    log = tmp_path / "nbdkit.log"
    server = kit_file(nbd_server, tmp_path, "--filter=log", f"logfile={log}")
    pair = make_pair(target=nbd_target(server))
    assert pair.frontend.submit_write(16, b"F" * 4096, op=blkif.OP_FLUSH_DISKCACHE)
    (done,) = pair.frontend.collect(1).values()
    assert done.response.status == blkif.RSP_OKAY
    assert re.search(r"Write id=\d+ offset=0x2000 count=0x1000 fua=1", log.read_text())


def test_discard_becomes_trim_and_barriers_are_not_offered(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    log = tmp_path / "nbdkit.log"
    server = kit_file(nbd_server, tmp_path, "--filter=log", f"logfile={log}")
    target = nbd_target(server)
    assert target.discard is DiscardMode.NBD_TRIM
    limits = target.limits()
    assert limits.barrier is False
    assert limits.flush is True
    pair = make_pair(target=target)
    assert pair.frontend.discard(2048, 2048) == blkif.RSP_OKAY
    assert re.search(r"Trim id=\d+ offset=0x100000 count=0x100000", log.read_text())
    rid = pair.frontend.submit_write(0, b"b" * 4096, op=blkif.OP_WRITE_BARRIER)
    (done,) = pair.frontend.collect(1).values()
    assert done.response.id == rid
    assert done.response.status != blkif.RSP_OKAY  # refused by validation: never advertised


def test_read_only_export_refuses_writes(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    rw = kit_file(nbd_server, tmp_path)
    ro = nbd_server("nbdkit", extra=["-r", "file", f"file={rw.image}"])
    target = nbd_target(ro)
    assert target.read_only
    assert target.discard is DiscardMode.NONE
    pair = make_pair(target=target)
    assert pair.frontend.write(0, b"x" * 512) == blkif.RSP_ERROR
    assert pair.frontend.read(0, 512) == b"\0" * 512


def test_lost_server_fails_io_then_the_unflushed_flush_then_recovers(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    server = nbd_server("qemu-nbd", export="disk")
    target = nbd_target(server, reconnect_interval=0.1)
    pair = make_pair(target=target)
    fe = pair.frontend
    assert fe.write(0, b"1" * 4096) == blkif.RSP_OKAY  # acknowledged, never flushed
    server.kill()
    started = time.monotonic()
    assert fe.write(8, b"2" * 4096) == blkif.RSP_ERROR  # never a silent success
    assert time.monotonic() - started < 5
    assert target.lost_writes
    # the same export comes back (same image, size and flags): the engine reconnects
    again = nbd_server("qemu-nbd", export="disk", image=server.image)
    assert again.socket_path != server.socket_path
    os.replace(again.socket_path, server.socket_path)
    time.sleep(0.2)
    assert fe.flush() == blkif.RSP_ERROR, "a flush after lost unflushed writes must fail"
    assert fe.flush() == blkif.RSP_OKAY  # reported once; the guest knows
    assert fe.write(16, b"3" * 4096) == blkif.RSP_OKAY
    assert fe.read(16, 4096) == b"3" * 4096


def test_reconnect_to_another_export_is_refused_for_good(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    server = nbd_server("qemu-nbd", export="disk")
    target = nbd_target(server, reconnect_interval=0.1)
    pair = make_pair(target=target)
    assert pair.frontend.read(0, 4096) == b"\0" * 4096
    server.kill()
    other = nbd_server("qemu-nbd", export="disk", size=32 * MiB)
    os.replace(other.socket_path, server.socket_path)
    time.sleep(0.2)
    for _ in range(3):
        with pytest.raises(Exception, match="read failed"):
            pair.frontend.read(0, 4096)
        time.sleep(0.15)
    assert target.refused is not None
    assert "size 33554432" in target.refused


def test_stalled_server_errors_within_the_deadline_and_others_carry_on(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    slow = nbd_server("nbdkit", extra=["--filter=delay", "memory", "size=16M", "wdelay=20"])
    stalled = make_pair(target=nbd_target(slow, request_timeout=1.0))
    healthy = make_pair()  # a local file disk on the same engine transport
    rid = stalled.frontend.submit_write(0, b"s" * 4096)
    stalled.frontend.kick()
    for i in range(5):  # the neighbour is served while the export stalls
        assert healthy.frontend.write(i * 8, b"h" * 4096) == blkif.RSP_OKAY
    started = time.monotonic()
    done = stalled.frontend.collect(1, timeout=10)
    assert done[rid].response.status == blkif.RSP_ERROR
    assert time.monotonic() - started < 5
    assert stalled.dataplane.executor.drain(5)


def test_server_error_replies_reach_the_guest_and_the_connection_carries_on(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    """nbdkit's error filter fails every read while its trigger file exists: the guest gets
    BLKIF_RSP_ERROR for exactly those reads (never zeros passed off as data), writes and a
    neighbour disk are untouched, and once the fault goes the same connection serves reads again."""
    trigger = tmp_path / "fail-reads"
    server = nbd_server(
        "nbdkit",
        extra=[
            "--filter=error",
            "memory",
            "size=16M",
            "error=EIO",
            "error-pread-rate=1",
            f"error-pread-file={trigger}",
        ],
    )
    target = nbd_target(server)
    pair = make_pair(target=target)
    neighbour = make_pair()
    fe = pair.frontend
    assert fe.write(0, b"e" * 4096) == blkif.RSP_OKAY
    trigger.touch()
    for _ in range(3):
        with pytest.raises(Exception, match="read failed"):
            fe.read(0, 4096)
        assert neighbour.frontend.write(0, b"n" * 4096) == blkif.RSP_OKAY
    assert fe.write(8, b"w" * 4096) == blkif.RSP_OKAY  # only reads are failed by the filter
    assert pair.dataplane.stats.errors == 3
    trigger.unlink()
    assert fe.read(0, 4096) == b"e" * 4096
    assert fe.read(8, 4096) == b"w" * 4096
    assert target.refused is None


def test_paused_server_costs_a_pause_then_errors_past_the_deadline(
    nbd_server: NbdServerFactory, make_pair: PairFactory, tmp_path: Path
) -> None:
    """nbdkit's pause filter holds requests: a pause shorter than the request deadline is only
    a pause for the guest; one longer fails the in-flight request within the deadline (never a
    hang), and when the server resumes the engine reconnects to the same export and serves on."""
    control = tmp_path / "pause.sock"
    server = nbd_server("nbdkit", extra=["--filter=pause", "memory", "size=16M", f"pause-control={control}"])
    target = nbd_target(server, request_timeout=1.5, reconnect_interval=0.1)
    pair = make_pair(target=target)
    fe = pair.frontend

    def say(command: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(control))
            s.sendall(command)
            assert s.recv(1) == command.upper()

    assert fe.write(0, b"p" * 4096) == blkif.RSP_OKAY
    say(b"p")
    rid = fe.submit_read(0, 4096)
    fe.kick()
    time.sleep(0.5)
    say(b"r")
    assert fe.collect(1, timeout=5)[rid].response.status == blkif.RSP_OKAY  # a pause, not an error

    say(b"p")
    started = time.monotonic()
    rid = fe.submit_read(0, 4096)
    fe.kick()
    assert fe.collect(1, timeout=10)[rid].response.status == blkif.RSP_ERROR
    assert time.monotonic() - started < 5
    say(b"r")
    deadline = time.monotonic() + 5
    while True:  # the reconnect is paced by reconnect_interval; the export is the same one
        try:
            assert fe.read(0, 4096) == b"p" * 4096
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert target.refused is None
