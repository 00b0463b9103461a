"""gc's verdict on a kernel NBD device of ours that no backend claims, from its backend identifier
and the vbd it names (toolstack/gc.py). The devices themselves exist only in the dm lane
(tests/dm/scenarios.py script_nbd_never_opened): this host has no nbd module."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xenblockctl.toolstack.gc import _nbd_orphan_reason
from xenblockctl.toolstack.inventory import VbdInfo
from xenblockctl.toolstack.vbd_dirs import VbdLocation


def _vbd(domid: int, devid: int, backend: dict[str, str] | None, *, alive: bool = True) -> VbdInfo:
    return VbdInfo(
        location=VbdLocation(domid, devid),
        backend=backend,
        frontend={},
        domain_alive=alive,
        backend_error=None,
        live_diskseq=None,
        identity="",
        owner=None,
        owner_error=None,
        holder=None,
        device_path=None,
        dm_name=None,
    )


def _reason(identifier: str, *vbds: VbdInfo) -> str | None:
    return _nbd_orphan_reason(identifier, {(v.location.domid, v.location.devid): v for v in vbds})


def test_a_vbd_whose_add_has_not_ended_keeps_its_device() -> None:
    # the add may be between its connect and its open: only remove (or the add ending) settles it
    assert _reason("xenblockctl:5:51712", _vbd(5, 51712, {"state": "2"})) is None


@pytest.mark.parametrize(
    ("vbds", "why"),
    [
        ((), "no backend vbd 5/51712"),
        ((_vbd(5, 51712, None),), "no backend vbd 5/51712"),
        ((_vbd(5, 51712, {"state": "2"}, alive=False),), "domain 5 is gone"),
        ((_vbd(5, 51712, {"hotplug-status": "error"}),), "hotplug-status error"),
        ((_vbd(5, 51712, {"hotplug-status": "connected"}),), "hotplug-status connected"),
    ],
)
def test_a_device_whose_vbd_is_done_with_it_is_garbage(vbds: tuple[VbdInfo, ...], why: str) -> None:
    reason = _reason("xenblockctl:5:51712", *vbds)
    assert reason is not None
    assert why in reason, reason


@pytest.mark.parametrize(
    "identifier",
    [
        "xenblockctl:dm-lane",  # a name we never give a backend's device
        "xenblockctl:5",
        "xenblockctl:5:51712:base",  # a loop-style tag part: not an NBD identifier of ours
        "xenblockctl:05:51712",  # not the decimal spelling make_tag writes
        "xenblockctl:5:-1",
        "xenblockctl:32752:51712",  # a reserved domid (DOMID_FIRST_RESERVED)
        "xenblockctl:5:536870912",  # beyond the largest devid
        "xenblockctl:identify:x",
    ],
)
def test_identifiers_we_do_not_make_are_left_alone(identifier: str) -> None:
    assert _reason(identifier) is None


def test_identify_devices_count_once_their_process_is_gone() -> None:
    assert _reason(f"xenblockctl:identify:{os.getpid()}") is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process (until re-used, which this test does not race)
    reason = _reason(f"xenblockctl:identify:{child.pid}")
    assert reason is not None
    assert "identify process is gone" in reason
