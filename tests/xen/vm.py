"""One boot of Xen + dom0 under QEMU/TCG that runs the scenario files and brings their records back.

The host stages a 9p share (plan.json, the guest runner, test.sh, the .deb and wheel built from the
checkout for this run in pkg/, results/), shares the checkout read-only as a second 9p mount (the
scenario scripts come from there), boots, and reads results/*.json after QEMU exits. Nothing is inferred
from QEMU's exit status: it exits 0 for a clean power-off and for a crashed dom0 alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.xen.image import Dom0Image

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[1]
SCENARIO_DIR = HERE / "scenarios"
GUEST_RUNNER = HERE / "guest" / "run_scenarios.py"
GUEST_CHECKOUT = "/mnt/checkout"
GUEST_SHARE = "/mnt/host"
#: Where the guest runner copies the scenario scripts (the package itself is installed with apt).
GUEST_SCENARIOS = "/opt/xenci-scenarios"
QEMU = "qemu-system-x86_64"
SCENARIO_FILE = re.compile(r"^(\d\d_[A-Za-z0-9_-]+)\.(sh|py)$")
TIMEOUT_HEADER = re.compile(r"^#\s*xenci-timeout:\s*(\d+)\s*$", re.M)
FULL_TIMEOUT_HEADER = re.compile(r"^#\s*xenci-full-timeout:\s*(\d+)\s*$", re.M)
DEFAULT_SCENARIO_TIMEOUT = 240
#: QEMU start -> "ready" marker. Idle it takes ~20 s; TCG on a loaded 2-core host is much slower.
BOOT_TIMEOUT = 600.0
#: A boot whose console says nothing for this long before "ready" has hung, and is tried once more
#: from the pristine image: dom0's kernel once stopped for good right after "sched_clock: Marking
#: stable" at 14 s (lane24b; the boots before and after it were ready in ~45 s), and waiting out
#: BOOT_TIMEOUT would have failed every scenario of the run.
BOOT_STALL = 180.0
BOOT_ATTEMPTS = 2
#: The lane's two jobs (environment XENBLOCKCTL_XEN_LANE). "check", the default and what CI runs:
#: every scenario's checks, each engine variant's data through real blkfront once, a shorter soak,
#: the migration's two diagonal cases. "full": also the measurements (scenario 12's rounds and
#: probes, 11's A/B boots, 18's ABBA boots), the 1 GiB soak and every migration case, and what
#: another scenario checks in every run (24's live migration, which TCG never completes; 15's
#: reboot and save/restore on blkback; 21's read-only hot-plugs; 16's final pass). With all of it
#: the lane took a slow 2-core CI machine past its hour (stop 37: cut at 3600 s in scenario 21 of
#: 28; stop 38, check mode: cut in scenario 28). Speed is read from benchmarks, not from the test
#: run: bench/README.md "On real Xen".
LANE_MODE_ENV = "XENBLOCKCTL_XEN_LANE"
LANE_MODES = ("check", "full")
#: However many scenarios there are, a hung dom0 must not eat CI's 90-minute budget: a cold image
#: build (3 min) and the rest of the suite (20 min on a slow host) leave an hour for the check lane.
#: A full run is started by hand: bounded, but by its scenarios' own timeouts.
GUEST_TIMEOUT_CAP = 3600
FULL_GUEST_TIMEOUT_CAP = 4 * 3600
READY_MARKER = "XENCI: ready"
RESULT_MARKER = re.compile(r"XENCI: RESULT (\S+) (\S+)")
PR_SET_PDEATHSIG = 1
#: One lane VM at a time per machine (the dm lane may take the same lock): two TCG VMs on 2 cores
#: slow each other until libxl's 40 s hotplug timeout kills the stock block script (observed), so
#: concurrent pytest sessions queue here.
BOOT_LOCK = Path("/run/lock/xenblockctl-qemu-lane.lock")


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    #: seconds in a check run (CI)
    timeout: int
    #: seconds in a full run; the check timeout if the header is absent
    full_timeout: int = 0

    def timeout_in(self, mode: str) -> int:
        return max(self.full_timeout, self.timeout) if mode == "full" else self.timeout


def lane_mode() -> str:
    """The job this run does: LANE_MODE_ENV, "check" when unset. Anything else is a mistake, said."""
    mode = os.environ.get(LANE_MODE_ENV, "check")
    if mode not in LANE_MODES:
        raise ValueError(f"{LANE_MODE_ENV}={mode!r}: expected one of {', '.join(LANE_MODES)}")
    return mode


def discover(directory: Path = SCENARIO_DIR) -> list[Scenario]:
    """Scenario files are NN_name.sh / NN_name.py; other files (helpers) are not run."""
    found: list[Scenario] = []
    for path in sorted(directory.iterdir()):
        m = SCENARIO_FILE.match(path.name)
        if not m or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        timeouts = []
        for pattern, default in ((TIMEOUT_HEADER, DEFAULT_SCENARIO_TIMEOUT), (FULL_TIMEOUT_HEADER, 0)):
            header = pattern.search(text[:2000])
            if header is None and pattern.search(text):  # would silently run at the default
                raise ValueError(f"{path.name}: move its timeout header into the first 2000 characters")
            timeouts.append(int(header.group(1)) if header else default)
        found.append(Scenario(m.group(1), path, *timeouts))
    return found


def qemu_problem() -> str | None:
    """Why QEMU cannot run here, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt package qemu-system-x86; ./dev setup installs it)"
    try:
        probe = subprocess.run([QEMU, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{QEMU} does not run: {exc}"
    if probe.returncode != 0:
        return f"{QEMU} -version failed: {probe.stderr.strip()[:200]}"
    return None


@dataclass(frozen=True)
class Packages:
    """What this run installs in dom0, built from the checkout into the share (see conftest)."""

    deb: Path
    wheel: Path


@dataclass
class LaneRun:
    """What one boot produced. `records` holds only what dom0 wrote back."""

    share: Path
    serial_log: Path
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    dom0: dict[str, Any] = field(default_factory=dict)
    runner_rc: int | None = None
    qemu_rc: int | None = None
    #: QEMU start -> dom0's CI init reports xl usable
    boot_seconds: float | None = None
    qemu_seconds: float = 0.0
    #: why the host stopped QEMU early, if it did
    killed: str = ""
    #: scenario name -> seconds since QEMU start when its RESULT line appeared on the console
    seen: dict[str, float] = field(default_factory=dict)
    #: consoles of boots that hung before "ready" and were tried again (BOOT_STALL)
    stalled: list[Path] = field(default_factory=list)

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.serial_log.read_text(errors="replace").replace("\r", "")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def why_missing(self) -> str:
        if self.killed:
            return self.killed
        if self.runner_rc is None:
            return f"dom0 wrote no exit status (QEMU exit {self.qemu_rc}): crashed or hung before the end"
        return "dom0 finished but wrote no record for this scenario"


def _in_share(share: Path, path: Path) -> str:
    """A file staged in the share, as dom0 sees it."""
    return f"{GUEST_SHARE}/{path.relative_to(share)}"


def stage(
    share: Path, scenarios: list[Scenario], packages: Packages | None = None, mode: str = "check"
) -> int:
    """Fill the 9p share for one boot; return the guest-side timeout for all scenarios. Without
    `packages` the runner installs nothing and fails every scenario, saying so. `mode`: LANE_MODES."""
    results = share / "results"
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(GUEST_RUNNER, share / "run_scenarios.py")
    plan = {
        "results": f"{GUEST_SHARE}/results",
        "workdir": "/root/xenci",
        "scenarios_share": f"{GUEST_CHECKOUT}/{SCENARIO_DIR.relative_to(CHECKOUT)}",
        "scenarios_dir": GUEST_SCENARIOS,
        "deb": _in_share(share, packages.deb) if packages else "",
        "wheel": _in_share(share, packages.wheel) if packages else "",
        # our units the package enabled are started as at boot (no systemd in dom0)
        "wants": "/etc/systemd/system/multi-user.target.wants",
        # dom0 has no journald or syslogd: the runner collects /dev/log (the workers' CLIENT_PID lines)
        "syslog": "/dev/log",
        # scenarios read it as XENCI_MODE (lib.sh's full_lane)
        "mode": mode,
        "scenarios": [
            {
                "name": s.name,
                "path": f"{GUEST_SCENARIOS}/{s.path.name}",
                "timeout": s.timeout_in(mode),
            }
            for s in scenarios
        ],
    }
    (share / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    test_sh = share / "test.sh"
    test_sh.write_text(f"#!/bin/sh\nexec python3 -u {GUEST_SHARE}/run_scenarios.py {GUEST_SHARE}/plan.json\n")
    test_sh.chmod(0o755)
    # Per-scenario limits, room for the runner's leak checks and clean-ups, and for installing the
    # package (apt-get, py3compile).
    cap = FULL_GUEST_TIMEOUT_CAP if mode == "full" else GUEST_TIMEOUT_CAP
    return min(sum(s.timeout_in(mode) + 30 for s in scenarios) + 360, cap)


def qemu_argv(image: Dom0Image, share: Path, serial: Path, guest_timeout: int) -> list[str]:
    # -cpu qemu64 has no SMAP: with SMAP emulated, Xen crashes the PV dom0 in create_bounce_frame.
    # smap=0 keeps a later -cpu max safe. No `noreboot`: a dom0 crash then makes Xen reboot, which
    # -no-reboot turns into a prompt QEMU exit instead of a hang until the timeout.
    xen_cmdline = (
        "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 smap=0 "
        "loglvl=all guest_loglvl=all"
    )
    dom0_cmdline = (
        f"console=hvc0 earlyprintk=xen root=/dev/vda rw init=/sbin/xen-ci-init xenci.timeout={guest_timeout}"
    )
    return [
        QEMU,
        "-machine", "pc,accel=tcg",
        "-cpu", "qemu64",
        "-smp", "2",
        "-m", "3G",
        "-display", "none",
        "-vga", "none",
        "-no-reboot",
        "-nic", "none",
        "-kernel", str(image.xen),
        "-append", xen_cmdline,
        # Multiboot modules, comma-separated: dom0 kernel with its command line, then its initrd.
        "-initrd", f"{image.kernel} {dom0_cmdline},{image.initrd}",
        # snapshot=on: every boot starts from the pristine cached image.
        "-drive", f"file={image.disk},if=virtio,format=raw,cache=unsafe,snapshot=on",
        "-virtfs", f"local,path={share},mount_tag=hostshare,security_model=none,id=hostshare",
        "-virtfs",
        f"local,path={CHECKOUT},mount_tag=checkout,security_model=none,id=checkout,readonly=on,multidevs=remap",
        "-serial", f"file:{serial}",
        "-monitor", "none",
    ]  # fmt: skip


def _die_with_parent() -> None:
    # If pytest itself is SIGKILLed, the kernel kills QEMU too: no orphan VM burning both cores.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def boot(
    image: Dom0Image,
    share: Path,
    scenarios: list[Scenario],
    *,
    host_timeout: float | None = None,
    boot_timeout: float = BOOT_TIMEOUT,
    boot_stall: float = BOOT_STALL,
    progress: Callable[[str], None] | None = None,
    packages: Packages | None = None,
    mode: str = "check",
) -> LaneRun:
    """Boot once, install `packages` and run `scenarios` inside dom0, collect their records. QEMU is
    always reaped."""
    lock_path = BOOT_LOCK if BOOT_LOCK.parent.is_dir() and os.access(BOOT_LOCK.parent, os.W_OK) else None
    with contextlib.ExitStack() as stack:
        if lock_path is not None:
            lock = stack.enter_context(lock_path.open("w"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    progress(f"another Xen lane VM is running on this machine: waiting for {lock_path}")
                fcntl.flock(lock, fcntl.LOCK_EX)
        return _boot_locked(
            image,
            share,
            scenarios,
            host_timeout=host_timeout,
            boot_timeout=boot_timeout,
            boot_stall=boot_stall,
            progress=progress,
            packages=packages,
            mode=mode,
        )


def _boot_locked(
    image: Dom0Image,
    share: Path,
    scenarios: list[Scenario],
    *,
    host_timeout: float | None,
    boot_timeout: float,
    boot_stall: float,
    progress: Callable[[str], None] | None,
    packages: Packages | None,
    mode: str,
) -> LaneRun:
    guest_timeout = stage(share, scenarios, packages, mode)
    serial = share.parent / f"{share.name}-console.log"
    run = LaneRun(share=share, serial_log=serial)
    argv = qemu_argv(image, share, serial, guest_timeout)
    (share.parent / f"{share.name}-qemu.argv").write_text(" ".join(argv) + "\n")
    deadline_total = host_timeout if host_timeout is not None else guest_timeout + boot_timeout + 60
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        stalled = _run_qemu(
            run,
            argv,
            deadline_total=deadline_total,
            boot_timeout=boot_timeout,
            boot_stall=boot_stall if attempt < BOOT_ATTEMPTS else float("inf"),
            progress=progress,
        )
        if stalled is None:
            break
        # Kept beside the run's console; nothing ran in dom0 yet, so the share is as staged.
        kept = serial.with_name(f"{serial.stem}.stalled-{attempt}.log")
        serial.replace(kept)
        run.stalled.append(kept)
        if progress:
            progress(
                f"dom0 silent for {boot_stall:.0f}s at {stalled:.0f}s into its boot, before ready:"
                f" booting again ({kept})"
            )
    collect(run)
    return run


def _run_qemu(
    run: LaneRun,
    argv: list[str],
    *,
    deadline_total: float,
    boot_timeout: float,
    boot_stall: float,
    progress: Callable[[str], None] | None,
) -> float | None:
    """One QEMU, always reaped; the seconds into it at which it was found stalled before "ready"
    (then `run` holds nothing of it but its console), else None."""
    serial = run.serial_log
    serial.write_bytes(b"")
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(serial.parent / f"{run.share.name}-qemu.stderr").open("wb"),
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, no locks taken
    )
    offset = 0
    pending = ""
    heard = 0.0
    stalled: float | None = None
    try:
        while True:
            now = time.monotonic() - start
            with serial.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            if chunk:
                heard = now
            pending += chunk.decode(errors="replace").replace("\r", "")
            *complete, pending = pending.split("\n")
            for line in complete:
                if run.boot_seconds is None and READY_MARKER in line:
                    run.boot_seconds = now
                    if progress:
                        progress(f"dom0 ready after {now:.1f}s")
                if m := RESULT_MARKER.search(line):
                    run.seen[m.group(1)] = now
                    if progress:
                        progress(f"{m.group(1)}: {m.group(2)} at {now:.1f}s")
            rc = proc.poll()
            if rc is not None:
                run.qemu_rc = rc
                break
            if run.boot_seconds is None and now - heard > boot_stall:
                stalled = now
                break
            if run.boot_seconds is None and now > boot_timeout:
                run.killed = f"dom0 did not report ready within {boot_timeout:.0f}s of QEMU start"
                break
            if now > deadline_total:
                run.killed = f"host timeout: QEMU still running after {deadline_total:.0f}s"
                break
            time.sleep(0.25)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        run.qemu_seconds = time.monotonic() - start
    return stalled


def keep_last_run(run: LaneRun, dest: Path) -> Path | None:
    """Copy the console log and records somewhere stable: pytest rotates its tmp dirs away quickly."""
    tmp = dest.with_name(dest.name + ".new")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run.share / "results", tmp / "results")
        if run.serial_log.exists():
            shutil.copy(run.serial_log, tmp / "console.log")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return dest


def collect(run: LaneRun) -> None:
    """Read back what dom0 wrote; a half-written (.tmp) record is ignored."""
    results = run.share / "results"
    rc_file = results / "rc"
    if rc_file.is_file():
        text = rc_file.read_text().strip()
        run.runner_rc = int(text) if text.lstrip("-").isdigit() else None
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path.name == "_dom0.json":
            run.dom0 = data
        elif isinstance(data, dict) and data.get("name") == path.stem:
            run.records[path.stem] = data
