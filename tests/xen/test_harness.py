"""The Xen lane's own machinery, tested on the host without QEMU: cache key, scenario discovery, the
guest runner's verdicts and leak guard, result collection, and that a VM process is always reaped."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.xen import image as dom0_image
from tests.xen import vm
from tests.xen.guest import run_scenarios as runner


def test_recipe_key_follows_every_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "image"
    shutil.copytree(dom0_image.RECIPE_DIR, recipe)
    key = dom0_image.recipe_key(recipe)
    assert key == dom0_image.recipe_key(dom0_image.RECIPE_DIR)
    with (recipe / "packages").open("a") as f:
        f.write("xxd\n")
    edited = dom0_image.recipe_key(recipe)
    assert edited != key
    (recipe / "packages").chmod(0o755)
    assert dom0_image.recipe_key(recipe) != edited


def test_cache_entry_is_complete_only_with_every_file(tmp_path: Path) -> None:
    entry = tmp_path / "k"
    for name in dom0_image.REQUIRED_FILES:
        (entry / name).parent.mkdir(parents=True, exist_ok=True)
        (entry / name).write_bytes(b"x")
    assert not dom0_image.is_complete(entry), "build.json is written last and marks completion"
    (entry / "build.json").write_text("{}")
    assert dom0_image.is_complete(entry)
    (entry / "dom0.img").unlink()
    assert not dom0_image.is_complete(entry)


def test_discover_takes_numbered_scripts_and_their_timeout(tmp_path: Path) -> None:
    (tmp_path / "01_first.sh").write_text("# xenci-timeout: 33\n# xenci-full-timeout: 99\ntrue\n")
    (tmp_path / "02_second.py").write_text("print('hi')\n")
    (tmp_path / "lib.sh").write_text("helpers\n")
    (tmp_path / "3_bad.sh").write_text("true\n")
    found = vm.discover(tmp_path)
    assert [(s.name, s.timeout_in("check"), s.timeout_in("full")) for s in found] == [
        ("01_first", 33, 99),
        ("02_second", vm.DEFAULT_SCENARIO_TIMEOUT, vm.DEFAULT_SCENARIO_TIMEOUT),
    ]


def test_the_lane_mode_is_check_unless_full_is_asked_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(vm.LANE_MODE_ENV, raising=False)
    assert vm.lane_mode() == "check"
    monkeypatch.setenv(vm.LANE_MODE_ENV, "full")
    assert vm.lane_mode() == "full"
    monkeypatch.setenv(vm.LANE_MODE_ENV, "fast")
    with pytest.raises(ValueError, match=r"XENBLOCKCTL_XEN_LANE='fast': expected one of check, full"):
        vm.lane_mode()


def test_a_timeout_header_past_the_first_2000_characters_stops_discovery(tmp_path: Path) -> None:
    """Read only from the top, a late header used to drop the scenario to the default timeout
    without a word (issue 14, lane note): now the lane refuses to start, naming the file."""
    long_comment = "".join(f"# line {i} of a long explanation\n" for i in range(80))
    (tmp_path / "01_long.sh").write_text(f"#!/usr/bin/env bash\n{long_comment}# xenci-timeout: 900\ntrue\n")
    with pytest.raises(ValueError, match=r"01_long.sh: move its timeout header into the first 2000"):
        vm.discover(tmp_path)
    (tmp_path / "01_long.sh").write_text(f"# xenci-timeout: 60\n{long_comment}# xenci-full-timeout: 900\n")
    with pytest.raises(ValueError, match=r"01_long.sh: move its timeout header into the first 2000"):
        vm.discover(tmp_path)


def test_shipped_scenarios_are_discovered() -> None:
    names = [s.name for s in vm.discover()]
    assert names[:4] == ["01_dom0_up", "02_stock_block_script", "03_failing_script", "04_xenblockctl_script"]


def _no_state() -> dict[str, Any]:
    return {"loops": {}, "backends": set(), "domains": set()}


def _run(tmp_path: Path, body: str, timeout: int = 20, probe: runner.Probe = _no_state) -> dict[str, Any]:
    script = tmp_path / "99_case.sh"
    script.write_text(body)
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    entry = {"name": "99_case", "path": str(script), "timeout": timeout}
    record = runner.run_one(entry, results, tmp_path / "work", probe=probe)
    assert json.loads((results / "99_case.json").read_text()) == record
    return record


def test_runner_verdicts(tmp_path: Path) -> None:
    passed = _run(tmp_path, 'echo XENCI-METRIC: attach_s=1.5 s\necho "work=$XENCI_WORK"\nexit 0\n')
    assert passed["status"] == "pass"
    assert passed["metrics"] == {"attach_s": "1.5 s"}
    assert f"work={tmp_path / 'work' / '99_case'}" in passed["log_tail"]

    failed = _run(tmp_path, "echo 'FAIL: the disk is gone'\nexit 1\n")
    assert (failed["status"], failed["reason"]) == ("fail", "FAIL: the disk is gone")

    crashed = _run(tmp_path, "exit 3\n")
    assert (crashed["status"], crashed["reason"]) == ("fail", "exit status 3")

    skipped = _run(tmp_path, "echo 'SKIP: not yet'\nexit 77\n")
    assert (skipped["status"], skipped["reason"]) == ("skip", "not yet")


def test_runner_kills_a_hung_scenario_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    record = _run(tmp_path, f"sleep 300 & echo $! > {pidfile}\nsleep 300\n", timeout=1)
    assert time.monotonic() - start < 15
    assert record["status"] == "fail"
    assert "timed out" in record["reason"]
    _assert_gone(int(pidfile.read_text()))


def _assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # killed, waiting for its (re)parent to reap it
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still alive")


@pytest.mark.root
def test_runner_fails_and_cleans_a_leaked_loop_device(tmp_path: Path) -> None:
    backing = tmp_path / "leak.img"
    backing.write_bytes(b"\0" * (1 << 20))

    def probe() -> dict[str, Any]:
        # Only this test's file: other tests on the host may hold loop devices of their own.
        loops = {dev: f for dev, f in runner.bound_loops().items() if f.startswith(str(tmp_path))}
        return {"loops": loops, "backends": set(), "domains": set()}

    try:
        record = _run(tmp_path, f"losetup -f --show {backing}\n", probe=probe)
        assert record["status"] == "fail"
        assert record["reason"].startswith("left behind: loop device /dev/loop")
        assert probe()["loops"] == {}, "the runner must unbind what the scenario leaked"
    finally:
        for dev in probe()["loops"]:
            subprocess.run(["losetup", "-d", dev], check=False)


def test_runner_takes_a_loop_device_that_clears_while_it_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop device auto-cleared between the runner's look and its read (a timed-out scenario's
    killpg closed its last opener) is one no longer bound, not the runner's death: it once died
    of it and lost the scenario's record. Every unbound minor plays that device here, as if it had
    said it was bound a moment before (the instant the kernel cannot be asked to produce)."""
    unbound = [p for p in Path("/sys/block").glob("loop*") if not (p / "loop" / "backing_file").exists()]
    if not unbound:
        pytest.skip("no unbound loop minor on this host to play the device that just cleared")
    real_exists = Path.exists

    def existed_a_moment_ago(self: Path, *args: Any, **kwargs: Any) -> bool:
        return self.name == "backing_file" or real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", existed_a_moment_ago)
    found = runner.bound_loops()
    assert not {f"/dev/{p.name}" for p in unbound} & found.keys()


