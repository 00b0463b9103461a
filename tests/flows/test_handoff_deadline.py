"""The hand-off ends in time for its failure to reach libxl (real xenstored, no root).

Every request of the block script fails after its overall deadline (38 s after start; libxl
SIGKILLs at 40). A hand-off allowed to wait up to that deadline, because the steps before it (a lock
wait above all) used part of the budget, left nothing to withdraw or write `hotplug-error` with:
libxl saw a bare exit status. The hand-off now ends REPORT_RESERVE before the store's deadline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fixtures.libxl import Libxl
from xenblockctl.blockscript import add, handoff
from xenblockctl.kernel.blockdev import BlockIdentity
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vbd import BackendPath


def test_handoff_leaves_time_to_report_before_the_script_deadline(libxl: Libxl, tmp_path: Path) -> None:
    be = libxl.create_backend(5, 51712, str(tmp_path / "disk.img"), "w")  # `opened`=0: nobody opens
    identity = BlockIdentity(7, 1048000, 1, 1 << 20, 512, 512, False)
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10) as store:
        # As if open, lock and publish had used all but 2.5 s of the script's budget.
        store.deadline = time.monotonic() + 2.5
        with pytest.raises(handoff.HandoffTimeout) as exc:
            handoff.wait_for_consumer(
                store,
                home=store.home(),
                backend=be.path,
                path=BackendPath("vbd", 5, 51712),
                physical_device=identity.physical_device,
                timeout=30.0,  # configured: far beyond what is left
                bus=str(tmp_path / "bus"),
            )
        assert store.deadline - time.monotonic() >= handoff.REPORT_RESERVE / 2
        add.report_failure(store, be.path, exc.value, withdraw=True)
    nodes = libxl.nodes(be)
    assert nodes["hotplug-status"] == "error"
    assert nodes["hotplug-error"].startswith("handoff-timeout: ")
