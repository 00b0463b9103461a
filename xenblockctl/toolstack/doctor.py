"""Host checks for `xenblockctl doctor`: each finding says what is wrong and how to fix it.

Severities are findings.py's. The installation (block script, udev, units, man pages: installcheck.py)
is checked under a root, `/` unless told otherwise; the rest looks at the running host.
Read-only: nothing is opened for writing, created or removed."""

from __future__ import annotations

import json
import os
from typing import Any

from xenblockctl import config
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.kernel import loop
from xenblockctl.toolstack import gc, host, installcheck, inventory
from xenblockctl.toolstack.findings import ERROR, INFO, OK, SEVERITY_ORDER, SKIPPED, WARNING, Finding
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.numbers import uint_or_none

__all__ = ["ERROR", "INFO", "OK", "SEVERITY_ORDER", "SKIPPED", "WARNING", "Finding", "run"]


def check_loop_control() -> Finding:
    if not os.path.exists(loop.LOOP_CONTROL):
        return Finding(
            "loop-control", ERROR, f"{loop.LOOP_CONTROL} is missing: no loop driver", "modprobe loop"
        )
    if not os.access(loop.LOOP_CONTROL, os.R_OK | os.W_OK):
        return Finding(
            "loop-control", ERROR, f"{loop.LOOP_CONTROL} is not accessible to this user", "run as root"
        )
    return Finding("loop-control", OK, f"{loop.LOOP_CONTROL} present")


def check_loop_devices() -> Finding:
    # max_loop only sizes the set created at boot (and legacy autoload); LOOP_CTL_GET_FREE adds
    # devices beyond it, so only the counts are reported, never "none free" from max_loop.
    summary = host.loop_summary()
    text = f"{summary.devices} loop devices exist, {summary.bound} bound; more are created on demand"
    return Finding("loop-free", OK, text)


def check_kernel() -> Finding:
    release = host.kernel_release()
    name = os.uname().release
    if release < (5, 8):
        return Finding("diskseq", ERROR, f"Linux {name} lacks LOOP_CONFIGURE (5.8)", "use Linux >= 5.15")
    if release < (5, 15):
        return Finding(
            "diskseq",
            ERROR,
            f"Linux {name} has no diskseq (5.15): devices cannot be verified",
            "use Linux >= 5.15",
        )
    return Finding("diskseq", OK, f"Linux {name} supports LOOP_CONFIGURE and diskseq")


def check_config(env: Environment) -> tuple[Finding, dict[str, config.Value] | None]:
    """The config finding, and the settings (None when they do not load)."""
    try:
        files = config.config_files(env.variables)
        settings = config.load(env.variables)
    except XenblockError as exc:
        return Finding("config", ERROR, exc.one_line(), "fix the file (see xenblockctl.conf(5))"), None
    if not files:
        return Finding("config", OK, "no config file: defaults and XENBLOCKCTL_* environment"), settings
    return Finding("config", OK, f"read {', '.join(files)}"), settings


def check_backend_provider(store: XenStore | None) -> Finding:
    blkback = host.blkback_loaded()
    socket_path = store.endpoint.path if store is not None and store.endpoint.kind == "socket" else None
    engines = host.engine_pids(xenstore_socket=socket_path)
    parts = []
    if blkback:
        parts.append("kernel blkback is loaded")
    if engines:
        parts.append(f"engine running (pid {', '.join(map(str, engines))})")
    if parts:
        return Finding("backend", OK, "; ".join(parts))
    return Finding(
        "backend",
        ERROR,
        "nothing serves backend/vbd: kernel blkback is not loaded and no engine uses this xenstored",
        "modprobe xen-blkback (Xen dom0), or systemctl start xenblockctl-engine",
    )


def check_vbds(vbds: list[inventory.VbdInfo]) -> Finding:
    bad = [v for v in vbds if v.health in ("stale", "failed", "broken", "orphan-frontend")]
    if not bad:
        return Finding("vbds", OK, f"{len(vbds)} vbd(s), none stale or broken")
    items = []
    for v in bad:
        d = v.to_json()
        detail = d["hotplug_error"] or d["backend_error"] or d["identity"]
        items.append(f"{v.location.backend}: {v.health} ({detail})")
    return Finding(
        "vbds",
        WARNING,
        f"{len(bad)} of {len(vbds)} vbd(s) stale or broken",
        "xenblockctl detach DOMAIN VDEV for each, or `xenblockctl gc` for the ones it can prove are ours",
        items,
    )


#: where engines write down what they parked in the service manager's fd store (backend/handover.py:
#: `engine-KIND.parked`, JSON {"pid": N, "parked": ["KIND-DOMID-DEVID", ...]})
RUN_DIR = "/run/xenblockctl"
RUN_DIR_ENV = "XENBLOCKCTL_RUN_DIR"


