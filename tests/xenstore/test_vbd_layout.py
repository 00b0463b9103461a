"""vbd layout: XENBUS_PATH parsing, frontend paths, XenbusState, walking every backend."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.cxenstored import Daemon
from xenblockctl.xenstore.backends import BackendEntry, walk_backends
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.identity import format_physical_device, parse_physical_device
from xenblockctl.xenstore.vbd import (
    BackendPath,
    BackendRecordError,
    FrontendPath,
    VbdPathError,
    XenbusState,
    backend_dir,
)
from xenblockctl.xenstore.vdev import Vdev


def test_parse_xenbus_path_as_libxl_exports_it() -> None:
    path = BackendPath.parse("backend/vbd/5/51712")
    assert (path.kind, path.domid, path.devid, path.backend_domid) == ("vbd", 5, 51712, None)
    assert path.relative == "backend/vbd/5/51712"
    assert path.absolute(0) == "/local/domain/0/backend/vbd/5/51712"
    assert path.vdev == Vdev("xvd", 0)
    assert path.default_frontend().path == "/local/domain/5/device/vbd/51712"
    assert path.libxl_path == "/libxl/5/device/vbd/51712"
    with pytest.raises(VbdPathError):
        path.absolute()  # backend domain unknown from the relative form


def test_parse_absolute_form() -> None:
    path = BackendPath.parse("/local/domain/3/backend/vbd3/7/268442112")
    assert (path.kind, path.domid, path.devid, path.backend_domid) == ("vbd3", 7, 268442112, 3)
    assert path.absolute() == "/local/domain/3/backend/vbd3/7/268442112"
    assert str(path) == path.absolute()
    assert path.vdev is not None
    assert path.vdev.name == "xvdaa"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "backend/vbd/5",
        "backend/vbd/5/51712/",
        "/backend/vbd/5/51712",
        "backend//vbd/5/51712",
        "backend/vbd/5/../51712",
        "backend/vbd/../../5/51712",
        "backend/vif/5/0",
        "backend/qdisk/5/51712",
        "backend/VBD/5/51712",
        "backend/vbd/05/51712",  # not canonical: libxl never writes this
        "backend/vbd/5/051712",
        "backend/vbd/-1/51712",
        "backend/vbd/+5/51712",
        "backend/vbd/32752/51712",  # DOMID_FIRST_RESERVED
        "backend/vbd/5/0",
        "backend/vbd/5/536870912",  # 2 << 28
        "backend/vbd/5/51712\n",
        "backend/vbd/٥/51712",  # Arabic-Indic digit five
        "backend/vbd/5/51712/params",
        "/local/domain/x/backend/vbd/5/51712",
        "/local/domain/0/backend/vbd/5/51712/",
        "local/domain/0/backend/vbd/5/51712",
    ],
)
def test_rejects_malformed_xenbus_paths(bad: str) -> None:
    with pytest.raises(VbdPathError) as info:
        BackendPath.parse(bad)
    assert info.value.code == "xenbus-path-invalid"


def test_from_env() -> None:
    env = {"XENBUS_PATH": "backend/vbd/5/51712", "XENBUS_TYPE": "vbd", "XENBUS_BASE_PATH": "backend"}
    assert BackendPath.from_env(env) == BackendPath("vbd", 5, 51712)
    with pytest.raises(VbdPathError, match="disagrees"):
        BackendPath.from_env({"XENBUS_PATH": "backend/vbd/5/51712", "XENBUS_TYPE": "vbd3"})
    with pytest.raises(VbdPathError, match="not set"):
        BackendPath.from_env({})


@given(
    st.sampled_from(["vbd", "vbd3"]),
    st.integers(0, 0x7FEF),
    st.integers(1, (2 << 28) - 1),
    st.one_of(st.none(), st.integers(0, 0x7FEF)),
)
def test_backend_path_round_trips(kind: str, domid: int, devid: int, bedom: int | None) -> None:
    path = BackendPath(kind, domid, devid, bedom)
    assert BackendPath.parse(str(path)) == path
    assert BackendPath.parse(path.relative) == BackendPath(kind, domid, devid)


def test_frontend_path() -> None:
    front = FrontendPath.parse("/local/domain/5/device/vbd/51712")
    assert (front.domid, front.devid, front.path) == (5, 51712, "/local/domain/5/device/vbd/51712")
    for bad in (
        "/local/domain/5/device/vif/0",
        "local/domain/5/device/vbd/51712",
        "/local/domain/5/device/vbd/0",
    ):
        with pytest.raises(VbdPathError):
            FrontendPath.parse(bad)


def test_xenbus_state_matches_xenbus_h() -> None:
    assert [(s.name, s.value) for s in XenbusState] == [
        ("Unknown", 0),
        ("Initialising", 1),
        ("InitWait", 2),
        ("Initialised", 3),
        ("Connected", 4),
        ("Closing", 5),
        ("Closed", 6),
        ("Reconfiguring", 7),
        ("Reconfigured", 8),
    ]
    assert XenbusState.parse("4") is XenbusState.Connected
    assert str(XenbusState.InitWait) == "2"  # what gets written to `state`
    for bad in ("9", "-1", "", "4 ", "four", "٤"):
        with pytest.raises(BackendRecordError):
            XenbusState.parse(bad)


def test_physical_device_format() -> None:
    assert format_physical_device(7, 0) == "7:0"
    assert format_physical_device(254, 26) == "fe:1a"
    assert parse_physical_device("fe:1a") == (254, 26)
    for bad in ("7", "7:", "0x7:0", "FE:0", "7:0\n", "g:0", "7-0"):
        with pytest.raises(BackendRecordError):
            parse_physical_device(bad)


#: What libxl leaves in the backend directory when the script runs (reference §1.4 step 3).
LIBXL_NODES = {
    "frontend": "/local/domain/5/device/vbd/51712",
    "frontend-id": "5",
    "params": "/root/disk.img",
    "script": "/etc/xen/scripts/block",
    "online": "1",
    "removable": "0",
    "bootable": "1",
    "state": "2",
    "dev": "xvda",
    "type": "phy",
    "mode": "w",
    "device-type": "disk",
    "discard-enable": "1",
    "specification": "xen",
}


def test_walk_backends_and_backend_dir_on_a_real_daemon(daemon: Daemon) -> None:
    with XenStore.connect(timeout=5) as store:
        assert list(walk_backends(store, "/local/domain/0")) == []  # no backend directory at all
        base = "/local/domain/0/backend/vbd/5/51712"
        store.write_many({f"{base}/{k}": v for k, v in LIBXL_NODES.items()})
        store.write("/local/domain/0/backend/vbd3/7/768/state", "1")
        store.write("/local/domain/0/backend/other/1/2/state", "1")  # not a block backend kind
        assert list(walk_backends(store, "/local/domain/0")) == [
            BackendEntry("vbd", "5", "51712", base),
            BackendEntry("vbd3", "7", "768", "/local/domain/0/backend/vbd3/7/768"),
        ]
        path = BackendPath.parse("backend/vbd/5/51712")
        assert backend_dir(store, path) == base  # resolved against our own home
        # the absolute form names the backend domain itself; nothing is resolved against ours
        assert backend_dir(store, path.with_backend(3)) == "/local/domain/3/backend/vbd/5/51712"
