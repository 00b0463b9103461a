"""Scenario runner inside the test dom0 (Python 3.11 stdlib only; the host copies it into the 9p share).

Reads the plan the host wrote (plan.json: name, path, timeout per scenario), runs each scenario in its
own process group with a hard timeout, and writes one JSON record per scenario into the results
directory. After each scenario it compares the host state (bound loop devices, vbd backends, domains)
with the state before: anything left behind fails that scenario and is cleaned up, so one leaking
scenario cannot break the next.

Scenario exit status: 0 pass, 77 skip (reason: the last output line starting with "SKIP:"), else fail.
Output lines "XENCI-METRIC: key=value [unit]" are collected into the record as timings to report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

Probe = Callable[[], dict[str, Any]]

SKIP_STATUS = 77
LOG_TAIL_LINES = 80
METRIC = re.compile(r"^XENCI-METRIC:\s*([A-Za-z0-9_.-]+)=(\S+)(?:\s+(\S+))?\s*$")
BACKEND = re.compile(r"^(/local/domain/0/backend/(?:vbd|vbd3|qdisk)/\d+/\d+)\b")


def say(text: str) -> None:
    print(f"XENCI: {text}", flush=True)


def _run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", str(exc))


def bound_loops() -> dict[str, str]:
    """loop device -> backing file, for every bound loop device."""
    found: dict[str, str] = {}
    for entry in sorted(Path("/sys/block").glob("loop*")):
        backing = entry / "loop" / "backing_file"
        if backing.exists():
            found[f"/dev/{entry.name}"] = backing.read_text().strip()
    return found


def vbd_backends() -> set[str]:
    result = _run("xenstore-ls", "-f", "/local/domain/0/backend")
    return {m.group(1) for line in result.stdout.splitlines() if (m := BACKEND.match(line))}


def domains() -> set[str]:
    result = _run("xl", "list")
    names = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.split()}
    return names - {"Domain-0"}


def snapshot() -> dict[str, Any]:
    return {"loops": bound_loops(), "backends": vbd_backends(), "domains": domains()}


def leaks(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for dev in sorted(set(after["loops"]) - set(before["loops"])):
        found.append(f"loop device {dev} -> {after['loops'][dev]}")
    found.extend(f"backend {p}" for p in sorted(after["backends"] - before["backends"]))
    found.extend(f"domain {d}" for d in sorted(after["domains"] - before["domains"]))
    return found


def clean_up(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Best effort: put dom0 back the way it was before the scenario."""
    for dom in sorted(after["domains"] - before["domains"]):
        _run("xl", "destroy", dom, timeout=60)
    for path in sorted(after["backends"] - before["backends"]):
        frontend_dom, devid = path.split("/")[-2:]
        if _run("xl", "block-detach", frontend_dom, devid, timeout=60).returncode != 0:
            _run("xl", "block-detach", "-f", frontend_dom, devid, timeout=60)
        if _run("xenstore-exists", path).returncode == 0:
            _run("xenstore-rm", path)
            _run("xenstore-rm", f"/local/domain/{frontend_dom}/device/vbd/{devid}")
            _run("xenstore-rm", f"/libxl/{frontend_dom}/device/vbd/{devid}")
    for dev in sorted(set(after["loops"]) - set(before["loops"])):
        _run("losetup", "-d", dev)


def _pump(stream: TextIO, log: TextIO, lines: list[str], name: str) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        lines.append(line.rstrip("\n"))
        print(f"[{name}] {line}", end="", flush=True)


def interpreter(path: Path) -> list[str]:
    return ["python3", "-u", str(path)] if path.suffix == ".py" else ["bash", str(path)]


