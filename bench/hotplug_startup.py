"""Start-up cost of the hotplug entry point (paid on every VM start), against the bare interpreter.

    .venv/bin/python -m bench.hotplug_startup [--runs 30] [--python /path/to/python3] [--baseline OLD]
        # OLD: another checkout, `git archive main xenblockctl hotplug | tar -x -C OLD`

Rows (fresh processes, same interpreter, alternating so load changes hit every row alike; wall
and CPU time of the child):
  * `python -S -c pass` and `python -c pass`: the interpreter alone, without and with site.py
    (a development venv's editable install adds a finder that site.py loads on every start);
  * the imports `add` and `remove` need, with site, as a bare `python -c` (teardown at exit, GC on);
  * the same the way hotplug/block-xenblockctl runs them: GC off during start-up, os._exit after;
  * the same the way the script `xenblockctl install-hooks` lays runs them: `python -S`, the
    package's directory appended to sys.path by the script, GC off, os._exit;
  * laid-script style, what `add` alone and what `remove` alone import (remove's graph holds
    nothing of add's), for this checkout and, with `--baseline`, for another one in the same loop;
  * the same through this checkout's laid script with its hotplug bundle (blockscript/bundle.py):
    the laid script's own lines up to its import of main, then the action's imports, os._exit;
    and `add` on a miss (its bundle directory removed before each run: what a first add after an
    upgrade pays; the writer it starts is waited for outside the time), here and for --baseline;
then the syscalls of one run of the bare interpreter and of the imports (strace -f -c), then the
slowest imports of one run (`python -S -X importtime`, site's own imports left out).

Bytecode: the children run without PYTHONDONTWRITEBYTECODE and one warm-up run writes the caches
first, so a stale __pycache__ never shows up as import time (with the variable set, every edited
module would be compiled again in every run)."""

from __future__ import annotations

import argparse
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import percentile, row, run_once
from tests.fixtures.libxl import wait_gone
from xenblockctl.blockscript import bundle
from xenblockctl.toolstack import hostfiles

ROOT = Path(__file__).resolve().parents[1]
#: The hotplug path's roots (hotplug.main, both actions, the link main connects with).
IMPORTS = f"import {', '.join(bundle.ROOTS)}"
#: What the shim adds around the imports (hotplug/block-xenblockctl).
SHIM_STYLE = f"import gc, os; gc.disable(); {IMPORTS}; os._exit(0)"
#: What the laid script (toolstack/hostfiles.block_script) runs under `python -S`.
LAID_STYLE = f"import sys; sys.path.append({str(ROOT)!r}); {SHIM_STYLE}"
#: One action's imports: hotplug.main's for every action (config, settings, vbd, the client and its
#: link), then the action's module.
_MAIN = ", ".join(bundle.MAIN_ROOTS)
ACTION_IMPORTS = {action: f"import {_MAIN}, xenblockctl.blockscript.{action}" for action in ("add", "remove")}


def laid_imports(checkout: Path, imports: str) -> str:
    """`imports` as the laid script runs them from `checkout`."""
    return f"import gc, os, sys; gc.disable(); sys.path.append({str(checkout)!r}); {imports}; os._exit(0)"


def bundled_script(
    work: Path, py: str, imports: str, *, with_bundle: bool = True, checkout: Path = ROOT
) -> Path:
    """`checkout`'s block script as install-hooks lays it for `py`, its bundle written, cut
    where it imports main: `imports` and _exit run instead. It prints the thread CPU time (ns)
    from its first import (`import gc`, the laid lines' own imports included: the script's
    `os` was ~1 ms of them until issue 18 round 10) to the end of the imports: the import
    segment alone, without the interpreter's start-up, whose noise hides a 1 ms change on a
    loaded host.
    `with_bundle=False`: the same script with no bundle directory (the loader skipped). Its
    bundle directory is cache_of(script), one per script: never another's bundle."""
    number = len(list(work.iterdir()))
    script = work / f"{number}.py"
    cache = cache_of(script)
    where = hostfiles.local_layout()._replace(python=py, packages=str(checkout), cache_dir=str(cache))
    laid = hostfiles.block_script((checkout / "hotplug" / hostfiles.SCRIPT_NAME).read_text(), where)
    begin = laid.index("\nimport gc") + 1
    cut = laid.index("from xenblockctl.blockscript.hotplug import main")
    head = f"{laid[:begin]}import time\n_t0 = time.thread_time_ns()\n{laid[begin:cut]}"
    if not with_bundle:
        named = (
            f"_bundle_dir = posix.environ.get({bundle.CACHE_DIR_ENV.encode()!r}, b'')"
            ".decode('utf-8', 'surrogateescape') or"
        )
        if named not in head:
            raise SystemExit(f"the laid script does not name its bundle directory as {named!r} …")
        head = head.replace(named, "_bundle_dir = None and")
    # posix: the laid where-lines import it (the script itself no longer imports os)
    script.write_text(
        f"{head}{imports}\nposix.write(1, b'%d' % (time.thread_time_ns() - _t0))\nposix._exit(0)\n"
    )
    script.chmod(0o755)  # a miss starts it as the bundle's writer, as libxl starts a laid script
    if not with_bundle:
        return script
    wrote = subprocess.run(
        [py, "-S", str(script), "--write-bundle"], capture_output=True, text=True, check=False
    )
    used = subprocess.run(
        [py, "-S", str(script), "--write-bundle"], capture_output=True, text=True, check=False
    )
    if wrote.returncode not in (0, 3) or used.returncode != 0:
        raise SystemExit(f"{script} --write-bundle: {wrote.stderr}{used.stderr}")
    return script


