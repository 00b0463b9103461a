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
from xenblockctl.xenstore.client import XenStore

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
        st = server.socket_path.stat()
        assert (owner["socket_dev"], owner["socket_ino"], owner["socket_ctime_ns"]) == (
            st.st_dev,
            st.st_ino,
            st.st_ctime_ns,
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


def test_attach_sees_an_export_a_driver_domain_engine_took(xenstored: EmbeddedXenstored) -> None:
    """In a driver domain the export's record is all the script publishes there: attach must read
    that as published (by the engine), not as "nobody took it"."""
    from xenblockctl.toolstack.lifecycle import _published_by_driver_domain
    from xenblockctl.toolstack.vbd_dirs import VbdLocation
    from xenblockctl.xenstore.identity import NbdOwnerRecord

    loc = VbdLocation(5, 51712, backend_domid=7)
    record = NbdOwnerRecord("nbd+unix:///disk?socket=/run/x.sock", 1 << 20, 0xD6D, "w", (1, 2, 3))
    with XenStore.connect(xenstored.socket_path, timeout=10) as store:
        assert _published_by_driver_domain(store, loc) is None
        store.write(f"{loc.backend}/opened", "1")
        store.write(f"{loc.backend}/xenblockctl-owner", record.format())
        seen = _published_by_driver_domain(store, loc)
    assert seen is not None
    assert (seen.physical_device, seen.device_path, seen.consumer) == ("", record.uri, "engine")


def test_gc_counts_an_export_record_as_published() -> None:
    """A backend whose add failed is gc's to delete only if it published nothing: an export's
    record (kind=nbd, no physical-device) is something published, which the engine may serve."""
    from xenblockctl.toolstack.gc import stale_backend_reason
    from xenblockctl.toolstack.inventory import IDENTITY_EXPORT, IDENTITY_NONE, VbdInfo
    from xenblockctl.toolstack.vbd_dirs import VbdLocation
    from xenblockctl.xenstore.identity import NbdOwnerRecord

    record = NbdOwnerRecord("nbd+unix:///disk?socket=/run/x.sock", 1 << 20, 0xD6D, "w", (1, 2, 3))
    failed = {"state": "4", "script": "/etc/xen/scripts/block-xenblockctl", "hotplug-status": "error"}
    loc = VbdLocation(5, 51712)

    def info(backend: dict[str, str], owner: NbdOwnerRecord | None) -> VbdInfo:
        ident = IDENTITY_EXPORT if owner else IDENTITY_NONE
        return VbdInfo(loc, backend, None, True, None, None, ident, owner, None, None, None, None)

    assert stale_backend_reason(info(failed, None)) == "failed attach: no error text"
    published = {**failed, "xenblockctl-owner": record.format()}
    assert stale_backend_reason(info(published, record)) is None
