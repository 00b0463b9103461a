"""device-mapper scenarios in a QEMU-booted Debian kernel (the host kernel has no dm).

One boot runs every collected scenario (tests/dm/scenarios.py); each comes back as its own
outcome here. Results and the guest console of the last run: .cache/dm-lane/last-run.json."""

from __future__ import annotations

import pytest

from tests.dm import vm
from tests.dm.scenarios import SCENARIOS

pytestmark = [pytest.mark.dm, pytest.mark.slow, pytest.mark.root]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_in_guest(scenario: str, dm_lane: vm.BootResult) -> None:
    record = dm_lane.results.get(scenario)
    if record is None:
        pytest.fail(
            f"no result for {scenario} from the guest (timed out: {dm_lane.timed_out}, "
            f"{dm_lane.exit_line or 'no exit line'}, {dm_lane.seconds:.0f} s); console tail:\n"
            + dm_lane.console_tail()
        )
    if record["outcome"] == "skipped":
        pytest.skip(f"guest skipped {scenario}: {record.get('detail')}")
    assert record["outcome"] == "passed", record.get("detail")
    assert not record.get("leftovers"), f"{scenario} left devices behind: {record['leftovers']}"
    if record.get("metrics"):
        print(f"{scenario}: {record['metrics']}")