def _lane_run(tmp_path: Path) -> vm.LaneRun:
    share = tmp_path / "share"
    (share / "results").mkdir(parents=True)
    serial = tmp_path / "console.log"
    serial.write_text("Xen banner\r\nXENCI: ready\r\nlast words\r\n")
    return vm.LaneRun(share=share, serial_log=serial)


def test_collect_reads_only_complete_records(tmp_path: Path) -> None:
    run = _lane_run(tmp_path)
    results = run.share / "results"
    (results / "01_ok.json").write_text(json.dumps({"name": "01_ok", "status": "pass"}))
    (results / "02_half.json.tmp").write_text('{"name": "02_half"')
    (results / "03_bad.json").write_text("{not json")
    (results / "04_other.json").write_text(json.dumps({"name": "someone_else", "status": "pass"}))
    (results / "_dom0.json").write_text(json.dumps({"kernel": "6.1"}))
    vm.collect(run)
    assert set(run.records) == {"01_ok"}
    assert run.dom0 == {"kernel": "6.1"}
    assert run.runner_rc is None
    assert "wrote no exit status" in run.why_missing()
    assert run.console_tail(2) == "XENCI: ready\nlast words"
    (results / "rc").write_text("1\n")
    vm.collect(run)
    assert run.runner_rc == 1
    assert "no record for this scenario" in run.why_missing()