def cache_of(script: Path) -> Path:
    """The bundle directory of a script bundled_script wrote."""
    return script.with_name(f"{script.stem}-cache")


def _writer_done(stderr: str) -> None:
    """Wait for the bundle writer a miss started (its pid in the script's log line), so that it
    never competes with the next case; a script that compiled in line started none."""
    for line in stderr.splitlines():
        if "normal imports; writer " in line:
            wait_gone(int(line.split("writer ")[1].split()[0]), timeout=120)


def segments(py: str, runs: int, env: dict[str, str], baseline: Path | None = None) -> None:
    """The import segment's thread CPU time (bundled_script), each action with and without its
    bundle, and with `baseline` that checkout's laid script with its bundle; fresh processes,
    interleaved. "miss": `add` with its bundle directory removed before each run, as after an
    upgrade without the postinst (a writer it starts is waited for after the run, outside the
    time: what is timed is what the add itself pays on libxl's path)."""
    work = Path(tempfile.mkdtemp(prefix="xbc-segment-"))
    try:
        cases = {
            f"{action}, {kind}": [
                py,
                "-S",
                str(bundled_script(work, py, imports, with_bundle=kind == "bundle")),
                action,
            ]
            for action, imports in ACTION_IMPORTS.items()
            for kind in ("no bundle", "bundle")
        }
        if baseline is not None:
            for action, imports in ACTION_IMPORTS.items():
                script = bundled_script(work, py, imports, checkout=baseline)
                cases[f"{action}, baseline's bundle"] = [py, "-S", str(script), action]
        misses = {"add, miss": ROOT} | ({} if baseline is None else {"add, baseline's miss": baseline})
        for name, checkout in misses.items():
            script = bundled_script(work, py, ACTION_IMPORTS["add"], checkout=checkout)
            cases[name] = [py, "-S", str(script), "add"]
        times: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(runs + 3):
            for name, argv in cases.items():
                if name in misses:
                    shutil.rmtree(cache_of(Path(argv[2])), ignore_errors=True)
                done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
                if name in misses:
                    _writer_done(done.stderr)
                if i >= 3:
                    times[name].append(int(done.stdout) / 1e3)
    finally:
        shutil.rmtree(work)
    print(f"import segment (the laid script's first import to its last), thread CPU, {runs} runs:")
    for name, values in times.items():
        print(row(f"  {name}", values))
    for action in ACTION_IMPORTS:
        plain, bundled = (percentile(times[f"{action}, {kind}"], 50) for kind in ("no bundle", "bundle"))
        print(
            f"{action}'s import segment, CPU p50: {plain / 1e3:.2f} -> {bundled / 1e3:.2f} ms with the bundle"
        )
        if baseline is not None:
            base = percentile(times[f"{action}, baseline's bundle"], 50)
            print(
                f"{action}'s import segment with the bundle, CPU p50: {bundled / 1e3:.2f} ms, "
                f"baseline {base / 1e3:.2f} ms"
            )
    missed = percentile(times["add, miss"], 50)
    line = f"add's import segment on a miss (no bundle yet), CPU p50: {missed / 1e3:.2f} ms"
    if baseline is not None:
        theirs = percentile(times["add, baseline's miss"], 50)
        line += f", baseline {theirs / 1e3:.2f} ms"
    print(line)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--baseline", type=Path, help="another checkout (xenblockctl/ and hotplug/) to compare"
    )
    args = parser.parse_args()
    py = args.python
    env = child_env()
    cases = {
        "python -S -c pass": [py, "-S", "-c", "pass"],
        "python -c pass": [py, "-c", "pass"],
        "python -c '<hotplug imports>'": [py, "-c", IMPORTS],
        "  as the shim runs them (GC off, _exit)": [py, "-c", SHIM_STYLE],
        "  as the laid script runs them (-S, GC off, _exit)": [py, "-S", "-c", LAID_STYLE],
    }
    checkouts = {"": ROOT} if args.baseline is None else {"": ROOT, " (baseline)": args.baseline.resolve()}
    for label, checkout in checkouts.items():
        for action, imports in ACTION_IMPORTS.items():
            cases[f"  {action}'s imports alone, laid style{label}"] = [
                py,
                "-S",
                "-c",
                laid_imports(checkout, imports),
            ]
    work = Path(tempfile.mkdtemp(prefix="xbc-startup-"))
    for action, imports in ACTION_IMPORTS.items():
        cases[f"  {action}'s imports alone, laid script with its bundle"] = [
            py,
            "-S",
            str(bundled_script(work, py, imports)),
            action,  # the loader reads the sections this action needs
        ]
    subprocess.run([py, "-c", IMPORTS], cwd=ROOT, env=env, check=True)  # write the bytecode caches
    for checkout in checkouts.values():
        for imports in ACTION_IMPORTS.values():
            subprocess.run([py, "-S", "-c", laid_imports(checkout, imports)], cwd=ROOT, env=env, check=True)
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for i in range(args.runs + 3):
            for name, argv in cases.items():
                wall, cpu = run_once(argv, env, ROOT)
                if i >= 3:
                    walls[name].append(wall)
                    cpus[name].append(cpu)
    finally:
        shutil.rmtree(work)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"hotplug start-up, {args.runs} fresh processes each, python {py}, load average {load}")
    for name in cases:
        print(row(name, walls[name]))
        print(row("  CPU (user+sys)", cpus[name]))
    count = subprocess.run(
        [py, "-c", IMPORTS + "; import sys; print(len(sys.modules))"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    bare, imports = "python -c pass", "python -c '<hotplug imports>'"
    extra_ms = (percentile(walls[imports], 50) - percentile(walls[bare], 50)) / 1e3
    extra_cpu = (percentile(cpus[imports], 50) - percentile(cpus[bare], 50)) / 1e3
    print(
        f"import cost over the bare interpreter (p50): {extra_ms:.1f} ms wall, {extra_cpu:.1f} ms CPU; "
        f"{count} modules in sys.modules"
    )
    laid, shim = (
        "  as the laid script runs them (-S, GC off, _exit)",
        "  as the shim runs them (GC off, _exit)",
    )
    print(
        "laid script vs shim (p50): "
        f"{percentile(walls[laid], 50) / 1e3:.1f} vs {percentile(walls[shim], 50) / 1e3:.1f} ms wall, "
        f"{percentile(cpus[laid], 50) / 1e3:.1f} vs {percentile(cpus[shim], 50) / 1e3:.1f} ms CPU"
    )
    for action in ACTION_IMPORTS:
        plain, bundled = (
            percentile(cpus[f"  {action}'s imports alone, laid {kind}"], 50)
            for kind in ("style", "script with its bundle")
        )
        print(
            f"{action}'s imports, CPU p50: {plain / 1e3:.2f} ms, with the bundle {bundled / 1e3:.2f} ms "
            f"({(bundled - plain) / 1e3:+.2f} ms)"
        )
    if args.baseline is not None:
        for action in ACTION_IMPORTS:
            ours, base = (cpus[f"  {action}'s imports alone, laid style{label}"] for label in checkouts)
            mine, theirs = percentile(ours, 50), percentile(base, 50)
            print(
                f"{action}'s imports, laid style, CPU p50: {mine / 1e3:.2f} ms, "
                f"baseline {theirs / 1e3:.2f} ms ({mine / theirs:.3f}x)"
            )
    segments(py, args.runs, env, None if args.baseline is None else args.baseline.resolve())
    if shutil.which("strace"):
        for name in ("python -c pass", "python -c '<hotplug imports>'", laid):
            print(f"syscalls, {name}: {count_syscalls(cases[name], env)}")
    # -S: site.py (and an editable install's finder) would otherwise shadow our own graph; the
    # minimum over a few runs, since one stall would otherwise top the list
    # GC off as the laid script has it: a collection falls on the same module every run (the
    # allocation count is deterministic) and would show up as that module's self time
    probe = f"import gc, sys; gc.disable(); sys.path[:0] = sys.argv[1:]; {IMPORTS}"
    best: dict[str, tuple[int, int]] = {}
    for _ in range(5):
        trace = subprocess.run(
            [py, "-S", "-X", "importtime", "-c", probe, str(ROOT), *site_dirs(py)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        for line in trace.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            self_text, cumulative_text, name = (
                part.strip() for part in line.removeprefix("import time:").split("|")
            )
            seen = best.get(name, (1 << 62, 1 << 62))
            best[name] = (min(seen[0], int(cumulative_text)), min(seen[1], int(self_text)))
    total_self = sum(self_us for _cumulative, self_us in best.values()) / 1e3
    print(
        f"imports without site, minimum of 5 runs: {len(best)} modules, {total_self:.1f} ms summed self time"
    )
    print("slowest (cumulative us, self us):")
    for name, (cumulative, self_us) in sorted(best.items(), key=lambda item: -item[1][0])[:14]:
        print(f"  {cumulative:>8} {self_us:>8}  {name}")
    return 0


def count_syscalls(argv: list[str], env: dict[str, str]) -> str:
    """Total syscalls of one run (strace -f -c's summary line)."""
    out = subprocess.run(
        ["strace", "-f", "-c", "-o", "/dev/stdout", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    totals = [line.split() for line in out.splitlines() if line.rstrip().endswith("total")]
    return totals[0][3] if totals and len(totals[0]) >= 5 else "?"


def site_dirs(py: str) -> list[str]:
    """The site-packages directories `py` uses (venv-aware: asked of `py` itself, with site on)."""
    if py == sys.executable:
        return site.getsitepackages()
    out = subprocess.run(
        [py, "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


if __name__ == "__main__":
    sys.exit(main())
