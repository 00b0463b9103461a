"""Installing outside a source checkout: `install-hooks`, the wheel, the installed scripts.

The wheel test is what a new user does: build the wheel, install it into a fresh venv, lay the host
files with `install-hooks --root`, and run `xenblockctl sandbox` from that venv in a directory that
is not the checkout. Every subprocess has a timeout and the temporary directories go away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Libxl
from tests.lint import test_hotplug_imports
from xenblockctl.blockscript import bundle
from xenblockctl.sandbox import script_failure
from xenblockctl.toolstack import hostfiles

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("xenblockctl")
#: Relative to --root: what `install-hooks` lays with the local layout (besides nothing else).
LOCAL_FILES = {
    # the hotplug client (setup.py builds it into the package) and the Python script beside it
    "etc/xen/scripts/block-xenblockctl": 0o755,
    "etc/xen/scripts/block-xenblockctl.py": 0o755,
    "etc/systemd/system/xenblockctl-hotplug.service": 0o644,
    "usr/libexec/xenblockctl/xenblockctl-udev": 0o755,
    "etc/udev/rules.d/60-xenblockctl.rules": 0o644,
    "etc/systemd/system/xenblockctl-engine.service": 0o644,
    "etc/systemd/system/xenblockctl-xenstored.service": 0o644,
    "usr/local/share/man/man1/xenblockctl.1": 0o644,
    "usr/local/share/man/man5/xenblockctl.conf.5": 0o644,
    "usr/local/share/man/man7/xenblockctl-hooks.7": 0o644,
    "usr/local/share/man/man8/block-xenblockctl.8": 0o644,
    "usr/local/share/bash-completion/completions/xenblockctl": 0o644,
    "usr/local/share/zsh/site-functions/_xenblockctl": 0o644,
    "usr/local/share/fish/vendor_completions.d/xenblockctl.fish": 0o644,
    # the block script's hotplug bundle, written by the laid script (blockscript/bundle.py)
    "var/cache/xenblockctl/hotplug.bundle": 0o644,
}


def _run(argv: list[str], *, cwd: Path | str = "/", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _install(cli: Path, root: Path, *extra: str, cwd: Path | str = "/") -> dict[str, str]:
    result = _run([str(cli), "install-hooks", "--root", str(root), "--json", *extra], cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return {f["path"]: f["result"] for f in json.loads(result.stdout)["files"]}


def _tree(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mode & 0o7777 for p in sorted(root.rglob("*")) if p.is_file()
    }


def _interpreter(console_script: Path) -> str:
    """The interpreter pip wrote into a console script: the one `install-hooks` runs with."""
    first = console_script.read_text().splitlines()[0]
    assert first.startswith("#!/"), first
    return first[2:]


def _check_tree(root: Path, cli: Path) -> None:
    python = _interpreter(cli)
    assert _tree(root) == LOCAL_FILES
    for script in ("etc/xen/scripts/block-xenblockctl.py", "usr/libexec/xenblockctl/xenblockctl-udev"):
        assert (root / script).read_text().splitlines()[0] == f"#!{python} -S", script
    assert (root / "etc/xen/scripts/block-xenblockctl").read_bytes()[:4] == b"\x7fELF", "the client"
    hotplug = (root / "etc/systemd/system/xenblockctl-hotplug.service").read_text()
    assert "\nExecStart=/etc/xen/scripts/block-xenblockctl.py --serve\n" in hotplug
    rules = (root / "etc/udev/rules.d/60-xenblockctl.rules").read_text()
    assert rules.count('RUN+="/usr/libexec/xenblockctl/xenblockctl-udev ') == 3
    for unit in ("xenblockctl-engine.service", "xenblockctl-xenstored.service"):
        text = (root / "etc/systemd/system" / unit).read_text()
        assert f"ExecStart={cli} " in text, text
        assert "/usr/local/bin" not in text
    assert (root / "usr/local/share/man/man1/xenblockctl.1").read_text() == (
        REPO / "man/xenblockctl.1"
    ).read_text()


def test_install_hooks_lays_every_file_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert set(_install(CLI, root, "--dry-run").values()) == {"would install"}
    assert not root.exists(), "--dry-run wrote something"

    first = _install(CLI, root)
    assert {k.lstrip("/"): v for k, v in first.items()} == dict.fromkeys(LOCAL_FILES, "installed")
    _check_tree(root, CLI)
    assert set(_install(CLI, root).values()) == {"unchanged"}, "a second run must change nothing"
    dry = _install(CLI, root, "--dry-run")
    assert dry.pop("/var/cache/xenblockctl/hotplug.bundle") == "would check"
    assert set(dry.values()) == {"unchanged"}

    hook = root / "usr/libexec/xenblockctl/xenblockctl-udev"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o700)
    again = _install(CLI, root)
    assert again["/usr/libexec/xenblockctl/xenblockctl-udev"] == "updated"
    assert [v for v in again.values() if v != "unchanged"] == ["updated"]
    _check_tree(root, CLI)

    text = _run([str(CLI), "install-hooks", "--root", str(root)]).stdout
    assert text.splitlines()[0] == "unchanged      /etc/xen/scripts/block-xenblockctl", text


def test_install_hooks_without_a_client_lays_the_python_script_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package built without a compiler carries no client: the Python script goes to the script
    path as before issue 18, and the `.py` and hotplug unit an earlier install laid beside a client
    are removed (that unit would start a server no client asks). Then the client comes back."""
    where = hostfiles.local_layout()._replace(cache_dir=str(tmp_path / "cache"))
    root = tmp_path / "root"
    script, beside = root / where.script.lstrip("/"), root / where.python_script.lstrip("/")
    unit = root / where.units_dir.lstrip("/") / hostfiles.HOTPLUG_UNIT
    with_client = {d.path: d.result for d in hostfiles.install(where, str(root))}
    assert with_client[where.python_script] == "installed"
    assert beside.is_file()
    assert unit.is_file()
    python_script = beside.read_bytes()

    monkeypatch.setattr(hostfiles, "CLIENT", tmp_path / "no-client")
    dry = {d.path: d.result for d in hostfiles.install(where, str(root), dry_run=True)}
    assert dry[where.python_script] == dry[f"{where.units_dir}/{hostfiles.HOTPLUG_UNIT}"] == "would remove"
    assert beside.is_file(), "--dry-run removed something"
    without = {d.path: d.result for d in hostfiles.install(where, str(root))}
    assert without[where.script] == "updated"
    assert without[where.python_script] == without[f"{where.units_dir}/{hostfiles.HOTPLUG_UNIT}"] == "removed"
    assert script.read_bytes() == python_script, (
        "the Python script at the script path, as laid beside a client"
    )
    assert not beside.exists()
    assert not unit.exists()
    # it runs, and wrote its bundle as the script libxl execs
    assert without[f"{where.cache_dir}/{bundle.NAME}"] in ("unchanged", "updated")
    again = hostfiles.install(where, str(root))
    assert {d.result for d in again} == {"unchanged"}, again

    monkeypatch.undo()
    back = {d.path: d.result for d in hostfiles.install(where, str(root))}
    assert (back[where.script], back[where.python_script]) == ("updated", "installed")
    assert script.read_bytes() == hostfiles.CLIENT.read_bytes()