def _fake_image(tmp_path: Path) -> dom0_image.Dom0Image:
    path = tmp_path / "img"
    for name in dom0_image.REQUIRED_FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"")
    return dom0_image.Dom0Image(path, "fake", 0.0, cached=True)


def _fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/bash\n" + body)
    fake.chmod(0o755)
    monkeypatch.setattr(vm, "QEMU", str(fake))
    # A fake VM must not queue behind (or hold up) a real lane VM on this machine.
    monkeypatch.setattr(vm, "BOOT_LOCK", tmp_path / "fake-boot.lock")


def test_boot_reaps_a_vm_that_never_comes_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pids = tmp_path / "pids"
    _fake_qemu(tmp_path, monkeypatch, f"echo $$ > {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n")
    share = tmp_path / "share"
    share.mkdir()
    start = time.monotonic()
    run = vm.boot(_fake_image(tmp_path), share, vm.discover()[:1], boot_timeout=1.0)
    assert time.monotonic() - start < 10
    assert "did not report ready" in run.killed
    assert run.records == {}
    for pid in pids.read_text().split():
        _assert_gone(int(pid))
    assert (share / "plan.json").is_file()
    assert os.access(share / "test.sh", os.X_OK)


def test_a_boot_silent_before_ready_is_reaped_and_tried_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first fake VM prints a little and hangs (lane24b: dom0's kernel stopped at 14 s); the
    # second comes up. Each VM's pids are kept, to see that the hung one was reaped.
    pids = tmp_path / "pids"
    body = f"""
for a in "$@"; do case $a in file:*) serial=${{a#file:}} ;; esac; done
n=$(ls {pids}.* 2>/dev/null | wc -l)
echo $$ > {pids}.$n
if [ "$n" = 0 ]; then
  echo "sched_clock: Marking stable" >> "$serial"
  sleep 300 &
  echo $! >> {pids}.$n
  wait
fi
echo "XENCI: ready; running test.sh" >> "$serial"
exit 0
"""
    _fake_qemu(tmp_path, monkeypatch, body)
    share = tmp_path / "share"
    share.mkdir()
    said: list[str] = []
    start = time.monotonic()
    run = vm.boot(_fake_image(tmp_path), share, vm.discover()[:1], boot_stall=1.5, progress=said.append)
    assert time.monotonic() - start < 20
    assert run.boot_seconds is not None
    assert run.qemu_rc == 0
    assert not run.killed
    assert len(run.stalled) == 1
    assert "Marking stable" in run.stalled[0].read_text()
    assert "Marking stable" not in run.serial_log.read_text()
    assert any("booting again" in s for s in said)
    for pid in (tmp_path / "pids.0").read_text().split():
        _assert_gone(int(pid))


def test_a_second_silent_boot_is_not_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every VM hangs: the last attempt waits out boot_timeout, as a boot always did.
    _fake_qemu(tmp_path, monkeypatch, "sleep 300 &\nwait\n")
    share = tmp_path / "share"
    share.mkdir()
    run = vm.boot(_fake_image(tmp_path), share, vm.discover()[:1], boot_timeout=3.0, boot_stall=1.0)
    assert len(run.stalled) == vm.BOOT_ATTEMPTS - 1
    assert "did not report ready within 3s" in run.killed
    assert run.boot_seconds is None


def test_boot_takes_verdicts_from_records_not_qemu_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake VM plays a dom0 that wrote one record and then crashed: QEMU exits 0 all the same.
    body = """
for a in "$@"; do
  case $a in
    local,path=*mount_tag=hostshare*) share=${a#local,path=}; share=${share%%,*} ;;
    file:*) serial=${a#file:} ;;
  esac
done
echo "XENCI: ready; running test.sh" >> "$serial"
echo '{"name": "01_dom0_up", "status": "pass", "duration": 1.0}' > "$share/results/01_dom0_up.json"
echo "XENCI: RESULT 01_dom0_up pass 1.0s" >> "$serial"
echo "(XEN) Hardware Dom0 crashed" >> "$serial"
exit 0
"""
    _fake_qemu(tmp_path, monkeypatch, body)
    share = tmp_path / "share"
    share.mkdir()
    run = vm.boot(_fake_image(tmp_path), share, vm.discover()[:2])
    assert run.qemu_rc == 0
    assert run.boot_seconds is not None
    assert set(run.records) == {"01_dom0_up"}
    assert "01_dom0_up" in run.seen
    assert run.runner_rc is None
    assert "crashed or hung" in run.why_missing()
    assert "Hardware Dom0 crashed" in run.console_tail()


def test_boot_waits_for_another_lane_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qemu(tmp_path, monkeypatch, "exit 0\n")
    lock_path = vm.BOOT_LOCK
    share = tmp_path / "share"
    share.mkdir()
    said: list[str] = []
    runs: list[vm.LaneRun] = []
    with lock_path.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=lambda: runs.append(
                vm.boot(_fake_image(tmp_path), share, vm.discover()[:1], progress=said.append)
            )
        )
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive(), "boot must wait while another lane VM holds the lock"
        assert any("waiting" in s for s in said)
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert runs[0].qemu_rc == 0


