"""An NBD export served by the engine itself, end to end: libxl-like toolstack, the real block
script, the real engine process over the local transport, a Python blkfront, a real nbdkit on a
unix socket (issue 17, consumer 1).

The script publishes the export's identity (owner record kind=nbd: URI, size, flags, socket
dev/inode) and no kernel device; the engine re-checks its own handshake against it before
`opened`=1 and refuses with the coded error node on any difference."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.engine import EngineProc, connect_guest, detach_guest, wait_for
from tests.fixtures.libxl import Backend, Libxl
from tests.fixtures.nbd import NbdServer, NbdServerFactory
from tests.flows.test_bad_input import assert_clean_failure
from tests.nbd.test_blockscript_nbd import _connections
from xenblockctl.blockscript.faults import ADD_POINTS
from xenblockctl.nbd import uri
from xenblockctl.nbd.client import NbdClient
from xenblockctl.toolstack.daemons import ReadyDaemon
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.identity import NbdOwnerRecord

pytestmark = [pytest.mark.root]
SIZE = 16 << 20
REPO = Path(__file__).resolve().parents[2]


def _file_server(nbd_server: NbdServerFactory, image: Path, socket_path: Path | None = None) -> NbdServer:
    """nbdkit's file plugin: admits a second client, so the data can be read back beside the engine."""
    return nbd_server("nbdkit", extra=["file", str(image)], socket_path=socket_path)


def _image(tmp_path: Path, name: str = "export.img", size: int = SIZE) -> Path:
    image = tmp_path / name
    with open(image, "wb") as f:
        f.truncate(size)
    return image


def _backend(libxl: Libxl, params: str, domid: int, mode: str = "w") -> Backend:
    """A backend as libxl makes it, once the engine has claimed it (`opened`=0 at InitWait)."""
    be = libxl.create_backend(domid, 51712, params, mode, engine=False)
    assert wait_for(lambda: libxl.nodes(be).get("opened") == "0", 10), libxl.nodes(be)
    return be


def test_guest_writes_reach_the_export(
    libxl: Libxl, engine: EngineProc, nbd_server: NbdServerFactory, tmp_path: Path
) -> None:
    server = _file_server(nbd_server, _image(tmp_path))
    be = _backend(libxl, server.uri, 5)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    nodes = libxl.nodes(be)
    assert nodes["hotplug-status"] == "connected"
    assert nodes["opened"] == "1"
    for absent in (identity.PHYSICAL_DEVICE, identity.LUID, identity.DISKSEQ, identity.DEVICE_PATH):
        assert absent not in nodes, f"{absent} published for an engine-served export"
    record = identity.parse_owner(nodes[identity.OWNER])
    assert isinstance(record, NbdOwnerRecord)
    st = server.socket_path.stat()
    assert record.uri == uri.parse(server.uri).canonical()
    assert (record.size, record.mode, record.socket) == (SIZE, "w", (st.st_dev, st.st_ino, st.st_ctime_ns))
    with NbdClient.connect(uri.parse(server.uri)) as other:
        assert record.flags == other.info.flags
    guest = connect_guest(libxl, engine.transport, be)
    assert libxl.nodes(be)["sectors"] == str(SIZE // 512)
    assert guest.ring is not None
    guest.ring.write(16, b"through the engine over NBD".ljust(4096, b"\0"))
    guest.ring.flush()
    assert guest.ring.read(16, 512)[:27] == b"through the engine over NBD"
    with NbdClient.connect(uri.parse(server.uri)) as other:
        assert other.read(16 * 512, 27) == b"through the engine over NBD"
    detach_guest(libxl, be, guest)
    left = libxl.nodes(be)
    assert identity.OWNER not in left, "remove withdrew the owner record"


@pytest.mark.parametrize("change", ["socket", "size"])
def test_export_swapped_before_the_engine_opens_is_refused(
    libxl: Libxl, engine: EngineProc, nbd_server: NbdServerFactory, tmp_path: Path, change: str
) -> None:
    """The server behind the socket is replaced after the script checked the export and before
    the engine connects: the engine's handshake differs from the record, so it refuses with the
    coded error node, and the script reports it and withdraws the record."""
    first = _file_server(nbd_server, _image(tmp_path, "first.img"))
    be = _backend(libxl, first.uri, 6)
    running = libxl.start("add", be, pause_at="add-target-open")  # probed, not yet published
    running.wait_paused()
    size = SIZE if change == "socket" else 2 * SIZE
    image = _image(tmp_path, "second.img", size)  # before the unlink: the socket may get its inode
    old = first.socket_path.stat()
    first.kill()
    first.socket_path.unlink()
    second = _file_server(nbd_server, image, socket_path=first.socket_path)
    new = first.socket_path.stat()
    reused = (old.st_dev, old.st_ino) == (new.st_dev, new.st_ino)  # usual on ext4 and tmpfs
    running.proc.send_signal(18)  # SIGCONT
    _out, err = running.proc.communicate(timeout=60)
    assert running.proc.returncode != 0, err
    nodes = libxl.nodes(be)
    assert "nbd-export-mismatch" in nodes["hotplug-error"], nodes
    assert "socket file" in nodes["hotplug-error"], f"inode re-used: {reused}"
    if change == "size":
        assert f"size {2 * SIZE}, published {SIZE}" in nodes["hotplug-error"]
    assert nodes["hotplug-status"] == "error"
    assert identity.OWNER not in nodes, "a refused export stays published"
    assert nodes.get("opened") != "1"
    error = libxl.store.read_optional("/local/domain/0/error/backend/vbd/6/51712/error")
    assert error is not None
    assert error.startswith("nbd-export-mismatch:"), error
    deadline = time.monotonic() + 10
    while "nbd-export-mismatch" not in engine.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "nbd-export-mismatch" in engine.log_path.read_text(), "the refusal is logged with its code"
    assert wait_for(lambda: _connections(second.proc.pid) == 0, 5), (
        "the refused export's connection stays open"
    )


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ("nbd+unix:///disk?socket=relative.sock", "nbd-uri-invalid"),
        ("nbds://127.0.0.1/disk", "nbd-uri-unsupported"),
        ("nbd+unix:///disk?socket=/nonexistent/x.sock", "nbd-unreachable"),
    ],
)
def test_bad_nbd_targets_for_the_engine_fail_cleanly(
    libxl: Libxl, engine: EngineProc, params: str, code: str
) -> None:
    be = _backend(libxl, params, 7)
    assert_clean_failure(libxl, be, libxl.run("add", be, XENBLOCKCTL_HANDOFF_TIMEOUT="1"), code)
    assert identity.OWNER not in libxl.nodes(be)


