"""Stamp a pvgrub boot's xenstore events as they arrive, for pvgrub.sh's phase split (issue 20).

    python3 phase_stamp.py OUT [ENGINE_PID]

Watches /local/domain and appends to OUT one line per write to a vbd 51712 backend's `state`,
`physical-device` or `hotplug-status`, a frontend's `state` or a guest's `data/xenci-phase`:

    UPTIME KIND VALUE BUSY IDLE STEAL ENGINE

UPTIME is dom0's /proc/uptime (the engine log's clock), KIND be|fe|pdev|hotplug|phase, VALUE the node
read right after the event ("gone" if it went), BUSY/IDLE/STEAL dom0's /proc/stat ticks and ENGINE
the engine's utime + stime ticks ("-" without one). Writes OUT + ".ready" once the watch is set;
runs until killed.

Why not the shell loop it replaces: a shell stamps an event only when it gets to it, and it forked
`xenstore-read` for every matched event (and an `awk` for the engine's CPU): under TCG each fork is
tens of milliseconds, so every later stamp lagged the ones before it, by seconds on a loaded host
(ci20: the engine logged InitWait 0.4-2.3 s before the shell stamped it). Here the stamp is taken
when the event is dequeued and the value is read in-process, one round trip to xenstored."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from xenblockctl.xenstore.client import XenStore

KINDS = (
    (re.compile(r"/local/domain/0/backend/vbd/\d+/51712/state"), "be"),
    (re.compile(r"/local/domain/0/backend/vbd/\d+/51712/physical-device"), "pdev"),
    (re.compile(r"/local/domain/0/backend/vbd/\d+/51712/hotplug-status"), "hotplug"),
    (re.compile(r"/local/domain/\d+/device/vbd/51712/state"), "fe"),
    (re.compile(r"/local/domain/\d+/data/xenci-phase"), "phase"),
)
TOKEN = "xenci-phase-stamp"


def kind_of(path: str) -> str | None:
    return next((kind for pattern, kind in KINDS if pattern.fullmatch(path)), None)


def cpu(engine_pid: str | None) -> str:
    """dom0's busy, idle and steal ticks and the engine's CPU ticks, as the shell stamper wrote them."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    engine = "-"
    if engine_pid:
        try:
            stat = Path(f"/proc/{engine_pid}/stat").read_text()
        except OSError:
            pass
        else:
            after = stat.rsplit(") ", 1)[1].split()  # utime and stime: fields 14 and 15
            engine = str(int(after[11]) + int(after[12]))
    return f"{user + nice + system + irq + softirq} {idle + iowait} {steal} {engine}"


def uptime() -> str:
    return Path("/proc/uptime").read_text().split()[0]


def main(argv: list[str]) -> int:
    out_path = argv[1]
    engine_pid = argv[2] if len(argv) > 2 and argv[2] else None
    with XenStore.connect() as store, open(out_path, "a", buffering=1) as out:
        store.watch("/local/domain", TOKEN)
        Path(out_path + ".ready").write_text("ready\n")
        while True:
            event = store.wait_watch(3600)
            if event is None:
                continue
            kind = kind_of(event.path)
            if kind is None:
                continue
            up = uptime()
            value = store.read_optional(event.path)
            out.write(f"{up} {kind} {'gone' if value is None else value} {cpu(engine_pid)}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