def test_scenarios_use_the_installed_package_not_the_checkout() -> None:
    """The lane tests what an admin installs: a scenario naming the checkout's script or Python
    files would test the tree instead (and the runner no longer sets XENCI_CHECKOUT)."""
    for path in sorted(vm.SCENARIO_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".sh", ".py", ""):
            text = path.read_text(errors="replace")
            for word in ("XENCI_CHECKOUT", "hotplug/block-xenblockctl", "PYTHONPATH"):
                assert word not in text, f"{path.relative_to(vm.SCENARIO_DIR)} uses {word}"


def test_scenario_copy_leaves_out_host_bytecode(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "domu" / "__pycache__").mkdir(parents=True)
    (share / "01_x.sh").write_text("#!/usr/bin/env bash\n")
    (share / "01_x.sh").chmod(0o755)
    (share / "domu" / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"host")
    dest = tmp_path / "opt" / "scenarios"
    assert runner.copy_scenarios(str(share), str(dest)) == str(dest)
    assert os.access(dest / "01_x.sh", os.X_OK)
    assert not (dest / "domu" / "__pycache__" / "stale.cpython-311.pyc").exists()


def _guest_plan(tmp_path: Path, apt_get: str) -> tuple[Path, Path]:
    """A plan for the guest runner's main() with two scenarios and a fake apt-get on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\n{apt_get}\n")
    (bin_dir / "apt-get").chmod(0o755)
    scenarios = tmp_path / "checkout-scenarios"
    scenarios.mkdir()
    for name in ("01_a", "02_b"):
        (scenarios / f"{name}.sh").write_text('echo "deb=$XENCI_DEB wheel=$XENCI_WHEEL mode=$XENCI_MODE"\n')
    results = tmp_path / "results"
    copy = tmp_path / "scenarios"
    plan = {
        "results": str(results),
        "workdir": str(tmp_path / "work"),
        "scenarios_share": str(scenarios),
        "scenarios_dir": str(copy),
        "deb": "/mnt/host/pkg/xenblockctl_1_all.deb",
        "wheel": "/mnt/host/pkg/xenblockctl-1-py3-none-any.whl",
        "mode": "full",
        "scenarios": [{"name": n, "path": f"{copy}/{n}.sh", "timeout": 20} for n in ("01_a", "02_b")],
    }
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    return plan_path, bin_dir


def _guest_main(
    plan: Path, bin_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    # In process with a probe that sees nothing: the real one would take other tests' loop devices on
    # this host for leaks of the scenario and detach them.
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    rc = runner.main([str(plan)], probe=_no_state)
    return rc, capsys.readouterr().out


def test_runner_installs_the_deb_then_runs_scenarios_with_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan, bin_dir = _guest_plan(tmp_path, f'echo "$@" > {tmp_path}/apt-args')
    assert _guest_main(plan, bin_dir, monkeypatch, capsys)[0] == 0
    assert (tmp_path / "apt-args").read_text().split()[-1] == "/mnt/host/pkg/xenblockctl_1_all.deb"
    for name in ("01_a", "02_b"):
        record = json.loads((tmp_path / "results" / f"{name}.json").read_text())
        assert record["status"] == "pass", record
        assert record["log_tail"] == [
            "deb=/mnt/host/pkg/xenblockctl_1_all.deb"
            " wheel=/mnt/host/pkg/xenblockctl-1-py3-none-any.whl mode=full"
        ]


def test_a_failed_install_fails_every_scenario_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No scenario may run against whatever happens to be in dom0 when the package did not install."""
    plan, bin_dir = _guest_plan(tmp_path, 'echo "E: Unmet dependencies: python3-pyxs" >&2; exit 100')
    rc, out = _guest_main(plan, bin_dir, monkeypatch, capsys)
    assert rc == 1
    assert "installing /mnt/host/pkg/xenblockctl_1_all.deb FAILED (exit 100)" in out
    for name in ("01_a", "02_b"):
        record = json.loads((tmp_path / "results" / f"{name}.json").read_text())
        assert record["status"] == "fail"
        assert record["reason"].startswith("xenblockctl not installed: apt-get install xenblockctl_1_all.deb")
        assert "Unmet dependencies" in record["reason"]
    assert "Unmet dependencies" in (tmp_path / "results" / "_install.log").read_text()


