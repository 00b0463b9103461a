"""The Debian package, built from the tree with bookworm's toolchain and checked by lintian.

`dpkg-buildpackage -b -us -uc` runs on a copy of the tree (tests/packaging/build.py, shared with the
Xen lane) in a temporary directory that goes away. Skipped, with the reason printed, when the build
dependencies are missing (`dpkg-checkbuilddeps` says which)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging import build

REPO = Path(__file__).resolve().parents[2]
#: Where libxl, udev, systemd, man and the shells look on Debian 12.
EXPECTED = {
    # the hotplug client (setup.py builds it) and the Python script beside it, its fallback
    "./etc/xen/scripts/block-xenblockctl": "-rwxr-xr-x",
    "./etc/xen/scripts/block-xenblockctl.py": "-rwxr-xr-x",
    "./lib/systemd/system/xenblockctl-hotplug.service": "-rw-r--r--",
    "./usr/lib/udev/xenblockctl-udev": "-rwxr-xr-x",
    "./usr/lib/udev/rules.d/60-xenblockctl.rules": "-rw-r--r--",
    "./lib/systemd/system/xenblockctl-engine.service": "-rw-r--r--",
    "./lib/systemd/system/xenblockctl-xenstored.service": "-rw-r--r--",
    "./usr/share/man/man1/xenblockctl.1.gz": "-rw-r--r--",
    "./usr/share/man/man5/xenblockctl.conf.5.gz": "-rw-r--r--",
    "./usr/share/man/man7/xenblockctl-hooks.7.gz": "-rw-r--r--",
    "./usr/share/man/man8/block-xenblockctl.8.gz": "-rw-r--r--",
    "./usr/share/bash-completion/completions/xenblockctl": "-rw-r--r--",
    "./usr/share/zsh/vendor-completions/_xenblockctl": "-rw-r--r--",
    "./usr/share/fish/vendor_completions.d/xenblockctl.fish": "-rw-r--r--",
    "./usr/bin/xenblockctl": "-rwxr-xr-x",
    # the JSON Schemas of the --json documents, package data (xenblockctl(1), JSON OUTPUT)
    "./usr/lib/python3/dist-packages/xenblockctl/schemas/list.v1.json": "-rw-r--r--",
    "./usr/lib/python3/dist-packages/xenblockctl/schemas/error.v1.json": "-rw-r--r--",
}


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return build.run(argv, cwd, timeout)


@pytest.fixture(scope="module")
def built() -> Iterator[build.Built]:
    with tempfile.TemporaryDirectory(prefix="xbc-deb-") as scratch:
        try:
            built = build.build_deb(build.copy_tree(Path(scratch)))
        except build.BuildUnavailable as exc:
            print(exc)
            pytest.skip(str(exc))
        except build.BuildFailed as exc:
            pytest.fail(str(exc), pytrace=False)
        yield built


@pytest.mark.slow
def test_package_installs_files_where_debian_looks(built: build.Built) -> None:
    listing = _run(["dpkg-deb", "--contents", str(built.deb)], built.deb.parent, 60).stdout
    modes = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    for path, mode in EXPECTED.items():
        assert modes.get(path) == mode, f"{path}: {modes.get(path)} (want {mode})"
    assert "./usr/bin/block-xenblockctl" not in modes
    assert not any("/libexec/" in p for p in modes), "the client only where libxl execs it"
    assert not any(p.startswith("./usr/local") for p in modes)
    assert any(p.startswith("./usr/lib/python3/dist-packages/xenblockctl/") for p in modes)
    # the engine's native passes, compiled for the distribution's Python (backend/_fastpass.c,
    # backend/_grantcopy.c)
    for module in ("_fastpass", "_grantcopy"):
        native = [
            p for p in modes if p.startswith(f"./usr/lib/python3/dist-packages/xenblockctl/backend/{module}")
        ]
        assert sorted(p.rsplit(".", 1)[-1] for p in native) == ["pyi", "so"], native  # no C source

    fields = _run(["dpkg-deb", "--field", str(built.deb), "Depends"], built.deb.parent, 60).stdout
    for dependency in ("python3-click", "python3-pyxs", "python3", "libc6"):
        assert dependency in fields, fields

    with tempfile.TemporaryDirectory(prefix="xbc-deb-x-") as unpacked:
        _run(["dpkg-deb", "-x", str(built.deb), unpacked], built.deb.parent, 60)
        root = Path(unpacked)
        client = (root / "etc/xen/scripts/block-xenblockctl").read_bytes()
        assert client[:4] == b"\x7fELF", "the compiled hotplug client"
        script = (root / "etc/xen/scripts/block-xenblockctl.py").read_text()
        assert script.startswith("#!/usr/bin/python3 -S\n")
        assert "\nsys.path.append('/usr/lib/python3/dist-packages')\n" in script
        rules = (root / "usr/lib/udev/rules.d/60-xenblockctl.rules").read_text()
        assert rules.count('RUN+="/usr/lib/udev/xenblockctl-udev ') == 3
        unit = (root / "lib/systemd/system/xenblockctl-engine.service").read_text()
        assert "ExecStart=/usr/bin/xenblockctl " in unit
        hotplug = (root / "lib/systemd/system/xenblockctl-hotplug.service").read_text()
        assert "\nExecStart=/etc/xen/scripts/block-xenblockctl.py --serve\n" in hotplug


@pytest.mark.slow
def test_package_enables_and_starts_only_the_hotplug_server(built: build.Built) -> None:
    """The warm hotplug server is enabled and (re)started by the maintainer scripts; the engine and
    the embedded xenstored stay the admin's choice (xenblockctl-hooks(7))."""
    with tempfile.TemporaryDirectory(prefix="xbc-deb-e-") as control:
        _run(["dpkg-deb", "-e", str(built.deb), control], built.deb.parent, 60)
        postinst = (Path(control) / "postinst").read_text()
    lines = postinst.splitlines()
    hotplug = "'xenblockctl-hotplug.service'"
    assert f"deb-systemd-helper enable {hotplug} >/dev/null || true" in [line.strip() for line in lines]
    assert f"debian-installed {hotplug}" not in postinst, "enabled on a first install, not only kept enabled"
    started = [line for line in lines if "deb-systemd-invoke" in line]
    assert started, postinst
    assert all(hotplug in line for line in started), started
    for unit in ("xenblockctl-engine.service", "xenblockctl-xenstored.service"):
        # --no-enable: re-enabled on an upgrade only if the admin had enabled it
        assert f"deb-systemd-helper debian-installed '{unit}'" in postinst, postinst
    assert postinst.index("py3compile") < postinst.index("deb-systemd-invoke"), "byte-compiled first"


