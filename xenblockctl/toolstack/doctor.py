"""Host checks for `xenblockctl doctor`: each finding says what is wrong and how to fix it.

Severity: `error` = attaching disks cannot work until fixed (doctor exits non-zero); `warning` =
something stale or risky that `gc` or an admin should clean up; `info`/`ok` = for the record.
Read-only: nothing is opened for writing, created or removed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from xenblockctl import config
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.kernel import loop
from xenblockctl.toolstack import gc, host, inventory
from xenblockctl.xenstore.client import XenStore

OK = "ok"
INFO = "info"
WARNING = "warning"
ERROR = "error"
SEVERITY_ORDER = {OK: 0, INFO: 1, WARNING: 2, ERROR: 3}


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    message: str
    fix: str | None = None
    items: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status,
            "message": self.message,
            "fix": self.fix,
            "items": list(self.items),
        }


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


def check_config(env: Environment) -> Finding:
    files = config.config_files(env.variables)
    try:
        config.load(env.variables)
    except XenblockError as exc:
        return Finding("config", ERROR, exc.one_line(), "fix the file (see xenblockctl.conf(5))")
    if not files:
        return Finding("config", OK, "no config file: defaults and XENBLOCKCTL_* environment")
    return Finding("config", OK, f"read {', '.join(files)}")


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


def run(connect: Any, env: Environment) -> tuple[list[Finding], bool]:
    """All checks; `connect()` returns a XenStore or raises. Returns (findings, healthy)."""
    findings = [check_config(env), check_loop_control(), check_loop_devices(), check_kernel()]
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
