"""Xen lane fixtures: one image (cached), the .deb and wheel built from this checkout (every run: the
lane tests what an admin installs from the current code), one boot per pytest session for every
selected scenario."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.packaging import build
from tests.xen import image as dom0_image
from tests.xen import vm


@dataclass
class LaneReport:
    """What the terminal summary prints: the lane's own timings, whatever the outcome."""

    lines: list[str] = field(default_factory=list)
    started: float = 0.0
    run: vm.LaneRun | None = None


REPORT = pytest.StashKey[LaneReport]()
SCENARIO_TEST = "tests/xen/test_scenarios.py::"


def _selected(session: pytest.Session) -> list[vm.Scenario]:
    """Only the scenarios whose tests survived -k/-m/deselection are run in dom0."""
    wanted = set()
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if item.nodeid.startswith(SCENARIO_TEST) and callspec is not None:
            wanted.add(callspec.params.get("scenario"))
    return [s for s in vm.discover() if s.name in wanted]


@pytest.fixture(scope="session")
def xen_lane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> vm.LaneRun:
    report = request.config.stash.setdefault(REPORT, LaneReport())
    report.started = time.monotonic()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def progress(text: str) -> None:
        # Live on the terminal too: a 2-minute boot must not look like a hang.
        report.lines.append(text)
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[xen lane] {text}")
        else:
            reporter.write_line(f"[xen lane] {text}")

    try:
        mode = vm.lane_mode()
    except ValueError as exc:
        pytest.fail(f"xen lane: {exc}", pytrace=False)
    if problem := vm.qemu_problem():
        progress(f"SKIP: {problem}")
        pytest.skip(f"xen lane: {problem}")
    try:
        t0 = time.monotonic()
        image = dom0_image.ensure_image()
    except dom0_image.ImageUnavailable as exc:
        progress(f"SKIP: {exc}")
        pytest.skip(f"xen lane: {exc}")
    except dom0_image.ImageBuildFailed as exc:
        progress("image build FAILED")
        pytest.fail(f"xen lane: {exc}", pytrace=False)
    if image.cached:
        progress(f"image {image.key} from cache {image.path} ({time.monotonic() - t0:.1f}s)")
    else:
        progress(f"image {image.key} built cold in {image.build_seconds:.1f}s -> {image.path}")
    progress(image.describe())

    scenarios = _selected(request.session) or vm.discover()
    share = tmp_path_factory.mktemp("xen-lane") / "share"
    share.mkdir()
    packages = _build_packages(share / "pkg", progress)
    progress(
        f"booting Xen + dom0 for {len(scenarios)} scenario(s), {mode} mode ({vm.LANE_MODE_ENV});"
        f" console {share.parent}/share-console.log"
    )
    run = vm.boot(image, share, scenarios, progress=progress, packages=packages, mode=mode)
    report.run = run
    kept = vm.keep_last_run(run, image.path.parent / ".last-run")
    if kept is not None:
        progress(f"console log and records kept in {kept}")
    boot = f"{run.boot_seconds:.1f}s" if run.boot_seconds is not None else "never"
    progress(
        f"QEMU ran {run.qemu_seconds:.1f}s (exit {run.qemu_rc}), dom0 ready after {boot}, "
        f"runner exit {run.runner_rc}{'; ' + run.killed if run.killed else ''}"
    )
    for stalled in run.stalled:
        progress(f"a boot before this one hung before ready and was tried again: {stalled}")
    return run


def _build_packages(dest: Path, progress: Callable[[str], None]) -> vm.Packages:
    """The .deb (dpkg-buildpackage, as tests/packaging does) and the wheel, from a copy of the tree."""
    t0 = time.monotonic()
    scratch = dest.parent / "build"
    scratch.mkdir()
    try:
        tree = build.copy_tree(scratch)
        built = build.build_deb(tree)
        dest.mkdir()
        deb = Path(shutil.copy(built.deb, dest))
        wheel = build.build_wheel(tree, dest)
    except build.BuildUnavailable as exc:
        progress(f"SKIP: cannot build the package to install in dom0: {exc}")
        pytest.skip(f"xen lane: {exc}")
    except build.BuildFailed as exc:
        progress("package build FAILED")
        pytest.fail(f"xen lane: {exc}", pytrace=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    progress(f"built {deb.name} ({built.seconds:.1f}s) and {wheel.name} in {time.monotonic() - t0:.1f}s")
    return vm.Packages(deb, wheel)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    report = config.stash.get(REPORT, None)
    if report is None:
        return
    terminalreporter.section("xen lane")
    for line in report.lines:
        terminalreporter.write_line(line)
    run = report.run
    if run is not None:
        if run.dom0:
            terminalreporter.write_line(
                f"dom0: kernel {run.dom0.get('kernel')}, Xen {run.dom0.get('xen_version')}, "
                f"runner started at dom0 uptime {run.dom0.get('uptime_at_runner')}s"
            )
        for name, rec in sorted(run.records.items()):
            metrics = ", ".join(f"{k}={v}" for k, v in rec.get("metrics", {}).items())
            terminalreporter.write_line(
                f"  {name:<32} {rec.get('status'):<5} {rec.get('duration', 0):7.1f}s"
                + (f"  [{metrics}]" if metrics else "")
            )
    terminalreporter.write_line(f"xen lane total: {time.monotonic() - report.started:.1f}s")
