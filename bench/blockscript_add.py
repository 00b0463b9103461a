"""Full `add` as libxl runs it (a fresh process), ours vs Xen's bash `block` script, same xenstore.

    sudo .venv/bin/python -m bench.blockscript_add [--iterations 30] [--parallel 32]

Both run against one embedded xenstored; the bash script (Debian's xen-utils-common, extracted
into .cache/ with `apt-get download`, never installed) talks to it with Debian's xenstore-*
CLIs (package xenstore-utils) through XENSTORED_PATH. Ours is measured end to end *including*
the hand-off: it only exits once an engine-like consumer has opened the device and confirmed the
luid; the bash script does no hand-off at all (it exits after writing physical-device).
Rows: p50/p90 of single adds, then the wall time of N adds started at once on distinct backends."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import percentile, row
from tests.fixtures.libxl import Libxl
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
    os.makedirs("/var/log/xen", exist_ok=True)  # the bash script appends its stderr there
    daemon = _start()
    work = Path(tempfile.mkdtemp(prefix="xbc-bench-"))
    libxl = Libxl(daemon.info, work)
    try:
        images = [work / f"disk{i}.img" for i in range(max(args.parallel, 1))]
        for image in images:
            with open(image, "wb") as f:
                f.truncate(16 << 20)
        ours = measure_ours(libxl, images[0], args.iterations)
        print(f"block script add, fresh process, {args.iterations} iterations (embedded xenstored)")
        print(row("xenblockctl add (incl. hand-off to consumer)", ours))
        theirs: list[float] = []
        if bash is not None:
            theirs = measure_bash(libxl, bash, images[0], args.iterations)
            print(row("Xen bash block add (no hand-off)", theirs))
            print(f"ratio bash/ours (p50): {percentile(theirs, 50) / percentile(ours, 50):.1f}x")
        if args.existing:
            populate(libxl, args.existing)
            n = max(3, args.iterations // 3)
            admin = loop.attach_file(str(images[-1]), read_only=False, tag="xenblockctl:bench-admin")
            try:
                for label, target in (("file", images[0]), ("block device", f"/dev/loop{admin.number}")):
                    ours_n = measure_ours(libxl, target, n)
                    print(row(f"xenblockctl add, {label}, {args.existing} backends", ours_n))
                    if bash is not None:
                        theirs_n = measure_bash(libxl, bash, target, n)
                        print(row(f"Xen bash add, {label}, {args.existing} backends", theirs_n))
                        ratio = percentile(theirs_n, 50) / percentile(ours_n, 50)
                        print(f"ratio bash/ours (p50, {label}, {args.existing} backends): {ratio:.1f}x")
            finally:
                admin.close()
        wall_ours = parallel_ours(libxl, images[: args.parallel])
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
    return 0


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


def measure_ours(libxl: Libxl, image: Path | str, iterations: int) -> list[float]:
    samples = []
    for i in range(iterations + 2):
        be = libxl.create_backend(5, 51712 + 16 * i, str(image), "w")
        consumer = libxl.engine_consumer(be)
        start = time.perf_counter()
        result = libxl.run("add", be)
        elapsed = (time.perf_counter() - start) * 1e6
        assert result.returncode == 0, result.stderr
        consumer.wait_opened()
        consumer.release()
        libxl.store.write(be.node("state"), "6")
        libxl.run("remove", be)
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


def parallel_ours(libxl: Libxl, images: list[Path]) -> float:
    backends = [libxl.create_backend(20 + i, 51712, str(img), "w") for i, img in enumerate(images)]
    consumers = [libxl.engine_consumer(be) for be in backends]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            libxl.argv("add"),
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
        libxl.store.write(be.node("state"), "6")
        libxl.run("remove", be)
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