def test_runner_starts_our_enabled_units_and_collects_syslog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """dom0 has no systemd: the units the package enabled (the warm hotplug server) are started as
    at boot, run through every scenario and are stopped at the end; /dev/log's lines are kept, and
    the workers' CLIENT_PID= lines counted (the evidence that VM starts went through the server)."""
    plan_path, bin_dir = _guest_plan(tmp_path, "true")
    wants = tmp_path / "wants"
    wants.mkdir()
    server = tmp_path / "server.py"
    server.write_text(
        "import os, socket, sys, time\n"
        "print('server up', os.getpid(), oct(os.umask(0)), flush=True)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        f"s.sendto(b'<30>block-xenblockctl[9]: added CLIENT_PID=7', {str(tmp_path / 'log')!r})\n"
        # the first start exits later as a stale server does; the restart stays
        f"ran = {str(tmp_path / 'ran')!r}\n"
        "first = not os.path.exists(ran)\n"
        "open(ran, 'a').close()\n"
        "time.sleep(2.5) if first else time.sleep(600)\n"
        "sys.exit(75)\n"
    )
    (wants / "xenblockctl-hotplug.service").write_text(
        f"[Unit]\nExecStart=/bin/false\n[Service]\nExecStart={sys.executable} {server}\nUMask=0077\n"
        "Restart=on-failure\n"
    )
    (wants / "xenblockctl-broken.service").write_text("[Service]\nExecStart=/bin/false\n")
    (wants / "other.service").write_text("[Service]\nExecStart=/bin/false\n")
    plan = json.loads(plan_path.read_text())
    plan.update(wants=str(wants), syslog=str(tmp_path / "log"))
    # the scenarios last long enough for the watch to restart the server
    (tmp_path / "checkout-scenarios" / "01_a.sh").write_text("sleep 6\n")
    plan_path.write_text(json.dumps(plan))

    rc, out = _guest_main(plan_path, bin_dir, monkeypatch, capsys)
    assert rc == 0, out
    results = tmp_path / "results"
    assert "enabled units of ours in" in out
    assert "xenblockctl-broken.service xenblockctl-hotplug.service" in out, "ours only, not other.service"
    assert "unit xenblockctl-broken.service did not start: exited 1 at once" in out
    log = (results / "_xenblockctl-hotplug.service.log").read_text().splitlines()
    assert len(log) == 2, log
    pid = int(log[1].split()[2])
    assert log[1].split()[3] == "0o77", "the unit's UMask"
    assert "unit xenblockctl-hotplug.service exited 75: restarting (Restart=on-failure)" in out
    assert "unit xenblockctl-hotplug.service stopped (exit -15, 1 restarts)" in out
    assert not Path(f"/proc/{pid}").exists(), "the runner left the unit's process running"
    assert "syslog: 2 lines with CLIENT_PID=" in out, out
    assert b"CLIENT_PID=7" in (results / "_syslog.log").read_bytes()


