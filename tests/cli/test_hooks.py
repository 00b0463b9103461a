"""udev rules and hook, systemd units.

The rules are checked by udev itself: `udevadm test` in a private mount namespace where only our
rules file is visible (tmpfs over /run and /dev, empty rules directories elsewhere), replaying
real loop-device events; its RUN list must name our hook and it must report no parse error. The
hook is exercised by replaying udev environments against the embedded xenstored."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.kernel import EmptyLoop, ImageFactory
from tests.fixtures.libxl import Backend, Libxl
from tests.fixtures.xenstore import EmbeddedXenstored
from xenblockctl.kernel import loop
from xenblockctl.toolstack import hostfiles
from xenblockctl.xenstore.client import XenStore

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "hotplug" / "60-xenblockctl.rules"
HOOK_RUN = "/usr/libexec/xenblockctl/xenblockctl-udev"


def _udevadm_test(tmp_path: Path, action: str, sysdev: str, extra_rules: str = "") -> str:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    shutil.copy(RULES, rules / RULES.name)
    if extra_rules:
        (rules / "99-extra.rules").write_text(extra_rules)
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    script = textwrap.dedent(
        f"""
        set -e
        mount -t tmpfs none /run
        mount -t tmpfs none /dev
        mkdir -p /run/udev/rules.d
        cp {rules}/* /run/udev/rules.d/
        for d in /usr/lib/udev/rules.d /lib/udev/rules.d /etc/udev/rules.d; do
          if [ -d "$d" ]; then mount --bind {empty} "$d"; fi
        done
        udevadm test --action={action} {sysdev} 2>&1
        """
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def udevadm() -> None:
    if os.geteuid() != 0:
        pytest.skip("udevadm test in a private mount namespace needs root")
    for tool in ("udevadm", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian packages udev, util-linux)")
    if not Path("/sys/class/block/loop0").exists():
        pytest.skip("no /sys/class/block/loop0 to replay events on")


@pytest.mark.root
@pytest.mark.usefixtures("udevadm")
@pytest.mark.parametrize("action", ["change", "remove"])
def test_udev_runs_the_hook_for_loop_events(tmp_path: Path, action: str) -> None:
    out = _udevadm_test(tmp_path, action, "/sys/class/block/loop0")
    assert f"Reading rules file: /run/udev/rules.d/{RULES.name}" in out
    assert f"run: '{HOOK_RUN} block'" in out, out
    problems = [
        line for line in out.splitlines() if RULES.name in line and ("Invalid" in line or "rror" in line)
    ]
    assert problems == []


@pytest.mark.root
@pytest.mark.usefixtures("udevadm")
def test_udevadm_catches_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: udev names a malformed rule."""
    out = _udevadm_test(tmp_path, "change", "/sys/class/block/loop0", 'SUBSYSTEM=="block", FOO="x"\n')
    assert "99-extra.rules:1 Invalid key 'FOO'" in out


def test_rules_are_well_formed() -> None:
    """A syntax check that runs anywhere: every rule is KEY op "value" pairs udev knows."""
    import re

    pair = re.compile(r'\s*([A-Z]+(?:\{[A-Za-z_]+\})?)\s*(==|!=|\+=|=|:=)\s*"([^"]*)"\s*(,|$)')
    keys = {"SUBSYSTEM", "KERNEL", "ACTION", "RUN", "ENV{DEVTYPE}"}
    rules = [line for line in RULES.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(rules) == 3
    for line in rules:
        pos = 0
        seen = []
        while pos < len(line):
            match = pair.match(line, pos)
            assert match is not None, f"cannot parse {line[pos:]!r}"
            seen.append(match.group(1))
            pos = match.end()
        assert set(seen) <= keys, seen
        assert "RUN" in seen
        run = re.search(r'RUN\+="([^"]+)"', line)
        assert run is not None
        assert run.group(1).startswith(HOOK_RUN)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as `install-hooks` lays them (ExecStart pointing at this environment's xenblockctl)."""
    from xenblockctl.toolstack import hostfiles

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    venv_cli = Path(sys.executable).with_name("xenblockctl")
    if not venv_cli.exists():
        pytest.skip(f"{venv_cli} missing: the package is not installed in this environment")
    # the hotplug server's unit starts the Python script laid beside the client: lay both here
    layout = hostfiles.local_layout()._replace(cli=str(venv_cli), scripts=str(tmp_path / "scripts"))
    program = hostfiles.client()
    assert program is not None, "the package carries no hotplug client (setup.py's build_ext)"
    items = hostfiles.plan(layout, program)
    for item in items:
        if item.path.startswith(layout.scripts):
            Path(item.path).parent.mkdir(exist_ok=True)
            Path(item.path).write_bytes(item.content)
            Path(item.path).chmod(item.mode)
    units = [item for item in items if item.path.endswith(".service")]
    assert len(units) == 3
    for item in units:
        name = Path(item.path).name
        want = (
            f"ExecStart={layout.python_script} --serve"
            if name == hostfiles.HOTPLUG_UNIT
            else f"ExecStart={venv_cli} "
        )
        assert want in item.content.decode()
        (tmp_path / name).write_bytes(item.content)
        result = subprocess.run(
            [analyze, "verify", "--man=no", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        noise = [
            line
            for line in result.stderr.splitlines()
            if line.strip() and "xenstored.service" not in line and "xen.service" not in line
            # the units we order after exist only on a Xen host
        ]
        assert result.returncode == 0, result.stderr
        assert noise == [], noise


def test_hook_script_runs_from_the_checkout() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "hotplug" / "xenblockctl-udev"), "bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", "/bin")},
    )
    assert result.returncode == 0, result.stderr


# --- the hook against replayed environments ----------------------------------------------------


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hook as `install-hooks` lays it (`#!<python> -S`, this checkout appended to its path):
    what udev runs, without site.py."""
    where = hostfiles.local_layout()._replace(packages=str(REPO))
    laid = tmp_path_factory.mktemp("hook") / hostfiles.HOOK_NAME
    laid.write_text(hostfiles.udev_hook((REPO / "hotplug" / hostfiles.HOOK_NAME).read_text(), where))
    laid.chmod(0o755)
    return laid


def _hook(hook: Path, what: str, env: dict[str, str]) -> None:
    """Run the hook as udev does: a process with the event's properties as its environment."""
    result = subprocess.run(
        [str(hook), what],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _event(libxl: Libxl, action: str, relative: str, **extra: str) -> dict[str, str]:
    env = libxl.env(action, _backend(relative))
    env.update(
        {
            "ACTION": action,
            "SUBSYSTEM": "xen-backend",
            "DEVPATH": f"/devices/{relative.replace('backend/', '').replace('/', '-')}",
            "SEQNUM": "1",
            "XENBLOCKCTL_CONFIG": str(libxl.workdir / "etc" / "xenblockctl.conf"),
        }
    )
    env.update(extra)
    return env


def _backend(relative: str) -> Backend:
    _, kind, domid, devid = relative.split("/")
    return Backend(int(domid), int(devid), kind)


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_backend_hook_acts_only_when_enabled_ours_and_not_libxl_managed(
    libxl: Libxl, make_image: ImageFactory, hook: Path
) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image))
    copy = f"/libxl/{be.domid}/device/vbd/{be.devid}"
    _hook(hook, "backend", _event(libxl, "add", be.relative))
    assert "physical-device" not in libxl.nodes(be), "udev hooks are off by default"

    enabled = _event(libxl, "add", be.relative, XENBLOCKCTL_UDEV="1")
    _hook(hook, "backend", enabled)
    assert "physical-device" not in libxl.nodes(be), f"{copy} exists: libxl runs the script itself"

    libxl.store.rm(copy)
    libxl.store.write(be.node("script"), "/etc/xen/scripts/block")
    _hook(hook, "backend", enabled)
    assert "physical-device" not in libxl.nodes(be), "another script's disk is not ours"

    libxl.store.write(be.node("script"), "/etc/xen/scripts/block-xenblockctl")
    consumer = libxl.engine_consumer(be)
    _hook(hook, "backend", enabled)
    consumer.wait_opened()
    nodes = libxl.nodes(be)
    assert nodes["hotplug-status"] == "connected"
    assert consumer.device is not None
    assert nodes["physical-device"] == consumer.device.identity.physical_device
    consumer.release()
    _hook(hook, "backend", _event(libxl, "remove", be.relative, XENBLOCKCTL_UDEV="1"))
    assert "physical-device" not in libxl.nodes(be), "remove from udev withdrew our nodes"


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_block_hook_records_a_detached_device(libxl: Libxl, make_image: ImageFactory, hook: Path) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:test-udev")
    ident = dev.identity
    try:
        be = libxl.create_backend(5, 51728, "/unused")
        libxl.store.write_many(
            {be.node("physical-device"): ident.physical_device, be.node("physical-device-luid"): ident.luid}
        )
        base = {
            **libxl.env("add", be),
            "SUBSYSTEM": "block",
            "MAJOR": str(ident.major),
            "MINOR": str(ident.minor),
        }
        # The event's DISKSEQ is not what decides (see below): a bogus one changes nothing here.
        _hook(hook, "block", {**base, "ACTION": "change", "DISKSEQ": str(ident.diskseq + 5)})
        assert "hotplug-error" not in libxl.nodes(be), "the device still carries the luid"
    finally:
        dev.close()  # AUTOCLEAR: unbound now
    # What the kernel sends for a loop detach: a change event still carrying the *old* diskseq.
    _hook(hook, "block", {**base, "ACTION": "change", "DISKSEQ": str(ident.diskseq)})
    error = libxl.nodes(be).get("hotplug-error", "")
    prefix = f"device-replaced: device {ident.major}:{ident.minor} "
    suffix = f", published luid {ident.luid}: the backend's disk was detached or replaced under it"
    assert error.startswith(prefix), error
    assert error.endswith(suffix), error
    seen = error[len(prefix) : -len(suffix)]
    # Another loop user on the host may bind the freed minor before the hook looks (the kernel
    # hands out the lowest free one; ci33 saw 7:0 rebound): the same verdict, said as replaced.
    rebound = seen.startswith("now has diskseq ") and int(seen.rpartition(" ")[2]) > ident.diskseq
    assert seen == "has no media (detached)" or rebound, error

    libxl.store.rm(be.node("hotplug-error"))
    libxl.store.write(be.node("online"), "0")
    _hook(hook, "block", {**base, "ACTION": "remove"})
    assert "hotplug-error" not in libxl.nodes(be), "a detaching backend's device may go away"
    libxl.store.write(be.node("online"), "1")
    _hook(hook, "block", {**base, "ACTION": "remove"})
    assert " is gone, published luid" in libxl.nodes(be).get("hotplug-error", "")
    with XenStore.connect(libxl.xenstored.socket_path) as store:
        assert store.read_optional(be.node("hotplug-status")) is None, "status untouched: only recorded"


@pytest.mark.parametrize(
    ("major", "minor"), [("4096", "0"), ("2147483648", "0"), ("7", "1048576"), ("07", "0")]
)
def test_block_hook_ignores_a_number_no_device_has(libxl: Libxl, hook: Path, major: str, minor: str) -> None:
    """MAJOR/MINOR beyond the kernel's dev_t (12 and 20 bits) or not canonical name no device: the
    event is ignored, even when a backend publishes that text (it exited 1 with an OverflowError
    from makedev before, for a major from 2^31)."""
    be = libxl.create_backend(5, 51760, "/unused")
    physical = f"{int(major):x}:{int(minor):x}"
    libxl.store.write_many({be.node("physical-device"): physical, be.node("physical-device-luid"): "1"})
    event = {**libxl.env("add", be), "SUBSYSTEM": "block", "ACTION": "remove", "MAJOR": major, "MINOR": minor}
    _hook(hook, "block", event)
    assert "hotplug-error" not in libxl.nodes(be)


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_block_hook_judges_by_diskseq_not_by_size(libxl: Libxl, empty_loop: EmptyLoop, hook: Path) -> None:
    """A device of size 0 that still has the published diskseq is the published device (the one
    verdict, xenstore/identity.py): no error. Its `diskseq` node is checked like the luid."""
    now, bound = empty_loop.now, empty_loop.bound
    be = libxl.create_backend(5, 51744, "/unused")
    libxl.store.write_many(
        {be.node("physical-device"): now.physical_device, be.node("physical-device-luid"): now.luid}
    )
    event = {**libxl.env("add", be), "SUBSYSTEM": "block", "ACTION": "change"}
    event.update(MAJOR=str(now.major), MINOR=str(now.minor), DISKSEQ=str(now.diskseq))
    _hook(hook, "block", event)
    assert "hotplug-error" not in libxl.nodes(be), "the device still carries the published diskseq"
    libxl.store.write(be.node("diskseq"), bound.luid)  # disagrees with the luid: not ours to judge
    _hook(hook, "block", event)
    assert "hotplug-error" not in libxl.nodes(be)
    libxl.store.write_many({be.node("physical-device-luid"): bound.luid})  # both name the old binding
    _hook(hook, "block", event)
    assert "has no media (detached)" in libxl.nodes(be).get("hotplug-error", "")


# --- a real systemd-udevd -------------------------------------------------------------------------

UDEVD = "/lib/systemd/systemd-udevd"


@pytest.fixture
def private_udevd(tmp_path: Path, xenstored: EmbeddedXenstored) -> Iterator[None]:
    """systemd-udevd in a private mount namespace (tmpfs /run and /dev, only our rules visible),
    with the rules' RUN pointed at this checkout's hook and XENSTORED_PATH at the test daemon. It
    hears the machine's real kernel uevents; the hook only ever writes to the test xenstored."""
    if os.geteuid() != 0:
        pytest.skip("systemd-udevd needs root")
    for tool in (UDEVD, shutil.which("unshare"), shutil.which("nsenter")):
        if tool is None or not os.path.exists(tool):
            pytest.skip(f"{tool or 'unshare/nsenter'} not installed (Debian packages udev, util-linux)")
    if any(_is_udevd(p) for p in os.listdir("/proc") if p.isdigit()):
        pytest.skip("a systemd-udevd already runs on this machine; a second one would race it")
    socket_path = xenstored.socket_path
    rules = tmp_path / "udevd-rules"
    rules.mkdir()
    hook = f"{sys.executable} {REPO / 'hotplug' / 'xenblockctl-udev'}"
    text = RULES.read_text().replace(HOOK_RUN, hook)
    (rules / RULES.name).write_text(f'ENV{{XENSTORED_PATH}}="{socket_path}"\n' + text)
    empty = tmp_path / "udevd-empty"
    empty.mkdir()
    script = textwrap.dedent(
        f"""
        set -e
        mount -t tmpfs none /run
        mount -t tmpfs none /dev
        mknod -m 0666 /dev/null c 1 3  # udevd points RUN programs' stdin at it
        mkdir -p /run/udev/rules.d
        cp {rules}/* /run/udev/rules.d/
        for d in /usr/lib/udev/rules.d /lib/udev/rules.d /etc/udev/rules.d; do
          if [ -d "$d" ]; then mount --bind {empty} "$d"; fi
        done
        exec {UDEVD} --debug
        """
    )
    log = (tmp_path / "udevd.log").open("w")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            ping = subprocess.run(
                ["nsenter", f"--target={proc.pid}", "--mount", "udevadm", "control", "--ping"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if ping.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "udevd.log").read_text()
            assert time.monotonic() < deadline, "systemd-udevd did not answer --ping"
            time.sleep(0.1)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def _is_udevd(pid: str) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0) == b"systemd-udevd"


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop", "private_udevd")
def test_real_udevd_records_a_detached_loop_on_its_backend(libxl: Libxl, make_image: ImageFactory) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:test-udevd")
    try:
        be = libxl.create_backend(5, 51744, "/unused")
        ident = dev.identity
        libxl.store.write_many(
            {be.node("physical-device"): ident.physical_device, be.node("physical-device-luid"): ident.luid}
        )
    finally:
        dev.close()  # AUTOCLEAR: the kernel unbinds it, bumps the diskseq and sends a change uevent
    deadline = time.monotonic() + 20
    while "hotplug-error" not in libxl.nodes(be):
        assert time.monotonic() < deadline, f"udevd never ran the hook: {libxl.nodes(be)}; see udevd.log"
        time.sleep(0.05)
    error = libxl.nodes(be)["hotplug-error"]
    assert error.startswith(f"device-replaced: device {ident.major}:{ident.minor} ")
    assert f"published luid {ident.luid}" in error


def test_hotplug_unit_runs_the_server_unconfined_and_lets_workers_finish() -> None:
    """The warm hotplug server's unit (issue 18): a worker is the block script, so nothing of the
    engine's sandbox (paths in `params`, loop/dm/NBD control must look as they do to libxl); only
    the server is stopped (in-flight workers finish their flow); warm from boot; restarted when it
    exits for new code (stale)."""
    text = (REPO / "hotplug" / "xenblockctl-hotplug.service").read_text()
    keys = {line.partition("=")[0] for line in text.splitlines() if "=" in line and not line.startswith("#")}
    lines = text.splitlines()
    for line in ("KillMode=process", "Restart=on-failure", "WantedBy=multi-user.target", "UMask=0077"):
        assert line in lines, line
    assert "ExecStart=/etc/xen/scripts/block-xenblockctl.py --serve" in lines
    sandboxing = {
        k
        for k in keys
        if k.startswith(("Protect", "Private", "Restrict", "Capability", "Device", "SystemCall"))
    }
    assert not sandboxing, sandboxing
    assert "NoNewPrivileges" not in keys


#: `systemd-analyze security` exposure, times ten (its --threshold scale). Unhardened both were 9.6.
def test_engine_unit_keeps_its_devices_in_the_fd_store() -> None:
    """Issue 21: the engine parks its device fds (FDSTORE=1), which systemd accepts only from a
    Type=notify service with FileDescriptorStoreMax= > 0."""
    lines = (REPO / "hotplug" / "xenblockctl-engine.service").read_text().splitlines()
    assert "Type=notify" in lines
    store_max = [int(line.partition("=")[2]) for line in lines if line.startswith("FileDescriptorStoreMax=")]
    assert store_max
    assert store_max[0] >= 256


EXPOSURE_LIMIT = {"xenblockctl-engine.service": 20, "xenblockctl-xenstored.service": 15}


@pytest.mark.parametrize("name", sorted(EXPOSURE_LIMIT))
def test_units_are_hardened_and_ordered_after_xenstored(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    text = (REPO / "hotplug" / name).read_text()
    assert "/usr/local/bin" not in text
    if name == "xenblockctl-engine.service":
        # Debian 12 starts xenstored from /etc/init.d/xen (xen.service); upstream has xenstored.service.
        after = next(line for line in text.splitlines() if line.startswith("After="))
        assert {"xen.service", "xenstored.service"} <= set(after.removeprefix("After=").split())
    (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--threshold={EXPOSURE_LIMIT[name]}", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert result.returncode == 0, overall or result.stdout + result.stderr


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_the_whole_path_runs_with_only_the_engine_units_capability() -> None:
    """The engine unit keeps CapabilityBoundingSet=CAP_MKNOD: the sandbox (xenstored, engine, block
    script, guest I/O, detach) passes with nothing else in the bounding set."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux)")
    unit = (REPO / "hotplug" / "xenblockctl-engine.service").read_text()
    assert "\nCapabilityBoundingSet=CAP_MKNOD\n" in unit
    result = subprocess.run(
        [
            setpriv,
            "--bounding-set=-all,+mknod",
            str(Path(sys.executable).with_name("xenblockctl")),
            "sandbox",
        ],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
