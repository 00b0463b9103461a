"""The block script side by side (issue 18): ours, a stdlib-only floor, Xen's bash `block`, same xenstored.

    sudo .venv/bin/python -m bench.blockscript_add [--iterations 30] [--parallel 32] [--existing 128]
        [--daemon c|embedded] [--baseline-script OLD/hotplug/block-xenblockctl] [--python PY]
        [--no-floor] [--strace]

Contestants, interleaved inside one loop so load changes hit all of them alike: `block-xenblockctl`
(this checkout's shim; with `--python /usr/bin/python3` it runs as installed on Debian: the hotplug
path needs nothing outside the standard library), optionally another checkout's shim (before/after
in one run: `git archive OLD xenblockctl hotplug | tar -x -C /tmp/old`), `bench/floor_block.py` (our
semantics for a file target in one stdlib-only file: the interpreter floor), and Xen's bash `block`
script from Debian's xen-utils-common (extracted into .cache/ with `apt-get download`, never
installed) through Debian's xenstore-* CLIs. Against Debian's C xenstored (LD_PRELOAD-stubbed,
tests/fixtures/cxenstored.py; `--daemon embedded` for ours). The Python contestants are timed
*including* the hand-off: they exit only once an engine-like consumer (a thread of this process,
tests/support/libxl_stub.Consumer) has opened the device and written `opened`=1; the bash script
does no hand-off (it exits after writing physical-device, the race this project exists to close).

Rows: serial add (wall p50/p90, CPU of the script and everything it waited for), serial remove,
our add handed to a blkback-like consumer (the kernel-blkback path: AUTOCLEAR turned off after the
hand-off, by a forked child since issue 18's deferral) against the engine path, for the baseline
script too when one is given, syscalls of one add (`--strace`: strace -f -c), adds with
`--existing` published backends (file and block-device target), and `--parallel` adds started at
once. The load average is printed before and after: the machine is shared, compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import percentile, row
from tests.fixtures.cxenstored import find_tools, start_cxenstored
from tests.fixtures.libxl import SCRIPT, Backend, Libxl
from tests.fixtures.xenstore import EmbeddedXenstored, embedded_xenstored
from xenblockctl.kernel import loop

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "xen-utils-common"
#: The stdlib-only floor: our semantics for a file target, nothing imported it does not run.
FLOOR = REPO / "bench" / "floor_block.py"


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
    parser.add_argument(
        "--existing", type=int, default=128, help="pre-existing backends for the scaling rows"
    )
    parser.add_argument(
        "--baseline-script", type=Path, default=None, help="another checkout's hotplug/block-xenblockctl"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for our script(s) and the floor"
    )
    parser.add_argument("--daemon", choices=("c", "embedded"), default="c", help="xenstored to run against")
    parser.add_argument("--no-floor", action="store_true", help="leave out the stdlib-only floor script")
    parser.add_argument("--strace", action="store_true", help="count syscalls of one add per contestant")
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
        bash = None
    print(f"load average before: {_loadavg()}")
    os.makedirs("/var/log/xen", exist_ok=True)  # the bash script appends its stderr there
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(xenstored(args.daemon))
        work = Path(tempfile.mkdtemp(prefix="xbc-bench-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        libxl = Libxl(daemon, work)
        stack.callback(libxl.close)
        images = [work / f"disk{i}.img" for i in range(max(args.parallel, 1))]
        for image in images:
            with open(image, "wb") as f:
                f.truncate(16 << 20)
        contestants: list[Contestant] = [Contestant("xenblockctl", SCRIPT, args.python)]
        if args.baseline_script is not None:
            contestants.append(Contestant("baseline (before)", args.baseline_script, args.python))
        if not args.no_floor:
            contestants.append(Contestant("stdlib floor", FLOOR, args.python))
        if bash is not None:
            contestants.append(Contestant("Xen bash block (no hand-off)", bash, "bash", bash=True))
        print(
            f"block script add/remove, fresh process, {args.iterations} iterations, {args.daemon} xenstored, "
            f"python {args.python}; Python contestants include the hand-off to an engine-like consumer"
        )
        measure_alternating(libxl, contestants, images[0], args.iterations)
        for c in contestants:
            print(row(f"add: {c.label}", c.wall))
            print(row("  CPU of that process (user+sys)", c.cpu))
        for c in contestants:
            print(row(f"remove: {c.label}", c.remove))
            if c.failures:
                print(f"  ({c.label}: {c.failures} adds failed and were left out)")
        ours = contestants[0]
        for other in contestants[1:]:
            ratio = percentile(other.wall, 50) / percentile(ours.wall, 50)
            cpu_ratio = percentile(other.cpu, 50) / percentile(ours.cpu, 50)
            rm_ratio = percentile(other.remove, 50) / percentile(ours.remove, 50)
            print(
                f"ratio {other.label} / xenblockctl (p50): add wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x, "
                f"remove {rm_ratio:.2f}x"
            )
        kernel_path(libxl, images[0], max(3, args.iterations // 2), args.python, args.baseline_script)
        if args.strace and shutil.which("strace"):
            for k, c in enumerate(contestants):
                print(f"syscalls of one add, {c.label}: {count_syscalls(libxl, c, images[0], 95 + k)}")
        if args.existing:
            scale_rows(libxl, contestants, images, args.existing, max(3, args.iterations // 3))
        if args.parallel:
            walls = {
                c.label: parallel(libxl, c, images[: args.parallel], 1000 + 100 * k)
                for k, c in enumerate(contestants)
            }
            for label, (wall, failures) in walls.items():
                print(f"{args.parallel} parallel adds, wall: {label}: {wall * 1e3:.0f} ms, {failures} failed")
            base = walls[ours.label][0]
            for label, (wall, _failures) in walls.items():
                print(f"ratio {label} / xenblockctl (parallel wall): {wall / base:.2f}x")
    print(f"load average after: {_loadavg()}")
    return 0


@contextlib.contextmanager
def xenstored(kind: str) -> Iterator[EmbeddedXenstored]:
    """The daemon every contestant talks to: Debian's C xenstored (LD_PRELOAD-stubbed,
    tests/fixtures/cxenstored.py) or the embedded one (tests/fixtures/xenstore.py)."""
    if kind == "embedded":
        with embedded_xenstored() as daemon:
            yield daemon
        return
    c = start_cxenstored(find_tools())
    try:
        path = str(c.socket)
        yield EmbeddedXenstored(path, {"XENSTORED_PATH": path}, c.pid or 0, str(c.trace or ""))
    finally:
        c.stop()


def scale_rows(
    libxl: Libxl, contestants: list[Contestant], images: list[Path], existing: int, n: int
) -> None:
    populate(libxl, existing)
    admin = loop.attach_file(str(images[-1]), read_only=False, tag="xenblockctl:bench-admin")
    try:
        targets = (("file", images[0]), ("block device", f"/dev/loop{admin.number}"))
        for t, (label, target) in enumerate(targets):
            base = None
            for k, c in enumerate(contestants):
                if c.label == "stdlib floor" and label != "file":
                    continue  # the floor handles file targets only
                samples = measure_one(libxl, c, target, n, 400 + 10 * t + k)
                print(row(f"add, {label}, {existing} backends: {c.label}", samples))
                if base is None:
                    base = percentile(samples, 50)
                else:
                    print(f"  ratio to xenblockctl (p50): {percentile(samples, 50) / base:.2f}x")
    finally:
        admin.close()
    print(f"(compare with the 0-backend add row above: the {existing}-backend rows should be within ~10 %)")


def kernel_path(libxl: Libxl, image: Path, n: int, python: str, baseline: Path | None = None) -> None:
    """Our add handed to a blkback-like consumer (sysfs physical_device, no `opened`): the path
    that turns AUTOCLEAR off after the hand-off, in a child forked once hotplug-status says
    connected (blockscript/autoclear.py); the engine path alternating with it, and with
    `baseline` (another checkout's shim: before/after) the same two for it. Also how long after
    our add exited the record said autoclear=0 (the child's work, off the critical path; polled
    from here, so ±1 ms)."""
    scripts = [("xenblockctl", SCRIPT)] + ([("baseline (before)", baseline)] if baseline is not None else [])
    samples: dict[tuple[str, str], list[float]] = {
        (label, k): [] for label, _ in scripts for k in ("engine", "kernel")
    }
    child: list[float] = []
    for i in range(n + 2):
        for s, (label, script) in enumerate(scripts):
            for domid, kind in ((90 + 2 * s, "engine"), (91 + 2 * s, "kernel")):
                be = libxl.create_backend(domid, 51712 + 16 * i, str(image), "w", engine=kind == "engine")
                consumer = libxl.engine_consumer(be) if kind == "engine" else libxl.blkback_consumer(be)
                wall, _cpu, result = _timed([python, str(script), "add"], libxl.env("add", be))
                exited = time.perf_counter()
                assert result.returncode == 0, result.stderr
                consumer.wait_opened()
                if kind == "kernel":
                    libxl.wait_autoclear_off(be)  # the baseline's record says so at once
                    if s == 0 and i >= 2:
                        child.append((time.perf_counter() - exited) * 1e6)
                _remove(libxl, python, script, be)
                consumer.release()
                libxl.store.rm(be.path)
                if i >= 2:
                    samples[(label, kind)].append(wall)
    for label, _ in scripts:
        kernel, engine = samples[(label, "kernel")], samples[(label, "engine")]
        print(row(f"add, kernel-blkback hand-off: {label}", kernel))
        print(row(f"add, engine hand-off (same loop): {label}", engine))
        ratio = percentile(kernel, 50) / percentile(engine, 50)
        print(f"ratio kernel / engine path (p50), {label}: {ratio:.2f}x")
    print(row("  record says autoclear=0, after our kernel-path add exited", child))


def count_syscalls(libxl: Libxl, c: Contestant, image: Path, domid: int) -> str:
    be = libxl.create_backend(domid, 51712, str(image), "w", engine=not c.bash)
    consumer = None if c.bash else libxl.engine_consumer(be)
    out = libxl.workdir / "strace.txt"
    env = bash_env(libxl, be.relative) if c.bash else libxl.env("add", be)
    result = subprocess.run(
        ["strace", "-f", "-c", "-o", str(out), *c.argv("add")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if consumer is not None:
        consumer.wait_opened()
        consumer.release()
    _remove_any(libxl, c, be)
    libxl.store.rm(be.path)
    total = [line for line in out.read_text().splitlines() if line.rstrip().endswith("total")]
    fields = total[0].split() if total else []
    # strace -c's total line: % time, seconds, usecs/call, calls, errors, "total"
    return fields[3] if len(fields) >= 5 else "?"


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Contestant:
    """One script under test and its samples (µs)."""

    def __init__(self, label: str, script: Path, interpreter: str, *, bash: bool = False) -> None:
        self.label = label
        self.script = script
        self.interpreter = interpreter
        self.bash = bash
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.remove: list[float] = []
        self.failures = 0

    def argv(self, action: str) -> list[str]:
        return [self.interpreter, str(self.script), action]


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


def measure_alternating(libxl: Libxl, contestants: list[Contestant], image: Path, iterations: int) -> None:
    """Each iteration runs every contestant's add and remove once, on a fresh backend each (2
    warm-up rounds), so a change of machine load hits all of them alike."""
    for i in range(iterations + 2):
        for k, c in enumerate(contestants):
            be = libxl.create_backend(5 + 10 * k, 51712 + 16 * i, str(image), "w", engine=not c.bash)
            consumer = None if c.bash else libxl.engine_consumer(be)
            env = bash_env(libxl, be.relative) if c.bash else libxl.env("add", be)
            wall, cpu, result = _timed(c.argv("add"), env)
            if result.returncode != 0 and c.bash:
                # losetup --find races other users of loop devices on a shared machine (EBUSY)
                c.failures += 1
                _remove_any(libxl, c, be)
                libxl.store.rm(be.path)
                continue
            assert result.returncode == 0, (c.label, result.returncode, result.stdout, result.stderr)
            if consumer is not None:
                consumer.wait_opened()
                consumer.release()
            removal = _remove_any(libxl, c, be)
            libxl.store.rm(be.path)
            if i >= 2:
                c.wall.append(wall)
                c.cpu.append(cpu)
                c.remove.append(removal)


def _remove_any(libxl: Libxl, c: Contestant, be: Backend) -> float:
    """libxl's remove: the backend goes to Closed (6), then the script runs; wall µs."""
    libxl.store.write(be.node("state"), "6")
    env = bash_env(libxl, be.relative) if c.bash else libxl.env("remove", be)
    wall, _cpu, result = _timed(c.argv("remove"), env)
    assert result.returncode == 0 or c.bash, (c.label, result.stderr)
    return wall