FAKE_BUILD = """#!/usr/bin/env bash
set -e
out=$1
echo "building into $out"
{body}
mkdir -p "$out/boot"
for f in boot/xen.elf boot/vmlinuz boot/initrd.img dom0.img; do echo "$f" > "$out/$f"; done
"""


def _fake_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str = "") -> Path:
    recipe = tmp_path / "recipe"
    recipe.mkdir(exist_ok=True)
    (recipe / "build.sh").write_text(FAKE_BUILD.format(body=body))
    monkeypatch.setattr(dom0_image, "RECIPE_DIR", recipe)
    monkeypatch.setattr(dom0_image, "build_prerequisites", lambda: None)
    # No network in unit tests: the archive "resolves" to fixed versions unless a test says otherwise.
    monkeypatch.setattr(
        dom0_image, "resolve_archive", lambda: dom0_image.Resolution(versions=dict(RESOLVED_A))
    )
    return recipe


# Trimmed stanzas of bookworm's and bookworm-security's Packages indices (the state that made a cold
# build take kernel 6.1.0-57 while main alone names 6.1.0-50).
MAIN_PACKAGES = """Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.176+1)
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)
Description: Linux for 64-bit PCs (meta-package)

Package: linux-image-6.1.0-50-amd64
Version: 6.1.176-1
Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
Description: Linux 6.1 for 64-bit PCs (signed)
 A continuation line: Package: not-a-package

Package: xen-hypervisor-4.17-amd64
Version: 4.17.5+72-g01140da4e8-1
Depends: xen-hypervisor-common

Package: xen-utils-4.17
Version: 4.17.5+72-g01140da4e8-1
Depends: libc6 (>= 2.35), python3 (<< 3.12)
"""
SECURITY_PACKAGES = """Package: linux-image-amd64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)

Package: linux-image-6.1.0-57-amd64
Version: 6.1.192-3
Depends: kmod

Package: xen-hypervisor-4.17-amd64
Version: 4.17.7+13-g2445b30a44-0+deb12u1

Package: xen-utils-4.17
Version: 4.17.7+13-g2445b30a44-0+deb12u1
"""
RESOLVED_A = {
    "linux-image-amd64": "6.1.176-1",
    "linux-image-6.1.0-50-amd64": "6.1.176-1",
    "kernel": "linux-image-6.1.0-50-amd64 6.1.176-1",
    "xen-hypervisor-4.17-amd64": "4.17.5+72-g01140da4e8-1",
    "xen-utils-4.17": "4.17.5+72-g01140da4e8-1",
}


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("6.1.176-1", "6.1.192-3"),
        ("6.1.9-1", "6.1.10-1"),
        ("4.17.5+72-g01140da4e8-1", "4.17.7+13-g2445b30a44-0+deb12u1"),
        ("1.0~rc1-1", "1.0-1"),
        ("1.0-1", "1.0-1+deb12u1"),
        ("2.0-1", "1:0.1-1"),
        ("1.0", "1.0-0.1"),
        ("1.0a", "1.0+"),
    ],
)
def test_debian_version_order(older: str, newer: str) -> None:
    assert dom0_image.compare_versions(older, newer) < 0
    assert dom0_image.compare_versions(newer, older) > 0
    assert dom0_image.compare_versions(newer, newer) == 0


def test_resolution_follows_the_highest_suite_and_the_kernel_metapackage() -> None:
    main_only = dom0_image.resolve_versions([MAIN_PACKAGES])
    assert main_only == RESOLVED_A
    # Security's later kernel wins wherever it is listed, as apt would pick it.
    for order in ([MAIN_PACKAGES, SECURITY_PACKAGES], [SECURITY_PACKAGES, MAIN_PACKAGES]):
        both = dom0_image.resolve_versions(order)
        assert both["kernel"] == "linux-image-6.1.0-57-amd64 6.1.192-3"
        assert both["xen-hypervisor-4.17-amd64"] == "4.17.7+13-g2445b30a44-0+deb12u1"
        assert both["xen-utils-4.17"] == "4.17.7+13-g2445b30a44-0+deb12u1"
        assert "linux-image-6.1.0-50-amd64" not in both
    recipe = "0123456789abcdef"
    assert dom0_image.cache_key(recipe, main_only) != dom0_image.cache_key(recipe, both)
    assert dom0_image.cache_key(recipe, both).startswith(recipe + "-")
    assert dom0_image.cache_key(recipe, both) == dom0_image.cache_key(recipe, dict(reversed(both.items())))


