"""The block script side by side (issue 18): ours, a stdlib-only floor, Xen's bash `block`, same xenstored.

    sudo .venv/bin/python -m bench.blockscript_add [--iterations 30] [--parallel 32] [--existing 128]
        [--parallel-rounds 1] [--only-parallel] [--only-kernel] [--daemon c|embedded] [--python PY]
        [--baseline-script OLD/hotplug/block-xenblockctl] [--no-floor] [--no-bash] [--no-warm]
        [--client-fallback] [--site-shim] [--strace] [--trace]

Contestants, interleaved inside one loop so load changes hit all of them alike: `block-xenblockctl`
as `xenblockctl install-hooks` lays it (hostfiles.block_script: `<python> -S`, this checkout put on
sys.path by the script; with `--python /usr/bin/python3` it runs as installed on Debian: the hotplug
path needs nothing outside the standard library), optionally the shipped shim as it runs from a
checkout (`--site-shim`: with site.py) and another checkout's shim (before/after in one run: `git
archive OLD xenblockctl hotplug | tar -x -C /tmp/old`; run as that version's install-hooks laid it,
with site.py), "xenblockctl, warm server + C client" (issue 18: the hotplug client as setup.py builds
it, xenblockctl/libexec/, laid with the Python script beside it as `block-xenblockctl.py`, and the
hotplug server started as its unit starts it: that script with `--serve`, umask 0077, a session
of its own; its socket in the bench's directory, XENBLOCKCTL_HOTPLUG_SOCKET; its CPU and its
workers' counted through a cpuacct cgroup of its own, since it reaps them, not we; with
`--client-fallback` the same client with no server too, which execs the Python script),
`bench/floor_block.py` (our semantics for a file or block-device target in one
stdlib-only file: the interpreter floor, run with `-S` from its cached bytecode as ours is), and
Xen's bash `block` script from Debian's xen-utils-common (extracted into .cache/ with `apt-get
download`, never installed) through Debian's xenstore-* CLIs. Against Debian's C xenstored
(LD_PRELOAD-stubbed, tests/fixtures/cxenstored.py; `--daemon embedded` for ours). The C daemon runs
without `--trace-file`, as a production xenstored does: the trace line it writes per request and
reply costs ~60 µs a request against ~8 without (bench/README.md, issue 18's 128-backend section),
which would price every xenstore request of every contestant at the bench's artefact, not at a
dom0's cost. `--trace` turns it back on (the 32-parallel row then counts transaction conflicts,
EAGAIN, from it; the tests keep their trace for failure reports). The Python contestants are timed
*including* the hand-off: they exit only once an engine-like consumer (a thread of this process,
tests/support/libxl_stub.Consumer) has opened the device and written `opened`=1; the bash script
does no hand-off (it exits after writing physical-device, the race this project exists to close).

Rows: serial add (wall p50/p90, CPU of the script and everything it waited for), serial remove,
our add handed to a blkback-like consumer (the kernel-blkback path: AUTOCLEAR turned off after the
hand-off, by a forked child since issue 18's deferral, by the warm server's worker after its reply
since session 22) against the engine path, for the baseline
script too when one is given, syscalls of one add (`--strace`: strace -f -c), adds with no and
with `--existing` published backends (file and block-device target; the block device is a loop
device bound beforehand; interleaved, the populated backends in a second daemon), with the ratio
of the two, and `--parallel` adds started at once (`--parallel-rounds` interleaved rounds, the
median shown, with where the time went: each add's CPU and blocking waits, the consumers' and
xenstored's CPU, the host's idle time, EAGAIN replies; `--only-parallel` runs that row alone).
The load average is printed before and after: the machine is shared, compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from bench.common import percentile, process_cpu, row
from tests.fixtures.cxenstored import find_tools, start_cxenstored
from tests.fixtures.libxl import SCRIPT, Backend, Libxl
from tests.fixtures.xenstore import EmbeddedXenstored, embedded_xenstored
from xenblockctl.blockscript import warm
from xenblockctl.environment import WARM_SHARING_ENV
from xenblockctl.kernel import loop
from xenblockctl.toolstack import hostfiles

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "xen-utils-common"
#: The stdlib-only floor: our semantics for a file or block-device target, nothing imported it
#: does not run.
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
        "--parallel-rounds", type=int, default=1, help="interleaved rounds of the parallel row (median shown)"
    )
    parser.add_argument(
        "--only-parallel", action="store_true", help="run only the parallel row (with its breakdown)"
    )
    parser.add_argument(
        "--only-scaling",
        action="store_true",
        help="run only the scaling rows (0 vs --existing backends), --iterations samples each",
    )
    parser.add_argument(
        "--only-kernel",
        action="store_true",
        help="run only the kernel-blkback vs engine hand-off rows, --iterations samples each",
    )
    parser.add_argument(
        "--existing", type=int, default=128, help="pre-existing backends for the scaling rows"
    )
    parser.add_argument(
        "--per-domain",
        type=int,
        default=1,
        help="existing backends per frontend domain (1: a dom0 serving one disk to each of many "
        "guests; rounds 1-2 of issue 18 used 16)",
    )
    parser.add_argument(
        "--baseline-script", type=Path, default=None, help="another checkout's hotplug/block-xenblockctl"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for our script(s) and the floor"
    )
    parser.add_argument("--daemon", choices=("c", "embedded"), default="c", help="xenstored to run against")
    parser.add_argument("--no-floor", action="store_true", help="leave out the stdlib-only floor script")
    parser.add_argument("--no-bash", action="store_true", help="leave out Xen's bash block script")
    parser.add_argument("--no-warm", action="store_true", help="leave out the warm hotplug server + C client")
    parser.add_argument(
        "--client-fallback",
        action="store_true",
        help="also the C client with no server (it execs the laid Python script)",
    )
    parser.add_argument("--strace", action="store_true", help="count syscalls of one add per contestant")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="run the C xenstored with --trace-file (slower per request; counts EAGAIN in the parallel rows)",
    )
    parser.add_argument(
        "--site-shim",
        action="store_true",
        help="also run the shipped shim as a checkout runs it (with site.py): what -S saves",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices)", file=sys.stderr)
        return 2
    bash = None if args.no_bash else bash_block_script()
    if not args.no_bash and (bash is None or shutil.which("xenstore-write") is None):
        print(
            "baseline unavailable: needs apt-get download xen-utils-common and xenstore-utils",
            file=sys.stderr,
        )
        bash = None
    print(f"load average before: {_loadavg()}")
    os.makedirs("/var/log/xen", exist_ok=True)  # the bash script appends its stderr there
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(xenstored(args.daemon, trace=args.trace))
        work = Path(tempfile.mkdtemp(prefix="xbc-bench-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        libxl = Libxl(daemon, work)
        stack.callback(libxl.close)
        # at least two: the scaling rows' block device is a loop device bound to the last one, and
        # the file rows use the first (one image would make the file rows `busy`)
        images = [work / f"disk{i}.img" for i in range(max(args.parallel, 2))]
        for image in images:
            with open(image, "wb") as f:
                f.truncate(16 << 20)
        contestants: list[Contestant] = [
            Contestant("xenblockctl", laid_script(work, args.python), args.python, flags=("-S",))
        ]
        if not args.no_warm:
            contestants += warm_contestants(work, args.python, stack, fallback=args.client_fallback)
        if args.site_shim:
            contestants.append(Contestant("xenblockctl, shipped shim (site)", SCRIPT, args.python))
        if args.baseline_script is not None:
            contestants.append(baseline_contestant(work, args.baseline_script, args.python))
        if not args.no_floor:
            contestants.append(
                Contestant("stdlib floor", laid_floor(work, args.python), args.python, flags=("-S",))
            )
        if bash is not None:
            contestants.append(Contestant("Xen bash block (no hand-off)", bash, "bash", bash=True))
        print(
            f"block script add/remove, fresh process, {args.iterations} iterations, {args.daemon} xenstored, "
            f"python {args.python}; Python contestants include the hand-off to an engine-like consumer"
        )
        if args.only_parallel:
            parallel_rows(libxl, contestants, images[: args.parallel], args.parallel_rounds)
            print(f"load average after: {_loadavg()}")
            return 0
        if args.only_kernel:
            kernel_path(libxl, images[0], args.iterations, _ours_and_baseline(contestants))
            print(f"load average after: {_loadavg()}")
            return 0
        if args.only_scaling:
            scale_rows(
                libxl,
                contestants,
                images,
                args.existing,
                args.iterations,
                per_domain=args.per_domain,
                daemon_kind=args.daemon,
                trace=args.trace,
            )
            print(f"load average after: {_loadavg()}")
            return 0
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
        kernel_path(libxl, images[0], max(3, args.iterations // 2), _ours_and_baseline(contestants))
        if args.strace and shutil.which("strace"):
            for k, c in enumerate(contestants):
                print(f"syscalls of one add, {c.label}: {count_syscalls(libxl, c, images[0], 95 + k)}")
        if args.existing:
            scale_rows(
                libxl,
                contestants,
                images,
                args.existing,
                max(3, args.iterations // 3),
                per_domain=args.per_domain,
                daemon_kind=args.daemon,
                trace=args.trace,
            )
        if args.parallel:
            parallel_rows(libxl, contestants, images[: args.parallel], args.parallel_rounds)
    print(f"load average after: {_loadavg()}")
    return 0


def parallel_rows(libxl: Libxl, contestants: list[Contestant], images: list[Path], rounds: int) -> None:
    """`len(images)` adds started at once, per contestant, `rounds` times interleaved (the row is
    the median round's wall), with the breakdown of that round (ParallelRun.breakdown)."""
    runs: dict[str, list[ParallelRun]] = {c.label: [] for c in contestants}
    n = len(images)
    for r in range(rounds):
        # The order changes each round (_turned): in a fixed order the first contestant always ran
        # right after the previous round's last (bash's 32 adds and their clean-up), and identical
        # add code measured 10-15 % slower in first place (bench/README.md, issue 18, flow18).
        for k, c in _turned(list(enumerate(contestants)), r):
            # fresh domains every round (a removed backend leaves its frontend's vdev in use)
            runs[c.label].append(parallel(libxl, c, images, 1000 + (r * len(contestants) + k) * (n + 1)))
    for label, done in runs.items():
        done.sort(key=lambda run: run.wall)
        median = done[len(done) // 2]
        walls = ", ".join(f"{run.wall * 1e3:.0f}" for run in done)
        failed = sum(run.failures for run in done)
        print(
            f"{n} parallel adds, wall: {label}: {median.wall * 1e3:.0f} ms (rounds: {walls}), {failed} failed"
        )
        print(f"  {median.breakdown()}")
    base = runs[contestants[0].label][len(runs[contestants[0].label]) // 2].wall
    for label, done in runs.items():
        print(f"ratio {label} / xenblockctl (parallel wall): {done[len(done) // 2].wall / base:.2f}x")


def laid_script(work: Path, python: str, checkout: Path = REPO, name: str = hostfiles.SCRIPT_NAME) -> Path:
    """The block script as `install-hooks` lays it for `python`, importing `checkout`, with its
    hotplug bundle (if its shim has one) in a directory of its own, written before any timing
    (as install-hooks does): contestants never share, or rewrite, each other's bundle."""
    where = hostfiles.local_layout()._replace(
        python=python, packages=str(checkout), cache_dir=str(work / f"{name}.cache")
    )
    laid = work / name
    shim = (checkout / "hotplug" / hostfiles.SCRIPT_NAME).read_text()
    laid.write_text(hostfiles.block_script(shim, where))
    laid.chmod(0o755)
    # A shim with a bundle: older ones named the option, today's hand argv to bundle.start (the
    # literal test alone missed them, and each laid script's first add wrote the bundle itself:
    # 32 at once in --only-parallel's first round, ~4-5 s; bench/README.md, issue 18, flow18).
    if "--write-bundle" in shim or "_reader.start(" in shim:
        wrote = subprocess.run([str(laid), "--write-bundle"], capture_output=True, text=True, check=False)
        used = subprocess.run([str(laid), "--write-bundle"], capture_output=True, text=True, check=False)
        if wrote.returncode not in (0, 3) or used.returncode != 0:  # 0: the bundle checked out and was used
            raise SystemExit(f"{laid} --write-bundle: {wrote.stderr}{used.stderr}")
    return laid


def laid_floor(work: Path, python: str) -> Path:
    """The floor laid as our script is: a two-line launcher importing the floor module from its
    cached bytecode, compiled before any timing. Run as a script, the floor's 270 lines were
    compiled from source in every add (1.9-3.8 ms, measured in session 13), a cost ours never pays
    (its bundle is marshalled once at install): the floor must not be slower than it need be."""
    where = work / "floor"
    where.mkdir()
    module = where / FLOOR.name
    shutil.copyfile(FLOOR, module)
    compiled = subprocess.run(
        [python, "-S", "-m", "py_compile", str(module)], capture_output=True, text=True, check=False
    )
    if compiled.returncode != 0:
        raise SystemExit(f"{module}: {compiled.stderr}")
    launcher = where / "floor-block"
    launcher.write_text(f"#!{python} -S\nimport {module.stem}\n{module.stem}.main()\n")
    launcher.chmod(0o755)
    return launcher


def baseline_contestant(work: Path, script: Path, python: str) -> Contestant:
    """Another checkout's script, laid as ours is (`-S`, its checkout appended) when its shim has
    the lines install-hooks rewrites, so before/after compares the code and not site.py; else its
    shim as it is, with site.py."""
    try:
        laid = laid_script(work, python, script.resolve().parents[1], "baseline-block-xenblockctl")
    except hostfiles.InstallError:
        return Contestant("baseline (before, shim with site)", script, python)
    return Contestant("baseline (before)", laid, python, flags=("-S",))


@contextlib.contextmanager
def xenstored(kind: str, *, trace: bool = False) -> Iterator[EmbeddedXenstored]:
    """The daemon every contestant talks to: Debian's C xenstored (LD_PRELOAD-stubbed,
    tests/fixtures/cxenstored.py; `trace`: with --trace-file) or the embedded one
    (tests/fixtures/xenstore.py)."""
    if kind == "embedded":
        with embedded_xenstored() as daemon:
            yield daemon
        return
    c = start_cxenstored(find_tools(), trace=trace)
    try:
        path = str(c.socket)
        yield EmbeddedXenstored(path, {"XENSTORED_PATH": path}, c.pid or 0, str(c.trace or ""))
    finally:
        c.stop()


def scale_rows(
    libxl: Libxl,
    contestants: list[Contestant],
    images: list[Path],
    existing: int,
    n: int,
    *,
    per_domain: int,
    daemon_kind: str,
    trace: bool = False,
) -> None:
    """Adds of a file and of a block device (a loop device bound beforehand, as an admin's) with no
    other backend and with `existing` published ones, interleaved: the populated backends live in a
    second daemon of the same kind, and each iteration runs the add against the empty one and the
    populated one in turn, so a change of load hits both rows alike. Per contestant the ratio of
    the two p50s (the goal: within 10 %)."""
    admin = loop.attach_file(str(images[-1]), read_only=False, tag="xenblockctl:bench-admin")
    with contextlib.ExitStack() as stack:
        stack.callback(admin.close)
        daemon = stack.enter_context(xenstored(daemon_kind, trace=trace))
        work = Path(tempfile.mkdtemp(prefix="xbc-bench-busy-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        busy = Libxl(daemon, work)
        stack.callback(busy.close)
        populate(busy, existing, per_domain)
        print(f"load average before the scaling rows: {_loadavg()}")
        targets: tuple[tuple[str, Path | str], ...] = (
            ("file", images[0]),
            ("block device", f"/dev/loop{admin.number}"),
        )
        for t, (label, target) in enumerate(targets):
            runners = list(enumerate(contestants))
            # per contestant: walls and CPUs with 0 and with `existing` backends
            walls: dict[str, tuple[list[float], list[float]]] = {c.label: ([], []) for _k, c in runners}
            cpus: dict[str, tuple[list[float], list[float]]] = {c.label: ([], []) for _k, c in runners}
            daemons: dict[str, tuple[list[float], list[float]]] = {c.label: ([], []) for _k, c in runners}
            walks: dict[str, list[bool]] = {c.label: [] for _k, c in runners}
            for i in range(n + 2):
                # contestants interleaved too, so that a baseline script sees the same load, and in
                # a turning order (_turned)
                for k, c in _turned(runners, i):
                    # the two sides in turn too: the first of the pair runs after another
                    # contestant's add (after bash's, ~370 ms of CPU, once per turn)
                    for side, harness in ((0, libxl), (1, busy))[:: 1 if i % 2 == 0 else -1]:
                        cpu: list[float] = []
                        used: list[float] = []
                        elapsed = add_once(
                            harness,
                            c,
                            target,
                            400 + 10 * t + k,
                            51712 + 16 * i,
                            cpu=cpu,
                            daemon=used,
                            walked=walks[c.label],
                        )
                        if elapsed is not None and i >= 2:  # warm-up
                            walls[c.label][side].append(elapsed)
                            cpus[c.label][side].append(cpu[0])
                            daemons[c.label][side].append(used[0])
            for _k, c in runners:
                zero, full = walls[c.label]
                print(row(f"add, {label}, 0 backends: {c.label}", zero))
                print(row(f"add, {label}, {existing} backends: {c.label}", full))
                ratio = percentile(full, 50) / percentile(zero, 50)
                cpu_zero, cpu_full = (percentile(side, 50) / 1e3 for side in cpus[c.label])
                xs_zero, xs_full = (percentile(side, 50) / 1e3 for side in daemons[c.label])
                print(
                    f"  ratio {existing} / 0 backends (p50): {ratio:.2f}x (goal <= 1.10x); "
                    f"minimum {min(full) / min(zero):.2f}x; CPU p50 {cpu_zero:.1f} -> {cpu_full:.1f} ms, "
                    f"xenstored's meanwhile {xs_zero:.2f} -> {xs_full:.2f} ms"
                )
                if c.server is not None and label == "block device":
                    print(
                        "  adds whose sharing check walked instead of asking the table: "
                        f"{sum(walks[c.label])} of {len(walks[c.label])}"
                    )


def _ours_and_baseline(contestants: list[Contestant]) -> list[Contestant]:
    return [c for c in contestants if c.label.startswith(("xenblockctl", "baseline"))]


def kernel_path(libxl: Libxl, image: Path, n: int, contestants: list[Contestant]) -> None:
    """Our add handed to a blkback-like consumer (sysfs physical_device, no `opened`): the path
    that turns AUTOCLEAR off after the hand-off, in a child forked once hotplug-status says
    connected (blockscript/autoclear.py; through the warm server, its worker after its reply);
    the engine path alternating with it, and with
    a baseline (another checkout: before/after) the same two for it. Each contestant runs as the
    serial rows run it (laid as install-hooks lays it: `-S`, its bundle): the shipped shim ran
    with site.py, which imports os, and so hid what the kernel path's own imports cost
    (bench/README.md, issue 18, class18). Also how long after our add exited the record said
    autoclear=0 (the deferred job's work, off the critical path; polled from here, so ±1 ms). The
    CPU of each add (user+sys of the script, its forked child not included) is printed too."""
    samples: dict[tuple[str, str], list[float]] = {
        (c.label, k): [] for c in contestants for k in ("engine", "kernel", "kernel-cpu")
    }
    child: list[float] = []
    for i in range(n + 2):
        for s, c in enumerate(contestants):
            for domid, kind in ((90 + 2 * s, "engine"), (91 + 2 * s, "kernel")):
                be = libxl.create_backend(domid, 51712 + 16 * i, str(image), "w", engine=kind == "engine")
                consumer = libxl.engine_consumer(be) if kind == "engine" else libxl.blkback_consumer(be)
                wall, cpu, result = c.timed("add", c.env(libxl, "add", be))
                exited = time.perf_counter()
                assert result.returncode == 0, result.stderr
                consumer.wait_opened()
                if kind == "kernel":
                    libxl.wait_autoclear_off(be)  # the baseline's record says so at once
                    if s == 0 and i >= 2:
                        child.append((time.perf_counter() - exited) * 1e6)
                _remove_any(libxl, c, be)
                consumer.release()
                libxl.store.rm(be.path)
                if i >= 2:
                    samples[(c.label, kind)].append(wall)
                    if kind == "kernel":
                        samples[(c.label, "kernel-cpu")].append(cpu)
    for c in contestants:
        label = c.label
        kernel, engine = samples[(label, "kernel")], samples[(label, "engine")]
        print(row(f"add, kernel-blkback hand-off: {label}", kernel))
        print(row("  CPU of that process (user+sys)", samples[(label, "kernel-cpu")]))
        print(row(f"add, engine hand-off (same loop): {label}", engine))
        ratio = percentile(kernel, 50) / percentile(engine, 50)
        print(f"ratio kernel / engine path (p50), {label}: {ratio:.2f}x")
    print(row("  record says autoclear=0, after our kernel-path add exited", child))


def count_syscalls(libxl: Libxl, c: Contestant, image: Path, domid: int) -> str:
    be = libxl.create_backend(domid, 51712, str(image), "w", engine=not c.bash)
    consumer = None if c.bash else libxl.engine_consumer(be)
    out = libxl.workdir / "strace.txt"
    env = c.env(libxl, "add", be)
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
    """One script under test and its samples (µs). `server`: the warm hotplug server its client
    asks (the program is then exec'd directly, `interpreter` empty), whose CPU (its workers')
    each timed run adds to the client's."""

    def __init__(
        self,
        label: str,
        script: Path,
        interpreter: str,
        *,
        bash: bool = False,
        flags: tuple[str, ...] = (),
        server: WarmServer | None = None,
    ) -> None:
        self.label = label
        self.script = script
        self.interpreter = interpreter
        self.flags = flags  # interpreter flags of the script's `#!` line
        self.bash = bash
        self.server = server
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.remove: list[float] = []
        self.failures = 0

    def argv(self, action: str) -> list[str]:
        if not self.interpreter:
            return [str(self.script), action]
        return [self.interpreter, *self.flags, str(self.script), action]

    def env(self, libxl: Libxl, action: str, be: Backend) -> dict[str, str]:
        if self.bash:
            return bash_env(libxl, be.relative)
        env = libxl.env(action, be)
        if self.server is not None:
            env[WarmServer.SOCKET_ENV] = str(self.server.socket)
            # its worker says on stderr whether the sharing check asked the server's table or walked
            env[WARM_SHARING_ENV] = "1"
        elif not self.interpreter:  # the client with no server: its fallback, as on a host without one
            env[WarmServer.SOCKET_ENV] = str(self.script.parent / "no-server.sock")
        return env

    def timed(
        self, action: str, env: dict[str, str]
    ) -> tuple[float, float, subprocess.CompletedProcess[str]]:
        """_timed, plus the server's CPU meanwhile (its worker's) for a warm contestant."""
        before = self.server.cpu_us() if self.server is not None else 0.0
        wall, cpu, result = _timed(self.argv(action), env)
        if self.server is not None:
            cpu += self.server.cpu_us() - before
        return wall, cpu, result


class WarmServer:
    """The warm hotplug server as xenblockctl-hotplug.service starts it (ExecStart: the laid
    Python script with --serve, exec'd by its own #! line; UMask=0077; a session of its own), its
    socket in `directory`. It runs in a cpuacct cgroup of its own (as the unit in its own cgroup):
    the workers it forks, and reaps, are counted there in ns, not in this process's children."""

    SOCKET_ENV = warm.SOCKET_ENV
    CPUACCT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, script: Path, directory: Path) -> None:
        self.socket = directory / "hotplug.sock"
        self.log = directory / "hotplug-server.log"
        self.group = self.CPUACCT / f"xbc-bench-warm-{os.getpid()}"
        self.group.mkdir()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", self.SOCKET_ENV: str(self.socket)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(script), "--serve"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
                cwd="/",
                # in its group before it runs anything (its workers then are too)
                preexec_fn=self._join,  # noqa: PLW1509 (single-threaded at this point: no consumers yet)
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the hotplug server did not come up: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def _join(self) -> None:
        (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_us(self) -> float:
        """The server's and its workers' CPU so far (µs), once it has reaped every worker (a
        worker's exit, after its client got the status, is part of an add's cost)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                if not children.read_text().split():
                    break
            except OSError:
                break
            time.sleep(0.0002)
        return int((self.group / "cpuacct.usage").read_text()) / 1e3

    def stop(self) -> None:
        # what the server said of its sharing tables (sharetable.py): a reading of the block-device
        # rows shows whether its adds asked a table or walked
        for line in self.log.read_text(errors="replace").splitlines():
            if "sharing table" in line:
                print(f"warm server: {line}")
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # workers (and their AUTOCLEAR jobs) still in the group finish on their own (KillMode=process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.group.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"cannot remove {self.group}: processes still in it", file=sys.stderr)


def warm_contestants(
    work: Path, python: str, stack: contextlib.ExitStack, *, fallback: bool
) -> list[Contestant]:
    """The client as setup.py built it into this checkout (xenblockctl/libexec/), laid with the
    Python script beside it, and its server started; with `fallback` the same client with no
    server too (it execs the script: a host where the server is not running). Empty (said why)
    when the client or cpuacct is missing."""
    client = REPO / "xenblockctl" / "libexec" / hostfiles.SCRIPT_NAME
    if not client.is_file():
        print(f"no warm contestant: {client} not built (setup.py build_ext --inplace)", file=sys.stderr)
        return []
    if not WarmServer.CPUACCT.is_dir():
        print(f"no warm contestant: no {WarmServer.CPUACCT} to count its workers' CPU", file=sys.stderr)
        return []
    directory = work / "warm"
    directory.mkdir()
    script = laid_script(directory, python, name=hostfiles.SCRIPT_NAME + hostfiles.PYTHON_SUFFIX)
    laid = directory / hostfiles.SCRIPT_NAME
    shutil.copyfile(client, laid)
    laid.chmod(0o755)
    server = WarmServer(script, directory)
    stack.callback(server.stop)
    found = [Contestant("xenblockctl, warm server + C client", laid, "", server=server)]
    if fallback:
        found.append(Contestant("xenblockctl, C client, no server", laid, ""))
    return found


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


def _balanced_orders(n: int) -> list[list[int]]:
    """Orders of n contestants in which each one runs right after each other one equally often (a
    Williams design: row 0 is 0, 1, n-1, 2, n-2, ..., row r adds r mod n; for odd n each row is
    also run reversed). A cyclic shift of one order is not enough: it keeps who follows whom, so
    the contestant after the bash script's add (~50 ms of CPU) followed it in 3 of 4 turns and
    identical code measured 0.6-1.0 ms slower there (bench/README.md, issue 18, session 15)."""
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]
    rows = [[(x + r) % n for x in first] for r in range(n)]
    rows = rows + [row[::-1] for row in rows] if n % 2 else rows
    if n < 2 or len(rows) > 6:
        return rows

    # The rows run one after another, so each row's last contestant also precedes the next row's
    # first: of the rows' cyclic sequences, the one where the last contestant (the bash script,
    # whose add costs ~50 ms of CPU) precedes every other one equally often, and then the fewest
    # repeated pairs (with 4 contestants: two boundaries pair a contestant with itself).
    def cost(seq: Iterable[list[int]]) -> tuple[int, int]:
        after: dict[tuple[int, int], int] = {}
        flat = [x for row in seq for x in row]
        for a, b in zip(flat, flat[1:] + flat[:1], strict=True):
            if a != b:
                after[a, b] = after.get((a, b), 0) + 1
        heavy = [after.get((n - 1, x), 0) for x in range(n - 1)]
        return max(heavy) - min(heavy), sum(c * c for c in after.values())

    return list(min(itertools.permutations(rows), key=cost))


def _turned(runners: list[tuple[int, Contestant]], i: int) -> list[tuple[int, Contestant]]:
    """`runners` in iteration i's order of _balanced_orders: the serial, scaling and parallel rows'
    order changes each iteration so that no contestant always runs right after the same other one
    (in a fixed order ours always ran right after the bash script's add, and identical code measured
    ~1 ms slower there, in CPU too: bench/README.md, issue 18, sessions 14 and 15)."""
    rows = _balanced_orders(len(runners))
    return [runners[j] for j in rows[i % len(rows)]]


def measure_alternating(libxl: Libxl, contestants: list[Contestant], image: Path, iterations: int) -> None:
    """Each iteration runs every contestant's add and remove once, on a fresh backend each (2
    warm-up rounds), so a change of machine load hits all of them alike. The order turns each
    iteration (_turned)."""
    for i in range(iterations + 2):
        for k, c in _turned(list(enumerate(contestants)), i):
            be = libxl.create_backend(5 + 10 * k, 51712 + 16 * i, str(image), "w", engine=not c.bash)
            consumer = None if c.bash else libxl.engine_consumer(be)
            wall, cpu, result = c.timed("add", c.env(libxl, "add", be))
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
    wall, _cpu, result = c.timed("remove", c.env(libxl, "remove", be))
    assert result.returncode == 0 or c.bash, (c.label, result.stderr)
    return wall


def populate(libxl: Libxl, count: int, per_domain: int = 1) -> None:
    """Backends that already have a published disk, as on a busy dom0: both scripts' sharing checks
    must look at every one of them. `per_domain` backends per frontend domain (the walk over
    backend/vbd lists each domain's directory)."""
    for i in range(count):
        be = libxl.create_backend(
            200 + i // per_domain, 51712 + 16 * (i % per_domain), f"/srv/existing-{i}.img", "w", engine=False
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
        elapsed = add_once(libxl, c, target, domid, 51712 + 16 * i)
        if elapsed is not None and i >= 2:  # warm-up
            samples.append(elapsed)
    return samples


def add_once(
    libxl: Libxl,
    c: Contestant,
    target: Path | str,
    domid: int,
    devid: int,
    *,
    cpu: list[float] | None = None,
    daemon: list[float] | None = None,
    walked: list[bool] | None = None,
) -> float | None:
    """One add (wall µs) and its remove on a fresh backend; None when the bash script lost
    losetup's EBUSY race (as in measure_alternating). The add's CPU (µs) is appended to `cpu`,
    xenstored's CPU during it (µs, /proc schedstat) to `daemon`, and to `walked` whether a warm
    add's sharing check walked every backend instead of asking the server's table."""
    be = libxl.create_backend(domid, devid, str(target), "w", engine=not c.bash)
    consumer = None if c.bash else libxl.engine_consumer(be)
    daemon_before = _schedstat_us(libxl.xenstored.pid)
    elapsed, used, result = c.timed("add", c.env(libxl, "add", be))
    if daemon is not None:
        daemon.append(_schedstat_us(libxl.xenstored.pid) - daemon_before)
    if cpu is not None:
        cpu.append(used)
    if walked is not None:
        walked.append("warm-sharing: walk" in result.stderr)
    if result.returncode != 0 and c.bash:
        _remove_any(libxl, c, be)
        libxl.store.rm(be.path)
        return None
    assert result.returncode == 0, (c.label, result.stderr)
    if consumer is not None:
        consumer.wait_opened()
        consumer.release()
    _remove_any(libxl, c, be)
    libxl.store.rm(be.path)
    return elapsed


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


def _conflicts(libxl: Libxl) -> int | None:
    """EAGAIN replies (transaction conflicts) in the C daemon's trace so far; None without a
    trace (the default: `--trace`)."""
    trace = Path(libxl.xenstored.trace_path) if libxl.xenstored.trace_path else None
    if trace is None or not trace.is_file():
        return None
    return trace.read_text(errors="replace").count("EAGAIN")


def _schedstat_us(pid: int | None) -> float:
    """A process's CPU time so far in µs (/proc/<pid>/schedstat: ns, unlike stat's 10 ms ticks);
    0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e3
    except (OSError, ValueError, IndexError):
        return 0.0


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + sys) a live process has used so far (common.process_cpu); 0 if gone."""
    try:
        return process_cpu(pid)
    except OSError:
        return 0.0


class ParallelRun:
    """One `parallel` row of one contestant: wall (s), failures, and where the time went."""

    def __init__(self, wall: float, failures: int) -> None:
        self.wall, self.failures = wall, failures
        self.cpu: list[float] = []  # per add, s (wait4 rusage: the script and its children)
        self.exits: list[float] = []  # per add, s from the first start to its exit
        self.voluntary: list[int] = []  # per add: blocking waits (select, flock, sleep, ioctls)
        self.involuntary: list[int] = []  # per add: preempted
        self.bench_cpu = 0.0  # this process meanwhile: the consumers' threads (and the reaping)
        self.daemon_cpu = 0.0  # xenstored meanwhile (10 ms ticks)
        self.conflicts: int | None = None  # EAGAIN replies: only with the daemon's trace (--trace)
        self.idle = 0.0  # host idle CPU time (all CPUs) during the row: waits nobody filled
        self.server_cpu = 0.0  # a warm contestant's server and workers (in `cpu`, shared evenly)

    def breakdown(self) -> str:
        adds, cpus = sum(self.cpu), os.cpu_count() or 1
        every = (adds + self.bench_cpu + self.daemon_cpu) / cpus * 1e3
        ms = [percentile(self.exits, p) * 1e3 for p in (10, 50, 90)]
        switches = percentile([float(v) for v in self.voluntary], 50)
        preempted = percentile([float(v) for v in self.involuntary], 50)
        server = f"; hotplug server + workers {self.server_cpu * 1e3:.0f} ms of it" if self.server_cpu else ""
        return (
            f"CPU: adds {adds * 1e3:.0f} ms (p50 {percentile(self.cpu, 50) * 1e3:.1f} ms each{server}), "
            f"consumers {self.bench_cpu * 1e3:.0f} ms, xenstored {self.daemon_cpu * 1e3:.0f} ms: "
            f"all / {cpus} CPUs = "
            f"{every:.0f} ms; host idle {self.idle * 1e3:.0f} ms; exits p10/p50/p90 "
            f"{ms[0]:.0f}/{ms[1]:.0f}/{ms[2]:.0f} ms; per add p50 {switches:.0f} "
            f"blocking waits, {preempted:.0f} preemptions; "
            + ("EAGAIN not counted (--trace)" if self.conflicts is None else f"{self.conflicts} EAGAIN")
        )


def _idle() -> float:
    """Idle CPU seconds of the whole host so far (all CPUs, /proc/stat's idle + iowait)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def parallel(libxl: Libxl, c: Contestant, images: list[Path], first_domid: int) -> ParallelRun:
    """N adds started at once on distinct backends and images; wall seconds and failures, and a
    breakdown: each add's CPU and blocking waits (wait4's rusage), when each exited, the CPU this
    process's consumer threads and xenstored spent meanwhile, and the transaction conflicts
    (EAGAIN) the daemon answered (fixture and consumers included)."""
    conflicts_before = _conflicts(libxl)
    backends = [
        libxl.create_backend(first_domid + i, 51712, str(img), "w", engine=not c.bash)
        for i, img in enumerate(images)
    ]
    consumers = [] if c.bash else [libxl.engine_consumer(be) for be in backends]
    server_before = c.server.cpu_us() if c.server is not None else 0.0
    daemon_pid = libxl.xenstored.pid
    daemon_before = _proc_cpu(daemon_pid)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    idle_before = _idle()
    start = time.perf_counter()
    procs = {
        p.pid: p
        for p in (
            subprocess.Popen(
                c.argv("add"),
                env=c.env(libxl, "add", be),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for be in backends
        )
    }
    reaped: list[tuple[int, float, resource.struct_rusage]] = []
    while len(reaped) < len(procs):
        pid, status, usage = os.wait4(-1, 0)
        if pid in procs:
            procs[pid].returncode = os.waitstatus_to_exitcode(status)
            reaped.append((procs[pid].returncode, time.perf_counter() - start, usage))
    wall = time.perf_counter() - start
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    run = ParallelRun(wall, sum(code != 0 for code, _t, _u in reaped))
    run.idle = _idle() - idle_before
    run.daemon_cpu = _proc_cpu(daemon_pid) - daemon_before
    run.bench_cpu = self_after.ru_utime + self_after.ru_stime - self_before.ru_utime - self_before.ru_stime
    # a warm add's CPU is its client's and its worker's: the server's (and its workers') CPU over the
    # row, shared evenly (µs -> s)
    share = 0.0
    if c.server is not None:
        run.server_cpu = (c.server.cpu_us() - server_before) / 1e6
        share = run.server_cpu / len(reaped)
    for _code, exited, usage in reaped:
        run.cpu.append(usage.ru_utime + usage.ru_stime + share)
        run.exits.append(exited)
        run.voluntary.append(usage.ru_nvcsw)
        run.involuntary.append(usage.ru_nivcsw)
    conflicts_after = _conflicts(libxl)
    if conflicts_before is not None and conflicts_after is not None:
        run.conflicts = conflicts_after - conflicts_before
    for consumer in consumers:
        with contextlib.suppress(Exception):
            consumer.wait_opened(5)
        consumer.release()
    for be in backends:
        _remove_any(libxl, c, be)
        libxl.store.rm(be.path)
    return run


if __name__ == "__main__":
    sys.exit(main())