def _remove(libxl: Libxl, python: str, script: Path, be: Backend) -> None:
    _remove_any(libxl, Contestant("", script, python), be)


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


def measure_one(libxl: Libxl, c: Contestant, target: Path | str, iterations: int, domid: int) -> list[float]:
    samples = []
    for i in range(iterations + 2):
        be = libxl.create_backend(domid, 51712 + 16 * i, str(target), "w", engine=not c.bash)
        consumer = None if c.bash else libxl.engine_consumer(be)
        env = bash_env(libxl, be.relative) if c.bash else libxl.env("add", be)
        elapsed, _cpu, result = _timed(c.argv("add"), env)
        if result.returncode != 0 and c.bash:  # losetup's EBUSY race, as above
            _remove_any(libxl, c, be)
            libxl.store.rm(be.path)
            continue
        assert result.returncode == 0, (c.label, result.stderr)
        if consumer is not None:
            consumer.wait_opened()
            consumer.release()
        _remove_any(libxl, c, be)
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


def _conflicts(libxl: Libxl) -> int:
    """EAGAIN replies (transaction conflicts) in the C daemon's trace so far; 0 without a trace."""
    trace = Path(libxl.xenstored.trace_path) if libxl.xenstored.trace_path else None
    if trace is None or not trace.is_file():
        return 0
    return trace.read_text(errors="replace").count("EAGAIN")


