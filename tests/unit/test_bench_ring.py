"""The data-plane benchmarks still run against the current engine (they reach into it: a quick smoke run
each, so an API change breaks a test here rather than the next person's measurement)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.batch_frontend import BatchFrontend
from xenblockctl.backend import blkif, fastpath, grantcopy
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.ring import BackRing
from xenblockctl.backend.transport.local import LocalTransport

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_ring_cpu_runs_both_modes() -> None:
    out = _run("bench.ring_cpu", "--rounds", "6", "--only", "1,2")
    assert "4 KiB random read" in out
    assert "frontend" in out
    assert "64 KiB random read" in out
    assert out.count("per-request") == 2  # each workload
    passes = 2 if fastpath.available() else 1  # python, and native where it is built
    assert out.count("persistent ") == 2 * passes  # each workload, on each ring pass
    assert out.count("persistent  python") == 2
    assert out.count("persistent  native") == 2 * (passes - 1)
    assert "grant maps" in out
    out = _run("bench.ring_cpu", "--rounds", "6", "--only", "3", "--engine-only")
    assert "1 MiB sequential read" in out
    assert "frontend" not in out


def test_ring_cpu_runs_grubs_shape_by_grant_copy() -> None:
    """--persistent copy --qd 1: GRUB's one 4 KiB READ per pass, on each grant-copy pass."""
    out = _run("bench.ring_cpu", "--rounds", "6", "--only", "1", "--qd", "1", "--persistent", "copy")
    assert "QD  1 grant copy  python" in out
    assert out.count("grant copy  native") == (1 if grantcopy.native_available() else 0)


def test_ring_throughput_runs_in_a_child_frontend() -> None:
    out = _run(
        "bench.ring_throughput",
        "--seconds",
        "0.2",
        "--size-mib",
        "8",
        "--only",
        "1",
        "--workers",
        "0,2",
        "--frontend-process",
    )
    passes = 2 if fastpath.available() else 1
    assert out.count("ratio") == 2 * (1 + passes)  # 2 worker counts x (per-request, persistent x passes)
    assert "engine, 2 workers, persistent, python" in out
    assert ("engine, 2 workers, persistent, native" in out) is fastpath.available()
    assert "engine, inline I/O, per-request" in out


def test_ring_throughput_frontends_and_baselines() -> None:
    out = _run(
        "bench.ring_throughput",
        "--seconds",
        "0.2",
        "--size-mib",
        "8",
        "--only",
        "3",
        "--workers",
        "4",
        "--persistent",
        "on",
        "--native",
        "on" if fastpath.available() else "off",
        "--frontend",
        "batch,python",
        "--frontend-process",
    )
    assert "direct preadv (1 thread, 1 buffer)" in out
    assert "direct preadv (1 thread, 4 buffers)" in out
    # the floor of a ring whose pages are a blkfront's pool of 4 KiB grants (an iovec per page)
    assert "direct preadv (1 thread, 4x256 pages scattered)" in out
    assert out.count("batch frontend") == out.count("python frontend") == 1
    assert out.count("(to 4 buffers ") == out.count(", to scattered pages ") == 2


def test_ring_throughput_without_interleaved_baselines() -> None:
    """--slices 0: the batch frontend in a child process runs its one timed part without waiting
    for the engine's process (which then runs no direct loop between slices)."""
    out = _run(
        "bench.ring_throughput",
        *("--seconds", "0.2", "--size-mib", "8", "--only", "1", "--workers", "0"),
        *("--persistent", "on", "--native", "off", "--slices", "0", "--frontend-process"),
    )
    assert out.count("ratio") == 1
    assert "direct alongside" not in out


@pytest.mark.skipif(not fastpath.available(), reason="the native pass is not built")
def test_ring_throughput_multi_queue() -> None:
    out = _run("bench.ring_throughput", "--seconds", "0.2", "--size-mib", "8", "--queues", "2")
    assert "direct preadv (2 threads)" in out
    assert "direct preadv (2 processes)" in out
    assert "engine, 2 queues, one process" in out
    assert "engine, 2 queues, 2 worker processes" in out


def test_batch_frontend_checks_every_answer(local_transport: LocalTransport) -> None:
    """Answers are checked in bulk: a right batch passes; one wrong status or id among them ends
    the run naming that request (this test is the backend, on the same ring memory)."""
    with LocalFrontend(local_transport.socket_path, 3, data_pages=8, indirect_pages=4) as fe:
        batch = BatchFrontend(fe, 4096, 4, [0, 4096, 8192, 12288], count=64)
        page = fe.page(fe.ring_refs[0])
        back = BackRing(page, fe.abi, 1)
        entry, pack = fe.abi.entry_size, fe.abi.response_struct.pack_into
        try:
            read, ok = blkif.OP_READ, blkif.RSP_OKAY
            # (id offset, operation, status) of the third answer, or None: all four right
            for wrong in (None, (0, read, blkif.RSP_ERROR), (0, blkif.OP_WRITE, ok), (97, read, ok), None):
                first = batch.submitted  # ring index of the batch's first request (its id: first + 1)
                batch._submit(4)
                fe.ring.push_requests()
                assert back.take_slots()[1] == 4
                back.respond_all([(first + 1 + i, blkif.OP_READ, blkif.RSP_OKAY) for i in range(4)])
                if wrong is not None:  # the third answer, rewritten as a faulty backend would
                    rid = first + 3 + wrong[0]
                    pack(fe.ring._entries, (first + 2) % fe.ring.size * entry, rid, *wrong[1:])
                back.push_responses()
                if wrong is None:
                    assert batch._harvest() == 4
                else:
                    with pytest.raises(SystemExit, match=f"request {first + 3}: got"):
                        batch._harvest()
                    batch.completed += 4
        finally:
            back.release()
            page.release()


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_ring_write_runs_both_write_paths() -> None:
    out = _run("bench.ring_write", "--seconds", "0.2", "--size-mib", "8")
    passes = 2 if fastpath.available() else 1
    assert out.count("pwritev loop, O_DIRECT") == out.count("pwritev loop, buffered") == 3
    assert out.count(", buffered writes") == out.count(", O_DIRECT inline") == 3 * passes
    assert out.count("engine (python), O_DIRECT on the pool") == 3
    assert "not used" not in out  # the native rows ran on the native pass


def test_preadv_shapes_runs_every_shape() -> None:
    out = _run(
        "bench.preadv_shapes", "--seconds", "0.05", "--rounds", "2", "--size-mib", "4", "--only", "2,3"
    )
    for shape in ("1 buffer, 1 iovec", "4 buffers, an iovec per page (256)", "random order, 16 iovecs"):
        assert shape in out
    assert out.count("CPU/request") == 8  # 4 shapes x 2 workloads