def test_resolution_refuses_indices_that_miss_a_keyed_package() -> None:
    no_xen = MAIN_PACKAGES.split("Package: xen-hypervisor", maxsplit=1)[0]
    with pytest.raises(dom0_image.ArchiveUnresolved, match=r"xen-hypervisor-4\.17-amd64"):
        dom0_image.resolve_versions([no_xen])
    # The metapackage names a kernel no index lists: not a key to trust.
    orphan = SECURITY_PACKAGES.replace("linux-image-6.1.0-57-amd64 (=", "linux-image-6.1.0-58-amd64 (=")
    with pytest.raises(dom0_image.ArchiveUnresolved, match="names no kernel package"):
        dom0_image.resolve_versions([orphan])


def test_unreachable_archive_resolves_to_a_stated_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dom0_image, "archive_sources", lambda: ["http://127.0.0.1:9/dists/x/Packages.xz"])
    start = time.monotonic()
    res = dom0_image.resolve_archive(timeout=5.0)
    assert time.monotonic() - start < 10
    assert res.versions == {}
    assert "refused" in res.problem.lower() or "error" in res.problem.lower()


def test_cache_key_follows_the_archive_and_says_when_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_recipe(
        tmp_path,
        monkeypatch,
        body='mkdir -p "$out"; printf "linux-image-6.1.0-50-amd64 6.1.176-1\\n'
        "xen-hypervisor-4.17-amd64 4.17.5+72-g01140da4e8-1\\n"
        'linux-image-amd64 6.1.176-1\\n" > "$out/packages.txt"',
    )
    cache = tmp_path / "cache"
    state_a = dom0_image.Resolution(versions=dict(RESOLVED_A))
    state_b = dom0_image.Resolution(versions=dom0_image.resolve_versions([MAIN_PACKAGES, SECURITY_PACKAGES]))
    first = dom0_image.ensure_image(cache, resolve=lambda: state_a)
    assert not first.cached
    assert json.loads((first.path / "build.json").read_text())["resolved"] == RESOLVED_A
    assert dom0_image.ensure_image(cache, resolve=lambda: state_a).cached
    line = first.describe()
    assert (
        "image contains dom0 kernel linux-image-6.1.0-50-amd64 6.1.176-1, Xen 4.17.5+72-g01140da4e8-1" in line
    )
    assert "archive resolves dom0 kernel linux-image-6.1.0-50-amd64 6.1.176-1" in line
    assert "MISMATCH" not in line
    # Same recipe, newer archive (a fresh machine's): the cached image must not be used.
    second = dom0_image.ensure_image(cache, resolve=lambda: state_b)
    assert not second.cached
    assert second.path != first.path
    # (The fake build does not install what it was asked for: the summary says so.)
    assert "MISMATCH: linux-image-amd64 6.1.176-1 != 6.1.192-3" in second.describe()
    # Offline: the recipe alone decides, the newest entry serves, and the summary says so.
    offline = dom0_image.Resolution(problem="URLError: <urlopen error [Errno -3] Temporary failure>")
    third = dom0_image.ensure_image(cache, resolve=lambda: offline)
    assert (third.cached, third.path) == (True, second.path)
    assert "archive NOT resolved (URLError" in third.describe()
    assert "keyed on the recipe only" in third.describe()


