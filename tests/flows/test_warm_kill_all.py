"""tests/flows/test_kill.py's own tests, unchanged, with libxl's script run as the C client of the
warm server (tests/fixtures/warm.py). The harness's kill of a paused process finds the worker (a
fork of the server, whose command line names `block-xenblockctl.py`) and waits until it is gone,
as it does for the AUTOCLEAR child, so each invariant is checked after the worker's last close."""

from __future__ import annotations

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl
from tests.fixtures.warm import WarmServer
from tests.flows import test_kill
from tests.flows.test_kill import *  # noqa: F403 (every test of test_kill.py, collected here again)
from xenblockctl.xenstore.identity import OwnerRecord


@pytest.fixture(autouse=True)
def _through_the_server(warm: WarmServer) -> WarmServer:
    return warm


@pytest.mark.parametrize("point", ["add-consumer-ready", "add-done"])  # type: ignore[no-redef]
def test_kill_kernel_path_add(libxl: Libxl, make_image: ImageFactory, point: str) -> None:
    """test_kill.py's, but killed at add-done the harness kills the worker, which holds the
    AUTOCLEAR job itself here (autoclear.STAGE: no child to survive it): the degraded case of
    autoclear.py. AUTOCLEAR stays on and the record says so, blkback's reference governs the device
    and nothing leaks. libxl cannot do this (it kills the client, and the worker disarmed its
    kill-on-hangup when it took the job: test_warm_kill.py); an OOM kill or an admin can."""
    if point != "add-done":
        test_kill.test_kill_kernel_path_add(libxl, make_image, point)
        return
    image, be, consumer, minor = test_kill.kill_kernel_path_add(libxl, make_image, point)
    nodes = libxl.nodes(be)
    assert nodes["hotplug-status"] == "connected"
    assert OwnerRecord.parse(nodes["xenblockctl-owner"]).autoclear
    assert test_kill._sysfs_autoclear(minor) == "1"
    consumer.release()  # a frontend reconnect now would lose the disk: the degraded case
    assert minor not in bound_loops_under(image.parent), "AUTOCLEAR on: blkback's release detached it"
    test_kill._tear_down(libxl, be)
    assert bound_loops_under(image.parent) == {}, f"killed at {point}: loop device leaked"
