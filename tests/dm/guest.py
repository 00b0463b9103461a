"""Runs inside the dm lane's guest (PID 1's child): every scenario, each with its own alarm, each
result written as one JSON line to the writable share. Never imports pytest: the guest sees the
host's tree read-only and needs nothing beyond the interpreter and xenblockctl.

Usage: python -m tests.dm.guest OUTDIR [all|name,name...]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from tests.dm import scenarios
from tests.dm.vm import RESULTS_FILE

#: Per-scenario limit inside the guest; the host's hard timeout covers a hung kernel.
SCENARIO_TIMEOUT = 90


class ScenarioTimeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise ScenarioTimeout("scenario exceeded its time limit inside the guest")


def main(argv: list[str]) -> int:
    outdir = Path(argv[1])
    select = argv[2] if len(argv) > 2 else "all"
    wanted = list(scenarios.SCENARIOS) if select == "all" else select.split(",")
    signal.signal(signal.SIGALRM, _alarm)
    failures = 0
    with open(outdir / RESULTS_FILE, "a") as out:
        for name in wanted:
            func = scenarios.SCENARIOS.get(name)
            record: dict[str, object] = {"name": name}
            started = time.monotonic()
            signal.alarm(scenarios.TIMEOUTS.get(name, SCENARIO_TIMEOUT))
            try:
                if func is None:
                    raise LookupError(f"no scenario {name!r}")
                record["metrics"] = func() or {}
                record["outcome"] = "passed"
            except scenarios.Skip as exc:
                record["outcome"] = "skipped"
                record["detail"] = str(exc)
            except BaseException as exc:  # a scenario's failure is data, the runner goes on
                failures += 1
                record["outcome"] = "failed"
                record["detail"] = "".join(traceback.format_exception(exc))
            finally:
                signal.alarm(0)
                leftovers = scenarios.cleanup_everything()
                if leftovers:
                    record["leftovers"] = leftovers
            record["seconds"] = round(time.monotonic() - started, 3)
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
            print(f"xbc-scenario {name}: {record['outcome']} ({record['seconds']} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
