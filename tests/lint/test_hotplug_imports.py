"""The hotplug entry point is on every VM start's critical path: its import graph stays small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import json, sys; import xenblockctl.blockscript.hotplug, xenblockctl.blockscript.add, "
    "xenblockctl.blockscript.remove; print(json.dumps(sorted(sys.modules)))"
)
FORBIDDEN = (
    "click",
    "pyudev",
    "xenblockctl.cli",
    "xenblockctl.backend",
    "xenblockctl.kernel.dm",  # only for dm targets (lazily)
    "tomllib",  # only when a config file exists
    "asyncio",
    "subprocess",
    # dataclasses imports inspect, ast, dis, tokenize and execs code per class: the largest avoidable
    # share of start-up, so records on this path are NamedTuples
    "dataclasses",
    "inspect",
)


def test_hotplug_path_imports_no_heavy_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not loaded, f"the hotplug path must not import {loaded}"
