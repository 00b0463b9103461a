"""Scenario runner inside the test dom0 (Python 3.11 stdlib only; the host copies it into the 9p share).

Reads the plan the host wrote (plan.json: name, path, timeout per scenario; the .deb and wheel the
host built from the checkout for this run), installs the .deb with apt as an admin would, copies the
scenario scripts out of the read-only checkout share, and runs each scenario in its own process group
with a hard timeout, writing one JSON record per scenario into the results directory. After each
scenario it compares the host state (bound loop devices, vbd backends, domains) with the state
before: anything left behind fails that scenario and is cleaned up, so one leaking scenario cannot
break the next.

Scenario exit status: 0 pass, 77 skip (reason: the last output line starting with "SKIP:"), else fail.
Output lines "XENCI-METRIC: key=value [unit]" are collected into the record as timings to report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
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
        # read, not exists() then read: a loop device whose last opener a timed-out scenario's
        # killpg just closed auto-clears between the two (the runner died of it once, losing
        # the scenario's record)
        try:
            found[f"/dev/{entry.name}"] = (entry / "loop" / "backing_file").read_text().strip()
        except FileNotFoundError:
            continue
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
    started = time.monotonic()
    for line in stream:
        log.write(line)
        log.flush()
        lines.append(line.rstrip("\n"))
        # seconds into the scenario on the console: where a lane's hour went, read from one run
        print(f"[{name} +{time.monotonic() - started:.0f}s] {line}", end="", flush=True)


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
    # No XENCI_CHECKOUT: scenarios use the installed package, never the checkout's Python files.
    env.update(
        XENCI_SCENARIO=name,
        XENCI_WORK=str(work),
        XENCI_SCENARIOS=str(path.parent),
        XENCI_DEB=entry.get("deb", ""),
        XENCI_WHEEL=entry.get("wheel", ""),
        # "check" (CI) or "full" (the measurements too): lib.sh's full_lane
        XENCI_MODE=entry.get("mode", "check"),
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


#: Never copied into dom0: host bytecode and caches.
COPY_EXCLUDES = ("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis")


def copy_scenarios(share: str, dest: str) -> str:
    """Copy the scenario scripts from the read-only checkout share to a writable place (per boot, so
    they are the current ones; writable, so a Python helper keeps the bytecode it compiles)."""
    start = time.monotonic()
    shutil.rmtree(dest, ignore_errors=True)
    Path(dest).mkdir(parents=True)
    excludes = [f"--exclude={pattern}" for pattern in COPY_EXCLUDES]
    pack = subprocess.Popen(["tar", "-C", share, *excludes, "-cf", "-", "."], stdout=subprocess.PIPE)
    unpack = subprocess.run(["tar", "-C", dest, "-xf", "-"], stdin=pack.stdout, check=False)
    assert pack.stdout is not None
    pack.stdout.close()
    if pack.wait() != 0 or unpack.returncode != 0:
        say(f"copying {share} to {dest} failed: scenarios will see a partial copy")
    say(f"scenarios copied to {dest} in {time.monotonic() - start:.1f}s")
    return dest


def install_package(deb: str, log: Path) -> str:
    """`apt-get install` the .deb built on the host, offline (its dependencies are in the image).
    Returns "" on success, else why it failed. The package's postinst byte-compiles it, so the first
    hotplug script does not compile the package inside libxl's 40 s timeout."""
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "Dpkg::Use-Pty=0", deb]
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
        output, rc = result.stdout + result.stderr, result.returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        output, rc = str(exc), 127
    log.write_text(output)
    if rc != 0:
        tail = " | ".join(output.strip().splitlines()[-5:])
        say(f"installing {deb} FAILED (exit {rc}): {tail}")
        return f"apt-get install {Path(deb).name} exited {rc}: {tail}"
    say(f"installed {Path(deb).name} with apt-get in {time.monotonic() - start:.1f}s")
    return ""


#: Our units the package enabled are started as systemd would at boot (dom0's PID 1 is xen-ci-init,
#: no systemd): today the warm hotplug server, so VM starts go through it as on a real host.
UNIT_PREFIX = "xenblockctl-"


def unit_settings(text: str) -> dict[str, str]:
    """The [Service] keys a start needs (ExecStart, RuntimeDirectory, UMask, Restart), last wins."""
    found: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if key in ("ExecStart", "RuntimeDirectory", "UMask", "Restart"):
                found[key] = value
    return found