def run_one(entry: dict[str, Any], results: Path, workroot: Path, probe: Probe = snapshot) -> dict[str, Any]:
    """Run one scenario; `probe` reads the state that must be the same before and after it."""
    name: str = entry["name"]
    path = Path(entry["path"])
    timeout = float(entry["timeout"])
    work = workroot / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        XENCI_SCENARIO=name,
        XENCI_WORK=str(work),
        XENCI_CHECKOUT=entry.get("checkout", "/mnt/checkout"),
        XENCI_SCENARIOS=str(path.parent),
    )
    before = probe()
    say(f"BEGIN {name} (timeout {timeout:.0f}s)")
    lines: list[str] = []
    start = time.monotonic()
    timed_out = False
    with (results / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(
            [*interpreter(path), *entry.get("args", [])],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, lines, name), daemon=True)
        pump.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        # Children that outlive the scenario would hold the pipe open: kill the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        pump.join(timeout=5)
    duration = time.monotonic() - start

    after = probe()
    left = leaks(before, after)
    if left:
        clean_up(before, after)

    metrics: dict[str, str] = {}
    for line in lines:
        if m := METRIC.match(line):
            metrics[m.group(1)] = m.group(2) + (f" {m.group(3)}" if m.group(3) else "")

    reason = ""
    if timed_out:
        status, reason = "fail", f"timed out after {timeout:.0f}s"
    elif rc == SKIP_STATUS:
        status = "skip"
        reason = next((ln[5:].strip() for ln in reversed(lines) if ln.startswith("SKIP:")), "skipped")
    elif rc == 0:
        status = "pass"
    else:
        status = "fail"
        reason = next((ln.strip() for ln in reversed(lines) if ln.startswith("FAIL")), f"exit status {rc}")
    if left and status != "fail":
        status = "fail"
        reason = "left behind: " + "; ".join(left)
    elif left:
        reason += "; also left behind: " + "; ".join(left)

    record = {
        "name": name,
        "status": status,
        "rc": rc,
        "duration": round(duration, 3),
        "reason": reason,
        "leaks": left,
        "metrics": metrics,
        "log_tail": lines[-LOG_TAIL_LINES:],
    }
    write_json(results / f"{name}.json", record)
    say(f"RESULT {name} {status} {duration:.1f}s {reason}")
    return record


def write_json(path: Path, data: dict[str, Any]) -> None:
    # Write-then-rename: the host never reads half a record if dom0 dies mid-write.
    tmp = path.with_suffix(".json.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


#: Never copied into dom0: VCS data, host virtualenv and caches (host bytecode, build outputs).
COPY_EXCLUDES = (
    ".git",
    ".venv",
    ".cache",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "*.egg-info",
)


def install_checkout(share: str, dest: str) -> str:
    """Copy the read-only checkout share to a writable place and byte-compile it there.

    The copy is per boot, so scenarios still run the current code; being writable, Python keeps the
    bytecode it compiles, and the first hotplug script does not compile the package inside libxl's
    40 s timeout.
    """
    start = time.monotonic()
    shutil.rmtree(dest, ignore_errors=True)
    Path(dest).mkdir(parents=True)
    excludes = [f"--exclude={pattern}" for pattern in COPY_EXCLUDES]
    pack = subprocess.Popen(["tar", "-C", share, *excludes, "-cf", "-", "."], stdout=subprocess.PIPE)
    unpack = subprocess.run(["tar", "-C", dest, "-xf", "-"], stdin=pack.stdout, check=False)
    assert pack.stdout is not None
    pack.stdout.close()
    if pack.wait() != 0 or unpack.returncode != 0:
        say(f"copying {share} to {dest} failed: scenarios will see a partial checkout")
    copied = time.monotonic() - start
    _run("python3", "-m", "compileall", "-q", f"{dest}/xenblockctl", timeout=300)
    say(f"checkout copied to {dest} in {copied:.1f}s, compiled in {time.monotonic() - start - copied:.1f}s")
    return dest


def main() -> int:
    plan_path = Path(sys.argv[1])
    plan = json.loads(plan_path.read_text())
    results = Path(plan["results"])
    results.mkdir(parents=True, exist_ok=True)
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    info = _run("xl", "info")
    write_json(
        results / "_dom0.json",
        {
            "uptime_at_runner": uptime,
            "kernel": os.uname().release,
            "xl_info_rc": info.returncode,
            "xen_version": next(
                (
                    ln.split(":", 1)[1].strip()
                    for ln in info.stdout.splitlines()
                    if ln.startswith("xen_version")
                ),
                "",
            ),
        },
    )
    say(f"runner start at dom0 uptime {uptime:.1f}s, {len(plan['scenarios'])} scenario(s)")
    checkout = install_checkout(plan["checkout_share"], plan["checkout"])
    for entry in plan["scenarios"]:
        entry["checkout"] = checkout
    failed = 0
    for entry in plan["scenarios"]:
        record = run_one(entry, results, Path(plan.get("workdir", "/root/xenci")))
        failed += record["status"] == "fail"
    say(f"runner done: {failed} failed")
    os.sync()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
