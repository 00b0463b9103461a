"""The vbd directories `xenblockctl attach` writes carry libxl's permissions, node by node, and so
the guest and the backend domain can do their part of the handshake (issue 14, item 1).

Run against both daemons, each with real unprivileged domain connections:
- embedded: `xenstored --domain-socket <domid>:<path>` (a socket that *is* that domain);
- C xenstored 4.17 under tests/support/xsstub.c with XSSTUB_RING_DIR: INTRODUCE maps a shared
  file as the guest's ring page, and tests/support/xsring.py talks through the daemon's real
  ring code as that domain (every socket connection to the C daemon is dom0).

The domains' own directories are made as libxl__domain_make makes them (libxl_create.c): the
home and `device` are (n0,r<domid>), `error` is (n<domid>), `/libxl/<domid>` is (n0). A node
dom0 creates takes its parent's list; so nodes written before their directory's set-perms kept
`device`'s (n0,r<domid>) and the guest could not write its own `state`."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.fixtures.cxenstored import CTools, start_cxenstored
from tests.fixtures.xenstore import ERROR, EmbeddedXenstored, Msg, RawClient
from tests.support.xsring import RingClient, prepare_ring
from xenblockctl.toolstack.diagnosis import backend_domain_silent, frontend_stall
from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vdev import Vdev

READ, WRITE = 2, 11
GUEST, DRIVER_DOMAIN, BYSTANDER = 5, 7, 9


class DomainConnection(Protocol):
    def call(self, msg_type: int, *args: bytes, tx_id: int = 0, raw: bytes | None = None) -> Msg: ...

    def close(self) -> None: ...


@dataclass
class Store:
    name: str
    dom0: XenStore
    connect_as: Callable[[int], DomainConnection]


def _libxl_domain_dirs(store: XenStore, domid: int) -> None:
    """What libxl__domain_make leaves for a running domain (the parts vbds live under)."""
    home = f"/local/domain/{domid}"
    for path, perms in (
        (home, ["n0", f"r{domid}"]),
        (f"{home}/device", ["n0", f"r{domid}"]),
        (f"{home}/error", [f"n{domid}"]),
        (f"/libxl/{domid}", ["n0"]),
        (f"/libxl/{domid}/device", ["n0"]),
    ):
        store.mkdir(path)
        store.set_perms(path, perms)


@pytest.fixture(params=["c", "embedded"])
def store(
    request: pytest.FixtureRequest, xenstored_factory: Callable[..., EmbeddedXenstored]
) -> Iterator[Store]:
    domids = (GUEST, DRIVER_DOMAIN, BYSTANDER)
    opened: list[DomainConnection] = []
    if request.param == "embedded":
        daemon = xenstored_factory(domain_sockets=domids)

        def connect_embedded(domid: int) -> DomainConnection:
            client = RawClient(daemon.domain_socket(domid))
            opened.append(client)
            return client

        with XenStore.connect(daemon.socket_path) as dom0:
            for domid in domids:
                _libxl_domain_dirs(dom0, domid)
            yield Store("embedded", dom0, connect_embedded)
            for conn in opened:
                conn.close()
        return
    tools: CTools = request.getfixturevalue("cxenstored_tools")
    with tempfile.TemporaryDirectory(prefix="xbc-rings-") as ring_dir:
        rings = Path(ring_dir)
        cdaemon = start_cxenstored(tools, extra_env={"XSSTUB_RING_DIR": ring_dir})
        try:
            with XenStore.connect(str(cdaemon.socket)) as dom0:
                for n, domid in enumerate(domids):
                    prepare_ring(rings, domid)
                    dom0.introduce_domain(domid, 0x1000 + n, 20 + n)
                    _libxl_domain_dirs(dom0, domid)

                def connect_ring(domid: int) -> DomainConnection:
                    client = RingClient(rings, domid)
                    opened.append(client)
                    return client

                yield Store("c", dom0, connect_ring)
                for conn in opened:
                    conn.close()
        finally:
            cdaemon.stop()


def _write(conn: DomainConnection, path: str, value: str) -> str:
    reply = conn.call(WRITE, raw=path.encode() + b"\0" + value.encode())
    return reply.payload.rstrip(b"\0").decode() if reply.type == ERROR else "OK"


def _read(conn: DomainConnection, path: str) -> str:
    reply = conn.call(READ, path.encode())
    return reply.payload.rstrip(b"\0").decode() if reply.type == ERROR else "OK"


def _spec(backend_domid: int) -> DiskSpec:
    return DiskSpec(
        GUEST, Vdev.parse("xvdb"), "/images/disk.img", "w", backend_domid=backend_domid, script="/s/block"
    )


# What libxl writes for a `phy` disk (libxl_disk.c device_disk_add + libxl_device.c
# libxl__device_generic_add, Xen 4.17): F = frontend_perms [n<domid>, r<bedom>] (set on the
# directory, then on every node of `fents` explicitly), B = backend_perms [n<bedom>, r<domid>]
# (on the directory; its nodes inherit), L = /libxl/<domid>'s [n0] (inherited).
# Not written by us: `protocol` (libxl adds it for PV guests from the hypervisor's native ABI;
# every blkfront since 2.6.26 writes it itself), `direct-io-safe` (opt-in).
EXPECTED = {
    "frontend": ("F", ["", "backend", "backend-id", "state", "virtual-device", "device-type", "trusted"]),
    "backend": (
        "B",
        [
            "",
            "frontend",
            "params",
            "script",
            "frontend-id",
            "online",
            "removable",
            "bootable",
            "state",
            "dev",
            "type",
            "mode",
            "device-type",
            "discard-enable",
            "specification",
        ],
    ),
    "libxl": (
        "L",
        [
            "",
            "frontend",
            "backend",
            "params",
            "script",
            "frontend-id",
            "online",
            "removable",
            "state",
            "mode",
        ],
    ),
}


def _perm_lists(domid: int, bedom: int) -> dict[str, list[str]]:
    return {"F": [f"n{domid}", f"r{bedom}"], "B": [f"n{bedom}", f"r{domid}"], "L": ["n0"]}


@pytest.mark.parametrize("bedom", [0, DRIVER_DOMAIN], ids=["dom0-backend", "driver-domain"])
def test_every_node_has_libxl_permissions(store: Store, bedom: int) -> None:
    spec = write_vbd(store.dom0, _spec(bedom))
    loc = spec.location
    lists = _perm_lists(GUEST, bedom)
    dirs = {"frontend": loc.frontend, "backend": loc.backend, "libxl": loc.libxl}
    wrong = []
    for which, (letter, names) in EXPECTED.items():
        present = set(store.dom0.ls(dirs[which]))
        assert {n for n in names if n} <= present, f"{which}: missing {set(names) - present - {''}}"
        for name in names:
            path = dirs[which] + (f"/{name}" if name else "")
            got = [str(p) for p in store.dom0.get_perms(path)]
            if got != lists[letter]:
                wrong.append(f"{path}: {got} (libxl: {lists[letter]})")
    # Nothing above the device directories changes hands.
    assert [str(p) for p in store.dom0.get_perms(f"/local/domain/{GUEST}/device/vbd")] == ["n0", f"r{GUEST}"]
    assert not wrong, f"{store.name}: " + "; ".join(wrong)


@pytest.mark.parametrize("bedom", [0, DRIVER_DOMAIN], ids=["dom0-backend", "driver-domain"])
def test_guest_writes_its_frontend_state_and_nothing_of_the_backend(store: Store, bedom: int) -> None:
    loc = write_vbd(store.dom0, _spec(bedom)).location
    guest = store.connect_as(GUEST)
    # The handshake: blkfront writes state, ring-ref, event-channel, protocol into its directory.
    assert _write(guest, f"{loc.frontend}/state", "3") == "OK"
    assert _write(guest, f"{loc.frontend}/ring-ref", "8") == "OK"
    assert _read(guest, f"{loc.backend}/state") == "OK"
    assert _read(guest, f"{loc.backend}/params") == "OK"
    for node in ("state", "params", "mode", "frontend"):
        assert _write(guest, f"{loc.backend}/{node}", "6") == "EACCES", node
    assert _write(guest, f"{loc.libxl}/params", "/etc/shadow") == "EACCES"
    assert _read(guest, f"{loc.libxl}/params") == "EACCES"
    assert store.dom0.read(f"{loc.frontend}/state") == "3"
    # A third domain sees neither side.
    other = store.connect_as(BYSTANDER)
    assert _read(other, f"{loc.frontend}/state") == "EACCES"
    assert _read(other, f"{loc.backend}/state") == "EACCES"
    assert _write(other, f"{loc.frontend}/state", "5") == "EACCES"


def test_driver_domain_writes_its_backend_state_and_nothing_of_the_frontend(store: Store) -> None:
    loc = write_vbd(store.dom0, _spec(DRIVER_DOMAIN)).location
    driver = store.connect_as(DRIVER_DOMAIN)
    # blkback (or our engine) in the driver domain: InitWait, the script's nodes, Connected.
    assert _write(driver, f"{loc.backend}/state", "2") == "OK"
    assert _write(driver, f"{loc.backend}/physical-device", "7:0") == "OK"
    assert _write(driver, f"{loc.backend}/hotplug-status", "connected") == "OK"
    assert _read(driver, f"{loc.frontend}/state") == "OK"
    assert _write(driver, f"{loc.frontend}/state", "6") == "EACCES"
    assert _write(driver, f"{loc.libxl}/params", "x") == "EACCES"
    assert store.dom0.read(f"{loc.backend}/state") == "2"


def test_a_stalled_frontend_is_explained_by_what_xenstore_shows(store: Store) -> None:
    loc = write_vbd(store.dom0, _spec(0)).location
    said = frontend_stall(store.dom0, loc, "1")
    assert said.startswith(
        f"the guest has not answered: frontend state 1, and domain {GUEST} exists and may write"
    )
    # What the old write order left: the guest cannot write its state, and that is what is said.
    store.dom0.set_perms(f"{loc.frontend}/state", ["n0", f"r{GUEST}"])
    said = frontend_stall(store.dom0, loc, "1")
    assert said.startswith(
        f"domain {GUEST} may not write its frontend state ({loc.frontend}/state is (n0,r{GUEST}))"
    )
    store.dom0.rm(f"/local/domain/{GUEST}")
    assert frontend_stall(store.dom0, loc, "1") == f"domain {GUEST} is gone from xenstore (destroyed?)"


def test_a_silent_backend_domain_is_described_from_xenstore(store: Store) -> None:
    loc = write_vbd(store.dom0, _spec(DRIVER_DOMAIN)).location
    said = backend_domain_silent(store.dom0, loc)
    assert said.startswith(f"domain {DRIVER_DOMAIN}: it was not created as a driver domain"), said
    assert "it serves no other vbd" in said
    assert "may not write" not in said, "libxl's permissions let it write its state"
    assert said.endswith("cannot be seen from this domain")
    store.dom0.mkdir(f"/local/domain/{DRIVER_DOMAIN}/libxl")  # libxl's mark of driver_domain=1
    assert "it was created as a driver domain" in backend_domain_silent(store.dom0, loc)
    store.dom0.set_perms(f"{loc.backend}/state", ["n0", f"r{DRIVER_DOMAIN}"])
    assert f"it may not write {loc.relative}/state (n0,r{DRIVER_DOMAIN})" in backend_domain_silent(
        store.dom0, loc
    )
    store.dom0.rm(f"/local/domain/{DRIVER_DOMAIN}")
    assert backend_domain_silent(store.dom0, loc) == f"domain {DRIVER_DOMAIN} does not exist in xenstore"