def check_parked(run_dir: str, vbds: list[inventory.VbdInfo], engines: list[int]) -> list[Finding]:
    """The devices engines parked in the fd store (issue 21): how many, whether their engine still
    runs, and which name no backend any more. Nothing to report without a record."""
    try:
        names = sorted(n for n in os.listdir(run_dir) if n.startswith("engine-") and n.endswith(".parked"))
    except OSError:
        return []
    ours = {(v.location.kind, v.location.domid, v.location.devid): v for v in vbds if v.backend is not None}
    findings = []
    for name in names:
        path = os.path.join(run_dir, name)
        try:
            with open(path, encoding="ascii") as f:
                record = json.load(f)
            pid, parked = int(record["pid"]), [str(p) for p in record["parked"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            findings.append(Finding("parked", WARNING, f"{path}: unreadable ({exc})", f"rm {path}"))
            continue
        stale, held = [], []
        for fdname in parked:
            kind, _, rest = fdname.partition("-")
            domid_text, _, devid_text = rest.partition("-")
            domid, devid = (
                uint_or_none(domid_text, maximum=0x7FEF),
                uint_or_none(devid_text, maximum=0xFFFFFFFF),
            )
            vbd = ours.get((kind, domid, devid)) if domid is not None and devid is not None else None
            if vbd is None:
                stale.append(f"{fdname}: no backend/{kind}/{domid_text}/{devid_text} any more")
            elif vbd.identity == inventory.IDENTITY_MATCH:
                held.append(fdname)  # its device is still there: someone (the store) holds it
        if pid not in engines:
            if not held:
                findings.append(
                    Finding("parked", INFO, f"{path}: engine pid {pid} stopped; what it parked is released")
                )
                continue
            findings.append(
                Finding(
                    "parked",
                    WARNING,
                    f"engine pid {pid} is not running: {len(held)} device(s) it parked are held by the"
                    " service manager until an engine takes them back or the unit stops",
                    "systemctl start xenblockctl-engine (systemctl stop xenblockctl-engine releases them)",
                    held,
                )
            )
        elif stale:
            findings.append(
                Finding(
                    "parked",
                    WARNING,
                    f"{len(stale)} of {len(parked)} device(s) parked by engine pid {pid} name no backend",
                    "the engine's next start releases them (systemctl restart xenblockctl-engine)",
                    stale,
                )
            )
        else:
            findings.append(
                Finding("parked", OK, f"{len(parked)} device(s) parked in the fd store by engine pid {pid}")
            )
    return findings


def run(connect: Any, env: Environment, root: str = "/") -> tuple[list[Finding], bool]:
    """All checks; `connect()` returns a XenStore or raises; the installation is looked for under
    `root`. Returns (findings, healthy)."""
    config_finding, settings = check_config(env)
    findings = [config_finding, check_loop_control(), check_loop_devices(), check_kernel()]
    findings += installcheck.run(root, settings)
    store: XenStore | None = None
    try:
        store = connect()
    except XenblockError as exc:
        findings.append(
            Finding(
                "xenstored",
                ERROR,
                f"xenstored unreachable: {exc.one_line()}",
                "start xenstored (xenstored.service), or point XENSTORED_PATH at a running one "
                "(without Xen: xenblockctl xenstored --socket PATH)",
            )
        )
    try:
        if store is not None:
            findings.append(Finding("xenstored", OK, f"xenstored reachable at {store.endpoint}"))
        findings.append(check_backend_provider(store))
        home_domid = store.own_domid() if store is not None else 0
        vbds = inventory.scan(store, home_domid=home_domid, env=env) if store is not None else []
        if store is not None:
            findings.append(check_vbds(vbds))
            socket_path = store.endpoint.path if store.endpoint.kind == "socket" else None
            engines = host.engine_pids(xenstore_socket=socket_path)
            findings += check_parked(env.variables.get(RUN_DIR_ENV) or RUN_DIR, vbds, engines)
            loops = gc.orphan_loops(vbds, env)
            findings.append(
                Finding(
                    "orphan-loops",
                    WARNING if loops else OK,
                    f"{len(loops)} loop device(s) tagged ours that no backend uses",
                    "xenblockctl gc" if loops else None,
                    [f"{g.name}: {g.reason}" for g in loops],
                )
            )
        dms, why = gc.orphan_dm()
        if why is not None:
            findings.append(Finding("orphan-dm", INFO, f"device-mapper not checked: {why}"))
        else:
            findings.append(
                Finding(
                    "orphan-dm",
                    WARNING if dms else OK,
                    f"{len(dms)} dm device(s) of ours that nobody holds",
                    "xenblockctl gc" if dms else None,
                    [f"{g.name}: {g.reason}" for g in dms],
                )
            )
    finally:
        if store is not None:
            store.close()
    healthy = all(f.status != ERROR for f in findings)
    return findings, healthy