@pytest.mark.slow
def test_package_writes_and_removes_the_hotplug_bundle(built: build.Built) -> None:
    """The bundle is not in the .deb (a package build's install-hooks lays the script for a
    directory it is not in yet); postinst has the installed script write it, postrm removes it."""
    listing = _run(["dpkg-deb", "--contents", str(built.deb)], built.deb.parent, 60).stdout
    assert "var/cache" not in listing
    with tempfile.TemporaryDirectory(prefix="xbc-deb-e-") as control:
        _run(["dpkg-deb", "-e", str(built.deb), control], built.deb.parent, 60)
        postinst = (Path(control) / "postinst").read_text()
        postrm = (Path(control) / "postrm").read_text()
    assert "/etc/xen/scripts/block-xenblockctl.py --write-bundle" in postinst
    assert postinst.index("py3compile") < postinst.index("--write-bundle"), "byte-compiled first"
    assert "rm -f /var/cache/xenblockctl/hotplug.bundle" in postrm


@pytest.mark.slow
def test_package_overwrites_nothing_of_xen_utils_common(built: build.Built) -> None:
    """Files of xen-utils-common as installed here (else the stock scripts every version ships)."""
    owned = _run(["dpkg-query", "-L", "xen-utils-common"], REPO, 60)
    theirs = set(owned.stdout.split()) if owned.returncode == 0 else set()
    theirs |= {
        "/etc/xen/scripts/block",
        "/etc/xen/scripts/block-common.sh",
        "/etc/xen/scripts/hotplugpath.sh",
    }
    listing = _run(["dpkg-deb", "--contents", str(built.deb)], built.deb.parent, 60).stdout
    ours = {line.split()[-1].removeprefix(".") for line in listing.splitlines() if not line.startswith("d")}
    assert not ours & theirs, sorted(ours & theirs)


@pytest.mark.slow
def test_lintian_finds_no_errors(built: build.Built) -> None:
    lintian = shutil.which("lintian")
    if lintian is None:
        pytest.skip("lintian not installed (Debian package lintian)")
    result = _run(
        [lintian, "--fail-on", "error", "--display-info", str(built.changes)], built.changes.parent, 600
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    print(result.stdout)
    assert errors == [], "\n".join(errors)
    assert result.returncode == 0, result.stdout + result.stderr
