"""The hotplug entry point is on every VM start's critical path: its import graph stays small."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Run with -S: site.py itself (and a development venv's editable-install finder, which imports
# pathlib) would otherwise hide what our own graph pulls in. The paths site would add come in argv.
PROBE = (
    "import sys; sys.path[:0] = sys.argv[1:]; "
    "import xenblockctl.blockscript.hotplug, xenblockctl.blockscript.add, xenblockctl.blockscript.remove; "
    "import json; print(json.dumps(sorted(sys.modules)))"
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
    # pathlib pulls in fnmatch, urllib.parse and ipaddress (~5 ms); sysfs lookups (which use it)
    # are imported lazily, only for block-device and dm targets and for remove
    "pathlib",
    "urllib",
    "ipaddress",
    # random (hashlib's sha512, bisect) only on a lost race or a transaction conflict
    "random",
)


def test_hotplug_path_imports_no_heavy_modules() -> None:
    paths = [str(ROOT), *site.getsitepackages()]
    out = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, *paths], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not loaded, f"the hotplug path must not import {loaded}"
