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
#: The lazily-importing steps a file add and a remove run, called for real where that needs no
#: root and changes nothing: target parsing and the dm test of a file path, the bound-loop scan
#: (unreadable devices are skipped), and remove's proof for a loop number that does not exist.
EXERCISE = (
    "import sys, os; sys.path[:0] = sys.argv[1:]; "
    "from xenblockctl.blockscript import add, remove, sharing, target; from xenblockctl.kernel import loop; "
    "t = target.parse_target('/srv/images/disk.img'); assert not target.maybe_dm(t); "
    "list(sharing.loop_claims()); "
    "r = loop.detach_with_proof(os.makedev(7, 1048000), diskseq=1, tag='xenblockctl:1:2'); "
    "assert r is loop.DetachResult.ALREADY_GONE, r; "
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


def _loaded_forbidden(probe: str) -> list[str]:
    paths = [str(ROOT), *site.getsitepackages()]
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, *paths], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    modules = json.loads(out)
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_hotplug_path_imports_no_heavy_modules() -> None:
    loaded = _loaded_forbidden(PROBE)
    assert not loaded, f"the hotplug path must not import {loaded}"


def test_file_add_and_remove_steps_import_nothing_heavy_lazily() -> None:
    loaded = _loaded_forbidden(EXERCISE)
    assert not loaded, f"a file add or a remove must not import {loaded} on the way"