def test_read_only_export_refused_for_a_writable_disk(
    libxl: Libxl, engine: EngineProc, nbd_server: NbdServerFactory, tmp_path: Path
) -> None:
    image = _image(tmp_path)
    server = nbd_server("nbdkit", extra=["-r", "file", str(image)])
    be = _backend(libxl, server.uri, 8)
    assert_clean_failure(libxl, be, libxl.run("add", be), "target-type")


def test_second_writer_of_the_same_export_is_refused(
    libxl: Libxl, engine: EngineProc, nbd_server: NbdServerFactory, tmp_path: Path
) -> None:
    server = _file_server(nbd_server, _image(tmp_path))
    first = _backend(libxl, server.uri, 9)
    assert libxl.run("add", first).returncode == 0
    second = _backend(libxl, server.uri, 10)
    result = libxl.run("add", second)
    assert result.returncode != 0
    nodes = libxl.nodes(second)
    assert nodes["hotplug-status"] == "busy", nodes
    assert "backend/vbd/9/51712" in nodes["hotplug-error"]
    assert identity.OWNER not in nodes
    reader = _backend(libxl, server.uri, 11, mode="r")
    assert libxl.run("add", reader).returncode != 0, "read-only beside a writer is refused too"
    assert libxl.run("remove", first).returncode == 0


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_sandbox_runs_the_whole_path_on_an_export(
    nbd_server: NbdServerFactory, tmp_path: Path, kind: str
) -> None:
    """`xenblockctl sandbox --target URI`: nbdkit admits a second client (the write is read back
    through it), qemu-nbd by default does not (read back through the ring only)."""
    image = _image(tmp_path)
    server = _file_server(nbd_server, image) if kind == "nbdkit" else nbd_server("qemu-nbd", image=image)
    result = subprocess.run(
        [sys.executable, "-m", "xenblockctl", "sandbox", "--json", "--target", server.uri],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    steps = {s["name"]: s["detail"] for s in report["steps"]}
    assert "kind=nbd" in steps["block script add (as libxl runs it)"]
    second = "read back through a second NBD client"
    assert (second in steps["guest connects, writes, reads back"]) == (kind == "nbdkit")
    assert "no kernel device was made" in steps["nothing leaked"]
    server.kill()
    assert b"xenblockctl sandbox: written by the guest" in image.read_bytes()


def test_sandbox_refuses_a_bad_target_before_starting_anything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xenblockctl", "sandbox", "--target", "nbds://127.0.0.1/disk"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode != 0
    assert "nbd-uri-unsupported" in result.stderr


@pytest.mark.parametrize("point", ADD_POINTS)
def test_script_killed_at_each_step_leaks_nothing(
    libxl: Libxl, engine: EngineProc, nbd_server: NbdServerFactory, tmp_path: Path, point: str
) -> None:
    """libxl SIGKILLs a hung script: whatever step it died at, the detach that follows (online=0,
    the engine lets go, `remove`) leaves no record and no NBD connection of ours."""
    server = _file_server(nbd_server, _image(tmp_path))
    be = _backend(libxl, server.uri, 12)
    running = libxl.start("add", be, pause_at=point)
    running.wait_paused()
    running.kill()
    libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
    assert wait_for(lambda: libxl.nodes(be).get("state") == "6"), libxl.nodes(be)
    assert libxl.run("remove", be).returncode == 0
    assert identity.OWNER not in libxl.nodes(be)
    assert wait_for(lambda: _connections(server.proc.pid) == 0, 5), "an NBD connection outlived the detach"


@pytest.mark.parametrize("swap", [False, True])
def test_a_restarted_engine_re_checks_the_export(
    libxl: Libxl, nbd_server: NbdServerFactory, tmp_path: Path, transport_path: str, swap: bool
) -> None:
    """Nothing of an export is parked across an engine restart: the next engine finds the record
    and does its own handshake again, serving the same export and refusing a replaced one."""
    transport = transport_path
    argv = [sys.executable, "-m", "xenblockctl", "backend", "--transport", f"local:{transport}"]
    argv += ["--xenstore", libxl.xenstored.socket_path]
    started: list[ReadyDaemon] = []

    def start() -> ReadyDaemon:
        log = tmp_path / f"engine{len(started)}.log"
        started.append(ReadyDaemon("engine", argv, "engine ready", log, timeout=60, cwd=REPO))
        return started[-1]

    try:
        first = start()
        server = _file_server(nbd_server, _image(tmp_path, "first.img"))
        be = _backend(libxl, server.uri, 13)
        assert libxl.run("add", be).returncode == 0
        assert first.stop() == 0
        if swap:
            server.kill()
            server.socket_path.unlink()
            _file_server(nbd_server, _image(tmp_path, "second.img"), socket_path=server.socket_path)
        second = start()
        if swap:
            error = "/local/domain/0/error/backend/vbd/13/51712/error"
            assert wait_for(lambda: libxl.store.read_optional(error) is not None), libxl.nodes(be)
            assert (libxl.store.read_optional(error) or "").startswith("nbd-export-mismatch:")
            assert libxl.nodes(be)["opened"] != "1"
        else:
            assert wait_for(lambda: "opened NBD export" in second.log_text()), second.log_text()
            assert libxl.nodes(be)["opened"] == "1"
    finally:
        for daemon in started:
            daemon.stop()


def test_flush_is_advertised_only_if_the_server_can_flush(
    libxl: Libxl, engine: EngineProc, nbd_server: NbdServerFactory
) -> None:
    """An export without SEND_FLUSH (nbdkit's eval plugin saying so) gets feature-flush-cache=0:
    a guest must not believe its flushes make anything durable."""
    server = nbd_server(
        "nbdkit",
        extra=[
            "eval",
            f"get_size=echo {SIZE}",
            "pread=head -c $3 /dev/zero",
            "pwrite=cat >/dev/null",
            "can_write=exit 0",
            "can_flush=exit 3",
        ],
    )
    be = _backend(libxl, server.uri, 14)
    assert libxl.run("add", be).returncode == 0
    guest = connect_guest(libxl, engine.transport, be)
    try:
        assert libxl.nodes(be)["feature-flush-cache"] == "0"
    finally:
        detach_guest(libxl, be, guest)


def test_queues_share_one_connection_so_a_flush_covers_every_queue(
    libxl: Libxl, engine: EngineProc, nbd_server: NbdServerFactory, tmp_path: Path
) -> None:
    """A multi-queue guest on an export: every queue goes through the device's one connection
    (a flush on one queue must cover writes completed on the others, which NBD promises across
    connections only with CAN_MULTI_CONN), and the queues' first requests, sent together, all
    succeed (none fails because another queue is connecting)."""
    server = _file_server(nbd_server, _image(tmp_path))
    be = _backend(libxl, server.uri, 9)
    assert libxl.run("add", be).returncode == 0
    guest = connect_guest(libxl, engine.transport, be, queues=2)
    try:
        assert len(guest.rings) == 2, libxl.nodes(be)
        rids = [
            ring.submit_write(8 * q, f"queue {q}".encode().ljust(4096, b"\0"))
            for q, ring in enumerate(guest.rings)
        ]
        for ring in guest.rings:
            ring.kick()
        for ring, rid in zip(guest.rings, rids, strict=True):
            assert ring.collect(1, timeout=10)[rid].response.status == 0
        assert _connections(server.proc.pid) == 1, "one connection for both queues"
        assert guest.rings[0].flush() == 0
        with NbdClient.connect(uri.parse(server.uri)) as other:
            assert other.read(8 * 512, 7) == b"queue 1"
            assert other.read(0, 7) == b"queue 0"
    finally:
        detach_guest(libxl, be, guest)