def test_image_is_built_once_then_served_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _fake_recipe(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    first = dom0_image.ensure_image(cache)
    assert not first.cached
    assert first.disk.read_text() == "dom0.img\n"
    second = dom0_image.ensure_image(cache)
    assert (second.cached, second.path) == (True, first.path)
    assert not list(cache.glob(".build-*"))
    # Any recipe edit selects a new entry and builds again.
    (recipe / "packages").write_text("extra\n")
    third = dom0_image.ensure_image(cache)
    assert not third.cached
    assert third.key != first.key


def test_failed_build_leaves_nothing_that_looks_like_an_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails after writing part of the image: the partial directory must never become the cache entry.
    _fake_recipe(tmp_path, monkeypatch, body='mkdir -p "$out/boot"; echo half > "$out/dom0.img"; exit 9')
    cache = tmp_path / "cache"
    with pytest.raises(dom0_image.ImageBuildFailed, match="exit 9"):
        dom0_image.ensure_image(cache)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []


def test_unreachable_archive_is_a_skip_reason_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_recipe(
        tmp_path,
        monkeypatch,
        body="echo 'E: Failed to fetch http://x/y  Temporary failure resolving'; exit 1",
    )
    with pytest.raises(dom0_image.ImageUnavailable, match="unreachable"):
        dom0_image.ensure_image(tmp_path / "cache")


def test_build_timeout_kills_the_build_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "sleeper.pid"
    _fake_recipe(tmp_path, monkeypatch, body=f"sleep 300 & echo $! > {pidfile}; wait")
    start = time.monotonic()
    with pytest.raises(dom0_image.ImageBuildFailed, match="timed out"):
        dom0_image.ensure_image(tmp_path / "cache", timeout=1.0)
    assert time.monotonic() - start < 15
    _assert_gone(int(pidfile.read_text()))


def test_last_run_is_kept_outside_pytest_tmp(tmp_path: Path) -> None:
    run = _lane_run(tmp_path)
    (run.share / "results" / "01_ok.json").write_text("{}")
    dest = tmp_path / "cache" / ".last-run"
    dest.parent.mkdir()
    assert vm.keep_last_run(run, dest) == dest
    assert (dest / "results" / "01_ok.json").is_file()
    assert "last words" in (dest / "console.log").read_text()
    (run.share / "results" / "01_ok.json").unlink()
    vm.keep_last_run(run, dest)
    assert not (dest / "results" / "01_ok.json").exists(), "each run replaces the previous one"


def test_stage_names_the_packages_as_dom0_sees_them(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "pkg").mkdir(parents=True)
    packages = vm.Packages(share / "pkg" / "xenblockctl_1_all.deb", share / "pkg" / "xenblockctl-1.whl")
    vm.stage(share, [vm.Scenario("01_a", vm.SCENARIO_DIR / "01_a.sh", 100)], packages)
    plan = json.loads((share / "plan.json").read_text())
    assert (plan["deb"], plan["wheel"]) == (
        "/mnt/host/pkg/xenblockctl_1_all.deb",
        "/mnt/host/pkg/xenblockctl-1.whl",
    )
    assert plan["scenarios"][0]["path"] == f"{vm.GUEST_SCENARIOS}/01_a.sh"
    assert plan["scenarios_share"] == "/mnt/checkout/tests/xen/scenarios"


def test_guest_timeout_covers_the_scenarios_but_is_capped(tmp_path: Path) -> None:
    path = vm.SCENARIO_DIR / "01_x.sh"  # only the name is staged; never read
    few = [vm.Scenario("01_a", path, 100)]
    assert 130 < vm.stage(tmp_path / "s1", few) < vm.GUEST_TIMEOUT_CAP
    many = [vm.Scenario(f"{i:02d}_x", path, 600) for i in range(20)]
    assert vm.stage(tmp_path / "s2", many) == vm.GUEST_TIMEOUT_CAP


def test_a_full_run_stages_its_mode_and_the_full_timeouts(tmp_path: Path) -> None:
    """The check run (CI's) must fit its hour; a full run gives each scenario its measurements' time."""
    path = vm.SCENARIO_DIR / "01_x.sh"
    scenarios = [vm.Scenario("01_a", path, 100, 1000), vm.Scenario("02_b", path, 50)]
    assert vm.stage(tmp_path / "check", scenarios) == 100 + 50 + 2 * 30 + 360
    plan = json.loads((tmp_path / "check" / "plan.json").read_text())
    assert plan["mode"] == "check"
    assert [e["timeout"] for e in plan["scenarios"]] == [100, 50]
    assert vm.stage(tmp_path / "full", scenarios, mode="full") == 1000 + 50 + 2 * 30 + 360
    plan = json.loads((tmp_path / "full" / "plan.json").read_text())
    assert plan["mode"] == "full"
    assert [e["timeout"] for e in plan["scenarios"]] == [1000, 50]
    many = [vm.Scenario(f"{i:02d}_x", path, 600, 2400) for i in range(20)]
    assert vm.GUEST_TIMEOUT_CAP < vm.stage(tmp_path / "many", many, mode="full") == vm.FULL_GUEST_TIMEOUT_CAP