def test_debian_layout_uses_distribution_paths(tmp_path: Path) -> None:
    done = _install(CLI, tmp_path, "--layout", "debian")
    assert set(done) >= {
        "/etc/xen/scripts/block-xenblockctl",
        "/etc/xen/scripts/block-xenblockctl.py",
        "/lib/systemd/system/xenblockctl-hotplug.service",
        "/usr/lib/udev/xenblockctl-udev",
        "/usr/lib/udev/rules.d/60-xenblockctl.rules",
        "/lib/systemd/system/xenblockctl-engine.service",
        "/usr/share/man/man8/block-xenblockctl.8",
        "/usr/share/zsh/vendor-completions/_xenblockctl",
    }
    script = (tmp_path / "etc/xen/scripts/block-xenblockctl.py").read_text()
    assert script.startswith("#!/usr/bin/python3 -S\n")
    assert "\nsys.path.append('/usr/lib/python3/dist-packages')\n" in script
    assert hostfiles.WHERE_BEGIN not in script, "the checkout lookup is replaced, not kept"
    rules = (tmp_path / "usr/lib/udev/rules.d/60-xenblockctl.rules").read_text()
    assert rules.count('RUN+="/usr/lib/udev/xenblockctl-udev ') == 3
    assert (
        "ExecStart=/usr/bin/xenblockctl "
        in (tmp_path / "lib/systemd/system/xenblockctl-engine.service").read_text()
    )
    assert not (tmp_path / "etc/xen/scripts/block").exists(), "never a file of xen-utils-common"