class Unit:
    """One enabled unit of ours started like systemd's Type=simple: its own session, RuntimeDirectory
    made (0755, root's), its UMask, output to results/_<unit>.log; with Restart=on-failure started
    again when it exits non-zero (the hotplug server exits so when an upgrade made its code stale)."""

    def __init__(self, name: str, text: str, results: Path) -> None:
        self.name = name
        self.settings = unit_settings(text)
        self.log = results / f"_{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.restarts = 0

    def watch(self) -> None:
        """Restart=on-failure, in a thread: a failed restart is said and ends the watch."""
        if self.settings.get("Restart") != "on-failure":
            return

        def loop() -> None:
            while not self.stopping.wait(1.0):
                proc = self.proc
                if proc is None or proc.poll() in (None, 0):
                    continue
                say(f"unit {self.name} exited {proc.returncode}: restarting (Restart=on-failure)")
                self.restarts += 1
                problem = self.start()
                if problem:
                    say(f"unit {self.name} did not restart: {problem}")
                    return

        threading.Thread(target=loop, daemon=True).start()

    def start(self) -> str:
        """ "" once it runs, else why it does not."""
        argv = shlex.split(self.settings.get("ExecStart", ""))
        if not argv:
            return "no ExecStart="
        for directory in self.settings.get("RuntimeDirectory", "").split():
            os.makedirs(f"/run/{directory}", mode=0o755, exist_ok=True)
        mask = int(self.settings.get("UMask", "0022"), 8)
        with self.log.open("ab") as out:
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    umask=mask,
                    cwd="/",
                )
            except OSError as exc:
                return f"cannot start {argv[0]}: {exc}"
        time.sleep(2)  # no readiness protocol (Type=simple): a quick death is a failed start
        if self.proc.poll() is not None:
            return f"exited {self.proc.returncode} at once: {self.tail()}"
        return ""

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (systemctl stop, KillMode=process: only the main process) and its last lines."""
        self.stopping.set()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        say(
            f"unit {self.name} stopped (exit {self.proc.returncode}, {self.restarts} restarts); "
            f"its log ends: {self.tail()}"
        )


def start_enabled_units(wants: str, results: Path) -> list[Unit]:
    """Start our units enabled in `wants` (multi-user.target.wants), each logged; a unit that does
    not start is said here and its scenarios run without it (as on a host where it failed)."""
    started: list[Unit] = []
    directory = Path(wants)
    names = sorted(p.name for p in directory.glob(f"{UNIT_PREFIX}*.service")) if directory.is_dir() else []
    say(f"enabled units of ours in {wants}: {' '.join(names) or 'none'}")
    for name in names:
        try:
            text = (directory / name).read_text()
        except OSError as exc:
            say(f"unit {name}: cannot read it: {exc}")
            continue
        unit = Unit(name, text, results)
        problem = unit.start()
        if problem:
            say(f"unit {name} did not start: {problem}")
            continue
        say(f"unit {name} started: pid {unit.proc.pid if unit.proc else '?'}, {unit.settings['ExecStart']}")
        unit.watch()
        started.append(unit)
    return started


class Syslog:
    """A /dev/log for dom0 (no journald, no syslogd): every line our journal module sends lands in
    results/_syslog.log at the end, so the host can see which process did what (the hotplug
    workers' lines carry CLIENT_PID=, the pid of the client libxl ran). Written to tmpfs while the
    scenarios run: a sender blocks when the queue is full, and 9p writes under TCG are slow."""

    def __init__(self, path: str, results: Path) -> None:
        self.path = path
        self.out = Path(f"{path}.xenci")  # beside the socket: /dev is a tmpfs
        self.results = results / "_syslog.log"
        self.sock: socket.socket | None = None

    def start(self) -> None:
        if os.path.exists(self.path):
            say(f"{self.path} exists: its lines go to its own reader")
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        threading.Thread(target=self._pump, daemon=True).start()
        say(f"collecting {self.path} into {self.out}")

    def _pump(self) -> None:
        assert self.sock is not None
        with self.out.open("ab") as out:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    return
                out.write(data.rstrip(b"\n") + b"\n")
                out.flush()

    def finish(self, needle: bytes) -> int:
        """Copy the lines to the results; how many hold `needle`."""
        try:
            data = self.out.read_bytes()
        except OSError:
            return 0
        self.results.write_bytes(data)
        return sum(needle in line for line in data.splitlines())


def not_run(entry: dict[str, Any], results: Path, reason: str) -> dict[str, Any]:
    """The record of a scenario that could not start: it fails, with the reason."""
    record = {
        "name": entry["name"],
        "status": "fail",
        "rc": None,
        "duration": 0.0,
        "reason": reason,
        "leaks": [],
        "metrics": {},
        "log_tail": [],
    }
    write_json(results / f"{entry['name']}.json", record)
    say(f"RESULT {entry['name']} fail 0.0s {reason}")
    return record


def main(argv: list[str], probe: Probe = snapshot) -> int:
    """`probe` as for run_one (host tests pass one that never looks at the host's real devices)."""
    plan_path = Path(argv[0])
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
    say(
        f"runner start at dom0 uptime {uptime:.1f}s, {len(plan['scenarios'])} scenario(s),"
        f" {plan.get('mode', 'check')} mode"
    )
    copy_scenarios(plan["scenarios_share"], plan["scenarios_dir"])
    deb = plan.get("deb", "")
    syslog = Syslog(plan["syslog"], results) if plan.get("syslog") else None
    if syslog is not None:
        syslog.start()
    problem = install_package(deb, results / "_install.log") if deb else "the host staged no .deb"
    units = [] if problem or not plan.get("wants") else start_enabled_units(plan["wants"], results)
    failed = 0
    for entry in plan["scenarios"]:
        entry.update(deb=deb, wheel=plan.get("wheel", ""), mode=plan.get("mode", "check"))
        if problem:
            record = not_run(entry, results, f"xenblockctl not installed: {problem}")
        else:
            record = run_one(entry, results, Path(plan.get("workdir", "/root/xenci")), probe)
        failed += record["status"] == "fail"
    for unit in units:
        unit.stop()
    if syslog is not None:
        # the hotplug workers' lines: VM starts that went through the warm server
        workers = syslog.finish(b"CLIENT_PID=")
        say(f"syslog: {workers} lines with CLIENT_PID= (hotplug server workers), in {syslog.results}")
    say(f"runner done: {failed} failed")
    os.sync()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