def parallel(libxl: Libxl, c: Contestant, images: list[Path], first_domid: int) -> tuple[float, int]:
    """N adds started at once on distinct backends and images; wall seconds and failures. Also
    prints the transaction conflicts (EAGAIN) the daemon answered meanwhile (fixture and
    consumers included): whether contention inside xenstored is part of the wall time."""
    conflicts_before = _conflicts(libxl)
    backends = [
        libxl.create_backend(first_domid + i, 51712, str(img), "w", engine=not c.bash)
        for i, img in enumerate(images)
    ]
    consumers = [] if c.bash else [libxl.engine_consumer(be) for be in backends]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            c.argv("add"),
            env=bash_env(libxl, be.relative) if c.bash else libxl.env("add", be),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for be in backends
    ]
    codes = [p.wait(300) for p in procs]
    wall = time.perf_counter() - start
    conflicts = _conflicts(libxl) - conflicts_before
    print(f"  {c.label}: {conflicts} transaction conflicts (EAGAIN) during the adds")
    for consumer in consumers:
        with contextlib.suppress(Exception):
            consumer.wait_opened(5)
        consumer.release()
    for be in backends:
        _remove_any(libxl, c, be)
        libxl.store.rm(be.path)
    return wall, sum(code != 0 for code in codes)


if __name__ == "__main__":
    sys.exit(main())
