"""Full `add` as libxl runs it (a fresh process), ours vs Xen's bash `block` script, same xenstore.

    sudo .venv/bin/python -m bench.blockscript_add [--iterations 30] [--parallel 32] [--existing 64]
        [--baseline-script OLD/hotplug/block-xenblockctl] [--python /path/to/python3]

Both run against one embedded xenstored; the bash script (Debian's xen-utils-common, extracted
into .cache/ with `apt-get download`, never installed) talks to it with Debian's xenstore-*
CLIs (package xenstore-utils) through XENSTORED_PATH. Ours is measured end to end *including*
the hand-off: it only exits once an engine-like consumer has opened the device and confirmed the
luid; the bash script does no hand-off at all (it exits after writing physical-device).
Rows: p50/p90 of single adds, then the wall time of N adds started at once on distinct backends.

Single adds alternate between the contestants (ours, the optional baseline script, bash) inside
one loop, so a change in machine load hits all of them alike; each row also gives the CPU time
(user + sys) of the script process and everything it waited for, which load inflates far less
than wall time. `--baseline-script` runs another checkout's shim (e.g. `git archive OLD xenblockctl
hotplug | tar -x -C /tmp/old`) with the same interpreter: before/after in the same run. `--python` runs our
script(s) with another interpreter: a development venv's editable install (`pip install -e`)
adds a meta-path finder that site.py loads on every start (it imports pathlib, fnmatch, urllib.parse,
ipaddress), which an installed system does not pay; a venv holding only pyxs, with the script
finding its checkout itself, is what the Xen lane and a plain install run. The load average is
printed before and after."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import percentile, row
from tests.fixtures.libxl import SCRIPT, Backend, Libxl
from tests.fixtures.xenstore import _start
from xenblockctl.kernel import loop

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "xen-utils-common"


def bash_block_script() -> Path | None:
    script = CACHE / "root" / "etc" / "xen" / "scripts" / "block"
    if script.exists():
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["apt-get", "download", "xen-utils-common"], cwd=CACHE, check=True, capture_output=True
        )
        deb = next(CACHE.glob("xen-utils-common_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE / "root")], check=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
        print(f"cannot get Xen's bash block script: {exc}", file=sys.stderr)
        return None
    return script if script.exists() else None


def bash_env(libxl: Libxl, be_relative: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XENBUS_PATH": be_relative,
        "XENBUS_TYPE": "vbd",
        "XENBUS_BASE_PATH": "backend",
        "XENSTORED_PATH": libxl.xenstored.socket_path,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--existing", type=int, default=64, help="pre-existing backends for the scaling rows")
    parser.add_argument(
        "--baseline-script", type=Path, default=None, help="another checkout's hotplug/block-xenblockctl"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for our script(s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices)", file=sys.stderr)
        return 2
    bash = bash_block_script()
    if bash is None or shutil.which("xenstore-write") is None:
        print(
            "baseline unavailable: needs apt-get download xen-utils-common and xenstore-utils",
            file=sys.stderr,
        )
    print(f"load average before: {_loadavg()}")
    os.makedirs("/var/log/xen", exist_ok=True)  # the bash script appends its stderr there
    daemon = _start()
    work = Path(tempfile.mkdtemp(prefix="xbc-bench-"))
    libxl = Libxl(daemon.info, work)
    try:
        images = [work / f"disk{i}.img" for i in range(max(args.parallel, 1))]
        for image in images:
            with open(image, "wb") as f:
                f.truncate(16 << 20)
        contestants: list[Contestant] = [Contestant("xenblockctl add (incl. hand-off to consumer)", SCRIPT)]
        if args.baseline_script is not None:
            contestants.append(Contestant("baseline script add (incl. hand-off)", args.baseline_script))
        if bash is not None:
            contestants.append(Contestant("Xen bash block add (no hand-off)", bash, bash=True))
        print(
            f"block script add, fresh process, {args.iterations} iterations (embedded xenstored), "
            f"python {args.python}"
        )
        measure_alternating(libxl, contestants, images[0], args.iterations, args.python)
        for c in contestants:
            print(row(c.label, c.wall))
            print(row("  CPU of that process (user+sys)", c.cpu))
        ours = contestants[0]
        for other in contestants[1:]:
            ratio = percentile(other.wall, 50) / percentile(ours.wall, 50)
            cpu_ratio = percentile(other.cpu, 50) / percentile(ours.cpu, 50)
            print(f"ratio {other.label.split(' (')[0]} / ours (p50): wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x")
        if args.existing:
            populate(libxl, args.existing)
            n = max(3, args.iterations // 3)
            admin = loop.attach_file(str(images[-1]), read_only=False, tag="xenblockctl:bench-admin")
            try:
                for label, target in (("file", images[0]), ("block device", f"/dev/loop{admin.number}")):
                    ours_n = measure_ours(libxl, target, n, args.python)
                    print(row(f"xenblockctl add, {label}, {args.existing} backends", ours_n))
                    if bash is not None:
                        theirs_n = measure_bash(libxl, bash, target, n)
                        print(row(f"Xen bash add, {label}, {args.existing} backends", theirs_n))
                        ratio = percentile(theirs_n, 50) / percentile(ours_n, 50)
                        print(f"ratio bash/ours (p50, {label}, {args.existing} backends): {ratio:.1f}x")
            finally:
                admin.close()
        if args.parallel:
            wall_ours = parallel_ours(libxl, images[: args.parallel], args.python)
            print(f"{args.parallel} parallel adds, wall: xenblockctl {wall_ours * 1e3:.0f} ms")
            if bash is not None:
                wall_bash = parallel_bash(libxl, bash, images[: args.parallel])
                print(f"{args.parallel} parallel adds, wall: Xen bash   {wall_bash * 1e3:.0f} ms")
                print(f"ratio bash/ours (parallel wall): {wall_bash / wall_ours:.1f}x")
    finally:
        libxl.close()
        problems = daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        if problems:
            print("xenstored:", problems, file=sys.stderr)
    print(f"load average after: {_loadavg()}")
    return 0


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Contestant:
    """One script under test and its samples (µs)."""

    def __init__(self, label: str, script: Path, *, bash: bool = False) -> None:
        self.label = label
        self.script = script
        self.bash = bash
        self.wall: list[float] = []
        self.cpu: list[float] = []


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall and CPU (user + sys of the child and everything it waited for) in µs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False
    )
    wall = (time.perf_counter() - start) * 1e6
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e6
    return wall, cpu, result


def measure_alternating(
    libxl: Libxl, contestants: list[Contestant], image: Path, iterations: int, python: str
) -> None:
    """Each iteration runs every contestant once, on a fresh backend each (2 warm-up rounds)."""
    for i in range(iterations + 2):
        for k, c in enumerate(contestants):
            devid = 51712 + 16 * i
            if c.bash:
                be = libxl.create_backend(6, devid, str(image), "w", engine=False)
                wall, cpu, result = _timed(["bash", str(c.script), "add"], bash_env(libxl, be.relative))
                assert result.returncode == 0, result.stderr
                run_bash(libxl, c.script, "remove", be.relative)
            else:
                be = libxl.create_backend(5 + 10 * k, devid, str(image), "w")
                consumer = libxl.engine_consumer(be)
                wall, cpu, result = _timed([python, str(c.script), "add"], libxl.env("add", be))
                assert result.returncode == 0, result.stderr
                consumer.wait_opened()
                consumer.release()
                _remove(libxl, python, c.script, be)
            libxl.store.rm(be.path)
            if i >= 2:
                c.wall.append(wall)
                c.cpu.append(cpu)


def _remove(libxl: Libxl, python: str, script: Path, be: Backend) -> None:
    libxl.store.write(be.node("state"), "6")
    result = subprocess.run(
        [python, str(script), "remove"],
        env=libxl.env("remove", be),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def populate(libxl: Libxl, count: int) -> None:
    """Backends that already have a published disk, as on a busy dom0: both scripts' sharing checks
    must look at every one of them."""
    for i in range(count):
        be = libxl.create_backend(
            200 + i // 16, 51712 + 16 * (i % 16), f"/srv/existing-{i}.img", "w", engine=False
        )
        libxl.store.write_many(
            {
                be.node("physical-device"): f"fd:{i:x}",
                be.node("physical-device-luid"): f"{1000 + i:x}",
                be.node("hotplug-status"): "connected",
            }
        )


def measure_ours(libxl: Libxl, image: Path | str, iterations: int, python: str) -> list[float]:
    samples = []
    for i in range(iterations + 2):
        be = libxl.create_backend(5, 51712 + 16 * i, str(image), "w")
        consumer = libxl.engine_consumer(be)
        elapsed, _cpu, result = _timed([python, str(SCRIPT), "add"], libxl.env("add", be))
        assert result.returncode == 0, result.stderr
        consumer.wait_opened()
        consumer.release()
        _remove(libxl, python, SCRIPT, be)
        libxl.store.rm(be.path)
        if i >= 2:  # warm-up
            samples.append(elapsed)
    return samples


def run_bash(libxl: Libxl, bash: Path, action: str, be_relative: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(bash), action],
        env=bash_env(libxl, be_relative),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def measure_bash(libxl: Libxl, bash: Path, image: Path | str, iterations: int) -> list[float]:
    samples = []
    for i in range(iterations + 2):
        be = libxl.create_backend(6, 51712 + 16 * i, str(image), "w", engine=False)
        start = time.perf_counter()
        result = run_bash(libxl, bash, "add", be.relative)
        elapsed = (time.perf_counter() - start) * 1e6
        assert result.returncode == 0, result.stderr
        run_bash(libxl, bash, "remove", be.relative)
        libxl.store.rm(be.path)
        if i >= 2:
            samples.append(elapsed)
    return samples


def parallel_ours(libxl: Libxl, images: list[Path], python: str) -> float:
    backends = [libxl.create_backend(20 + i, 51712, str(img), "w") for i, img in enumerate(images)]
    consumers = [libxl.engine_consumer(be) for be in backends]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [python, str(SCRIPT), "add"],
            env=libxl.env("add", be),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for be in backends
    ]
    codes = [p.wait(120) for p in procs]
    wall = time.perf_counter() - start
    assert codes == [0] * len(codes), codes
    for be, consumer in zip(backends, consumers, strict=True):
        consumer.wait_opened()
        consumer.release()
        _remove(libxl, python, SCRIPT, be)
        libxl.store.rm(be.path)
    return wall


def parallel_bash(libxl: Libxl, bash: Path, images: list[Path]) -> float:
    backends = [
        libxl.create_backend(60 + i, 51712, str(img), "w", engine=False) for i, img in enumerate(images)
    ]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["bash", str(bash), "add"],
            env=bash_env(libxl, be.relative),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for be in backends
    ]
    codes = [p.wait(300) for p in procs]
    wall = time.perf_counter() - start
    for be in backends:
        run_bash(libxl, bash, "remove", be.relative)
        libxl.store.rm(be.path)
    assert codes == [0] * len(codes), codes
    return wall


if __name__ == "__main__":
    sys.exit(main())
