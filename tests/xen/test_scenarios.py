"""Each scenario file in tests/xen/scenarios/ becomes one test, judged by the record dom0 wrote back."""

from __future__ import annotations

import pytest

from tests.xen import vm

SCENARIOS = vm.discover()


@pytest.mark.xen
@pytest.mark.slow
@pytest.mark.parametrize("scenario", [s.name for s in SCENARIOS])
def test_scenario(xen_lane: vm.LaneRun, scenario: str) -> None:
    record = xen_lane.records.get(scenario)
    if record is None:
        pytest.fail(
            f"{scenario}: no result record: {xen_lane.why_missing()}\n"
            f"--- console tail ({xen_lane.serial_log}) ---\n{xen_lane.console_tail()}",
            pytrace=False,
        )
    status = record.get("status")
    if status == "skip":
        pytest.skip(f"{scenario}: {record.get('reason')}")
    if status != "pass":
        tail = "\n".join(record.get("log_tail", []))
        pytest.fail(
            f"{scenario}: {record.get('reason')} ({record.get('duration')}s)\n"
            f"--- scenario log tail ---\n{tail}",
            pytrace=False,
        )