def test_installed_script_imports_the_package_from_any_directory(tmp_path: Path) -> None:
    """Before: `#!/usr/bin/env python3` outside the venv died with ModuleNotFoundError and wrote no
    coded line. Installed with the venv's interpreter, it runs and reports a coded error."""
    _install(CLI, tmp_path)
    for name, argv in (
        ("etc/xen/scripts/block-xenblockctl", ["add"]),
        ("usr/libexec/xenblockctl/xenblockctl-udev", ["bogus"]),
    ):
        result = subprocess.run(
            [str(tmp_path / name), *argv],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "XENBUS_PATH": "backend/vbd/x/y"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "ModuleNotFoundError" not in result.stderr, result.stderr
        if name.startswith("etc"):
            assert result.returncode == 1
            assert "xenbus-path-invalid" in result.stderr, result.stderr
        else:
            assert result.returncode == 0, "the udev hook always exits 0"


def _add_and_remove_through(
    script: Path, libxl: Libxl, make_image: ImageFactory, root: Path | None = None
) -> set[str]:
    """A real add (engine hand-off) and remove through `script`, run as libxl runs it (exec'd by
    its #! line, or the client's fallback exec of the script beside it; cwd /, libxl's
    environment); returns the modules its add imported. With the
    `root` install-hooks laid it under, both read their modules from the hotplug bundle laid
    there (checked with the import system's trace)."""
    image = make_image(fill=b"laid")
    be = libxl.create_backend(7, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be)

    bundled = {} if root is None else {"XENBLOCKCTL_CACHE_DIR": str(root / "var/cache/xenblockctl")}
    # no hotplug server answers there: a laid client runs the Python script beside it (its fallback)
    bundled["XENBLOCKCTL_HOTPLUG_SOCKET"] = "/nonexistent/hotplug.sock"

    def run(action: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), action],
            cwd="/",
            env={**libxl.env(action, be), "script": str(script), **bundled, **extra},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    added = run("add", PYTHONPROFILEIMPORTTIME="1", PYTHONVERBOSE="1")
    assert added.returncode == 0, added.stderr
    consumer.wait_opened()
    assert libxl.nodes(be)["hotplug-status"] == "connected"
    consumer.release()
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    removed = run("remove", PYTHONVERBOSE="1")
    assert removed.returncode == 0, removed.stderr
    assert "physical-device" not in libxl.nodes(be)
    if root is not None:
        for ran in (added, removed):
            ours = [line for line in ran.stderr.splitlines() if line.startswith("import 'xenblockctl")]
            assert ours, ran.stderr
            # all but the bundle's reader and its packages, imported before the bundle is open
            reader = ("'xenblockctl'", "'xenblockctl.blockscript'", f"'{bundle.__name__}'")
            unbundled = [
                line for line in ours if "_BundleLoader" not in line and line.split()[1] not in reader
            ]
            assert not unbundled, f"imported without the bundle: {unbundled}"
    return {
        line.rsplit("|", 1)[1].strip()
        for line in added.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_laid_block_script_adds_and_removes_without_site(
    tmp_path: Path, libxl: Libxl, make_image: ImageFactory
) -> None:
    """The laid script starts with `-S` (site.py costs ~2.5 ms per VM start) and still finds the
    package install-hooks ran from (here the checkout of the editable install; the wheel test and
    Xen lane scenario 22 cover a venv's site-packages). Before: `#!<python>`, site imported."""
    root = tmp_path / "root"
    _install(CLI, root)
    script = root / "etc/xen/scripts/block-xenblockctl"
    imported = _add_and_remove_through(script, libxl, make_image, root)
    assert "xenblockctl.blockscript.hotplug" in imported, sorted(imported)
    assert "site" not in imported, "the laid script must start without site.py"
    other_kinds = sorted(
        m for m in imported if any(m == k or m.startswith(k + ".") for k in test_hotplug_imports.OTHER_KINDS)
    )
    assert not other_kinds, f"a file add imported modules of other target kinds: {other_kinds}"
    # the laid script's own lines included (the lint's probes start below them): no os, no stat
    forbidden = sorted(m for m in imported if m.split(".")[0] in test_hotplug_imports.FORBIDDEN)
    assert not forbidden, f"a real file add through the laid script imported {forbidden}"


def test_sandbox_failure_shows_what_the_script_said() -> None:
    """A script that dies before writing hotplug-error (here: it cannot even be opened, as when the
    package lacked hotplug/) used to be reported as `block script add failed: None`."""
    died = subprocess.run(
        [sys.executable, "/nonexistent/block-xenblockctl", "add"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    message = script_failure("add", died, None)
    assert message.startswith("block script add failed (exit 2): ")
    assert "/nonexistent/block-xenblockctl" in message, message
    assert "None" not in message
    assert script_failure("add", died, "bad-params: relative") == (
        "block script add failed (exit 2): bad-params: relative"
    )


def test_shipped_files_are_found_in_the_checkout() -> None:
    assert hostfiles.shipped("hotplug/block-xenblockctl") == REPO / "hotplug" / "block-xenblockctl"
    with pytest.raises(hostfiles.InstallError) as info:
        hostfiles.shipped("hotplug/nonexistent")
    assert info.value.code == "files-missing"


# --- the wheel, as a new user installs it ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_wheel_in_a_fresh_venv_installs_hooks_and_runs_the_sandbox(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root (loop devices)")
    with tempfile.TemporaryDirectory(prefix="xbc-wheel-") as scratch:
        work = Path(scratch)
        built = _run(
            [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(work / "dist")],
            cwd=work,
            timeout=300,
        )
        assert built.returncode == 0, built.stdout + built.stderr
        (wheel,) = (work / "dist").glob("xenblockctl-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert "xenblockctl/share/hotplug/block-xenblockctl" in names
        assert "xenblockctl/libexec/block-xenblockctl" in names, "the hotplug client (setup.py)"
        assert "xenblockctl/share/man/xenblockctl.1" in names
        assert "License-Expression: GPL-3.0-or-later" in metadata or "License: GPL-3.0-or-later" in metadata

        venv = work / "venv"
        made = _run([sys.executable, "-m", "venv", str(venv)], cwd=work, timeout=120)
        assert made.returncode == 0, made.stderr
        python = venv / "bin" / "python"
        installed = _run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
            cwd=work,
            timeout=300,
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
        interpreters = {
            _interpreter(venv / "bin" / c) for c in ("xenblockctl", "block-xenblockctl", "xenblockctl-udev")
        }
        assert len(interpreters) == 1, interpreters
        assert interpreters.pop().startswith(f"{venv}/bin/python"), "console scripts run the venv's Python"

        elsewhere = work / "elsewhere"
        elsewhere.mkdir()
        cli = venv / "bin" / "xenblockctl"
        root = work / "root"
        _install(cli, root, cwd=elsewhere)
        _check_tree(root, cli)
        laid = root / "etc/xen/scripts/block-xenblockctl.py"
        assert "/venv/" in laid.read_text().splitlines()[0]
        # Without site the venv's interpreter still finds the standard library (pyvenv.cfg's home)
        # and the laid script adds the venv's site-packages itself: a real add through it.
        assert f"sys.path.append('{venv}/lib/" in laid.read_text()
        imported = _add_and_remove_through(
            root / "etc/xen/scripts/block-xenblockctl", libxl, make_image, root
        )
        assert "site" not in imported
        assert "xenblockctl.blockscript.hotplug" in imported

        sandbox = _run([str(cli), "sandbox", "--json"], cwd=elsewhere, timeout=180)
        assert sandbox.returncode == 0, sandbox.stdout + sandbox.stderr
        assert json.loads(sandbox.stdout)["ok"] is True
        used = _run([str(python), "-c", "import xenblockctl; print(xenblockctl.__file__)"], cwd=elsewhere)
        assert used.stdout.startswith(str(venv)), "the installed package ran, not the checkout"
