"""The udev hook runs on every block event (a loop or dm device changing, any disk going away) and
every vbd backend's: its import graph stays as small as the block script's, and by the same rules
(test_hotplug_imports.FORBIDDEN, checked by its _loaded_forbidden, holds here too)."""

from __future__ import annotations

from tests.lint.test_hotplug_imports import _added, _loaded_forbidden
from xenblockctl import config

#: What the hook's module imports and what its events import lazily, run for real where that needs
#: no root and changes nothing: a backend event with the hooks off (the default: the config file
#: missing), and block events for a device that does not exist with xenstored missing (sysfs is
#: read, the connect is tried: the client and its synchronous link are imported). A backend event
#: with the hooks on runs the block script's main, whose graph test_hotplug_imports.py budgets.
#: The laid hook's own lines import gc, posix and sys, which a bare interpreter has loaded.
BACKEND_OFF = f"""
import sys; sys.path[:0] = sys.argv[1:]
from xenblockctl.toolstack import udev
udev.main(["xenblockctl-udev", "backend"], {{"ACTION": "add", {config.PATH_ENV!r}: "/nonexistent/x.conf"}})
"""
PROBE = f"""{BACKEND_OFF}
for action in ("change", "remove"):
    event = {{"ACTION": action, "MAJOR": "7", "MINOR": "1048000", "XENSTORED_PATH": "/nonexistent/socket"}}
    udev.main(["xenblockctl-udev", "block"], event)
"""
_PRINT = "print(sorted(sys.modules))\n"
#: Modules the hook (PROBE) may add to a bare `python -S` interpreter. 37 when set (2026-12-06,
#: bench/README.md issue 18 round 11): the block script's graph for a remove without its own
#: modules (no blockscript.*, no loop), plus kernel.sysfs and kernel.blockdev (the device's
#: diskseq), toolstack, udev and udev_block. Before, the hook ran with site.py and imported 77
#: modules beyond site's (os, typing, re, enum, collections, socket, threading, pyxs, …), 85 under
#: this probe: ~35 ms of imports under -X importtime. Raise only with a measurement, as for the
#: block script.
MODULE_BUDGET = 37
#: A backend event with the hooks off (the default, so most backend events) stops at the config:
#: 14 modules when set, no xenstore module (~1 ms less than importing the block events' graph).
BACKEND_OFF_BUDGET = 14


def test_udev_hook_imports_nothing_heavy() -> None:
    loaded = _loaded_forbidden(PROBE + _PRINT)
    assert not loaded, f"the udev hook must not import {loaded}"


def test_udev_hook_stays_within_its_module_budget() -> None:
    for probe, budget in ((PROBE, MODULE_BUDGET), (BACKEND_OFF, BACKEND_OFF_BUDGET)):
        added = _added(probe + _PRINT)
        assert len(added) <= budget, f"the udev hook imports {len(added)} modules (budget {budget}): {added}"


def test_a_backend_event_with_the_hooks_off_stops_at_the_config() -> None:
    added = _added(BACKEND_OFF + _PRINT)
    xenstore = [m for m in added if m.startswith("xenblockctl.xenstore")]
    assert not xenstore, f"a backend event with the hooks off must not import {xenstore}"
