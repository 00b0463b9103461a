"""The admin CLI on an NBD export the engine serves: `attach` (the script's add in-process), `list`
and `show` (identity `export`, the kind=nbd owner record, valid under the shipped schemas),
`detach` (nothing kernel-side to free; the engine's connection to the server is closed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.cli.test_attach_detach import Guest
from tests.cli.test_golden import check_schema
from tests.fixtures.cli import CliRunner, Engine
from tests.fixtures.nbd import NbdServerFactory
from tests.fixtures.xenstore import EmbeddedXenstored
from tests.nbd.test_blockscript_nbd import _connections
from xenblockctl.nbd import uri
from xenblockctl.nbd.client import NbdClient

pytestmark = [pytest.mark.root]
XVDB = 51728


def test_attach_list_show_detach_an_engine_served_export(
    run_cli: CliRunner,
    xenstored: EmbeddedXenstored,
    cli_engine: Engine,
    nbd_server: NbdServerFactory,
    tmp_path: Path,
) -> None:
    image = tmp_path / "export.img"
    with open(image, "wb") as f:
        f.write(b"BOOT")
        f.truncate(16 << 20)
    server = nbd_server("nbdkit", extra=["file", str(image)])
    guest = Guest(xenstored.socket_path, cli_engine.transport, devid=XVDB)
    try:
        guest.start()
        result = run_cli("attach", "guest5", server.uri, "--vdev", "xvdb", "--json", "--wait", "20")
        assert result.code == 0, result.err
        doc = result.json()
        check_schema(doc)
        assert (doc["consumer"], doc["connected"], doc["physical_device"]) == ("engine", True, None)
        assert doc["device_path"] == uri.parse(server.uri).canonical()
        guest.thread.join(20)
        assert guest.error is None, guest.error
        assert guest.front is not None
        assert guest.front.ring is not None
        assert guest.front.ring.read(0, 512)[:4] == b"BOOT"
        guest.front.ring.write(8, b"via the CLI".ljust(512, b"\0"))
        guest.front.ring.flush()
        with NbdClient.connect(uri.parse(server.uri)) as other:
            assert other.read(8 * 512, 11) == b"via the CLI"

        listed = run_cli("list", "--json").json()
        check_schema(listed)
        (vbd,) = listed["vbds"]
        assert (vbd["identity"], vbd["holder"], vbd["health"]) == ("export", "engine", "connected")
        assert vbd["physical_device"] is None
        owner = vbd["owner"]
        assert (owner["kind"], owner["uri"], owner["size"]) == ("nbd", doc["device_path"], 16 << 20)
        assert (owner["socket_dev"], owner["socket_ino"]) == (
            server.socket_path.stat().st_dev,
            server.socket_path.stat().st_ino,
        )
        shown = run_cli("show", "5", "xvdb", "--json").json()
        check_schema(shown)
        assert shown["vbd"] == vbd
        assert "export" in run_cli("list").out

        front = guest.front
        closer = threading.Thread(target=front.disconnect, daemon=True)
        closer.start()
        detached = run_cli("detach", "5", "xvdb", "--json", "--wait", "15")
        closer.join(20)
        assert detached.code == 0, detached.err
        assert detached.json()["stuck"] == []
        assert guest.store.read_optional(vbd["backend_path"]) is None
        deadline = time.monotonic() + 5
        while _connections(server.proc.pid) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _connections(server.proc.pid) == 0, "the engine kept its NBD connection after the detach"
    finally:
        guest.close()
