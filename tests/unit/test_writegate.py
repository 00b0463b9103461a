"""Write isolation in a ring group (backend/writegate.py, write_gate.h; issue 20): a buffered write
the kernel throttles for dirty pages must not hold up the other guests' rings of the group, and a
write the group hands back to its ring's thread keeps the ring's order.

Real kernel throughout: filesystems made with mkfs on loop-mounted images under the test's temp dir,
the host's dirty limits lowered (and restored) so the throttle really sleeps a writer; every mount,
loop device, fd and limit is undone even when a test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.backend import Pair, PairFactory
from tests.fixtures.kernel import HAS_LOOP, IS_ROOT, FreezableFs
from xenblockctl.backend import blkif, fastpath, writegate
from xenblockctl.backend.io import DeviceTarget, Executor
from xenblockctl.backend.ringgroup import RingGroup
from xenblockctl.backend.writegate import WriteClass

MIB = 1 << 20


class Fs:
    """A filesystem of `kind` (ext4, xfs or tmpfs) mounted under `root`; files made in it are opened
    O_RDWR and closed, and the filesystem unmounted (its loop device with it), by close()."""

    def __init__(self, root: Path, kind: str) -> None:
        self.path = root / f"mnt-{kind}"
        self.path.mkdir()
        self._fds: list[int] = []
        self._mounted = False
        if kind == "tmpfs":
            cmd = ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(self.path)]
        else:
            image = root / f"{kind}.img"
            with open(image, "wb") as f:
                f.truncate(512 * MIB)  # mkfs.xfs wants 300 MiB at least
            mkfs = ["mkfs.xfs", "-q", "-f"] if kind == "xfs" else ["mkfs.ext4", "-q", "-F"]
            subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
            # a loop device that autoclears when unmounted
            cmd = ["mount", "-o", "loop", str(image), str(self.path)]
        subprocess.run(cmd, check=True, capture_output=True)
        self._mounted = True

    def file(self, name: str, size: int, fill: bytes | None = None) -> tuple[Path, int]:
        path = self.path / name
        with open(path, "wb") as f:
            if fill is not None:
                f.write(fill)
            f.truncate(size)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(fd)
        return path, fd

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._mounted:
            got = subprocess.run(["umount", str(self.path)], check=False, capture_output=True)
            if got.returncode:  # something still holds a file: let go when it ends
                subprocess.run(["umount", "--lazy", str(self.path)], check=False, capture_output=True)
            self._mounted = False


@contextlib.contextmanager
def _fs(root: Path, kind: str) -> Iterator[Fs]:
    tool = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs", "tmpfs": "mount"}[kind]
    if not IS_ROOT or not HAS_LOOP or shutil.which(tool) is None:
        pytest.skip(f"needs root, loop devices and {tool}")
    fs = Fs(root, kind)
    try:
        yield fs
    finally:
        fs.close()


@pytest.fixture
def low_dirty_limits() -> Iterator[None]:
    """The host's dirty limit at 16 MiB (background 8 MiB), so a fast writer meets the throttle;
    the limits as they were afterwards (a ratio or a byte count, whichever was set)."""
    if not IS_ROOT:
        pytest.skip("needs root to set vm.dirty_bytes")
    vm = Path("/proc/sys/vm")
    names = ("dirty_bytes", "dirty_ratio", "dirty_background_bytes", "dirty_background_ratio")
    # host-wide: taken under the benchmarks' lock, so no benchmark measures a host we throttled
    lock = os.open("/var/tmp/bench.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    fcntl.flock(lock, fcntl.LOCK_EX)
    saved = {n: (vm / n).read_text().strip() for n in names}
    try:
        (vm / "dirty_background_bytes").write_text(str(8 * MIB))
        (vm / "dirty_bytes").write_text(str(16 * MIB))
        yield
    finally:
        # writing one of a pair zeroes the other: write back the one that was set
        for bytes_name, ratio_name in (
            ("dirty_bytes", "dirty_ratio"),
            ("dirty_background_bytes", "dirty_background_ratio"),
        ):
            if saved[bytes_name] != "0":
                (vm / bytes_name).write_text(saved[bytes_name])
            else:
                (vm / ratio_name).write_text(saved[ratio_name])
        os.close(lock)  # and the lock with it


needs_native = pytest.mark.skipif(not fastpath.available(), reason="the native fast path is not built here")


@pytest.fixture
def group() -> Iterator[RingGroup]:
    if not fastpath.available():
        pytest.skip("the native fast path (_fastpass.c) is not built here")
    g = RingGroup("test-writegate")
    yield g
    g.close()


def _pair(make_pair: PairFactory, group: RingGroup, fd: int, **kw: object) -> Pair:
    # I/O threads, as the engine has (without them a group runs no I/O that may block)
    return make_pair(persistent=True, workers=4, group=group, target=DeviceTarget.from_fd(fd), **kw)


def _write_hard(
    pair: Pair, size: int, stop: threading.Event, written: list[int], errors: list[BaseException]
) -> None:
    """1 MiB writes at QD 4, sequential over the device and round again, until `stop`."""
    fe = pair.frontend
    chunk = 1024 * 1024
    data = os.urandom(chunk)
    at = 0
    try:
        for _ in range(4):
            fe.submit_write(at // 512, data)
            at = (at + chunk) % size
        while not stop.is_set():
            done = fe.collect(1, timeout=60)
            for c in done.values():
                assert c.response.status == blkif.RSP_OKAY
            written[0] += len(done) * chunk
            for _ in done:
                fe.submit_write(at // 512, data)
                at = (at + chunk) % size
        while fe.outstanding:
            fe.collect(1, timeout=60)
    except BaseException as exc:  # the assertion is the main thread's
        errors.append(exc)


def _p99_beside_a_writer(
    make_pair: PairFactory, group: RingGroup, fs: Fs, seconds: float
) -> tuple[float, int, Executor]:
    """A ring writing hard and a ring reading cached 4 KiB blocks at QD 1, in one group: the reads'
    p99 latency (s), the bytes written meanwhile, and the writer's executor."""
    expected = os.urandom(MIB)
    _, rfd = fs.file("reader.img", MIB, expected)
    _, wfd = fs.file("writer.img", 256 * MIB)
    reader = _pair(make_pair, group, rfd, data_pages=32)
    writer = _pair(make_pair, group, wfd, data_pages=1024, indirect_pages=16)
    for i in range(256):  # cached, and the reader's pages granted
        assert reader.frontend.read(8 * i, 4096) == expected[i * 4096 : (i + 1) * 4096]
    stop = threading.Event()
    written, errors = [0], list[BaseException]()
    thread = threading.Thread(target=_write_hard, args=(writer, 256 * MIB, stop, written, errors))
    # the frontends share the engine's interpreter here: the reader must not wait 5 ms for the GIL
    # behind the writer's frontend, which a guest never would
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    thread.start()
    lat: list[float] = []
    try:
        while written[0] < 64 * MIB and thread.is_alive():  # the host's dirty pages at the throttle
            time.sleep(0.01)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end and thread.is_alive():
            t0 = time.monotonic()
            got = reader.frontend.read(8 * (i % 256), 4096, timeout=30)
            lat.append(time.monotonic() - t0)
            assert got == expected[(i % 256) * 4096 : (i % 256 + 1) * 4096]
            i += 1
            time.sleep(0.0005)
    finally:
        stop.set()
        thread.join(120)
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert len(lat) > 100
    lat.sort()
    executor = writer.dataplane.executor
    assert isinstance(executor, Executor)
    return lat[int(len(lat) * 0.99)], written[0], executor


@pytest.mark.parametrize("kind", ["ext4", "xfs"])
def test_a_throttled_writer_does_not_hold_up_its_groups_other_rings(  # noqa: PLR0917 (fixtures)
    kind: str,
    tmp_path: Path,
    low_dirty_limits: None,
    group: RingGroup,
    make_pair: PairFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the host's dirty pages at the throttle, one ring of a group writes as fast as its guest
    can: the kernel sleeps that writer (tens of ms a write). Its writes leave the group for the
    ring's own thread (ext4: the write gate closes; xfs: RWF_NOWAIT refuses), so the other ring's
    cached 4 KiB reads are answered promptly all the while, and the writer goes on writing."""
    caplog.set_level(logging.INFO, logger=writegate.__name__)
    with _fs(tmp_path, kind) as fs:
        p99, written, executor = _p99_beside_a_writer(make_pair, group, fs, seconds=3.0)
        state = executor.writes.state
        left = state[writegate.WG_LEFT_DIRTY] + state[writegate.WG_LEFT_HELD]
        print(
            f"{kind}: reads p99 {p99 * 1e3:.2f} ms, {written / MIB:.0f} MiB written, left {left}, "
            f"closed {state[writegate.WG_CLOSED]}, slept {state[writegate.WG_SLEPT]}, "
            f"refused {executor.writes.refused_writes}"
        )
        # a throttle pause is 10-45 ms on this host (bench/README.md, issue 20 write isolation):
        # main's p99 here was 27-40 ms on ext4; this branch's 1-7 ms at load 5-7 (a round of the
        # group with a 1 MiB write it let in is ~1 ms; the rest is the shared interpreter and a
        # loaded host)
        assert p99 < 0.012, f"reads waited {p99 * 1e3:.1f} ms (p99) beside the writer"
        assert written > 64 * MIB
        said = [r.getMessage() for r in caplog.records if "ring group write hand-offs" in r.getMessage()]
        if kind == "ext4":
            assert executor.writes.cls is WriteClass.GATED
            assert left > 0, "no write left the group"
            assert any("dirty pages" in line for line in said), said  # logged, with the reason
        else:
            assert executor.writes.cls is WriteClass.NOWAIT
            assert executor.writes.refused_writes > 0, "no write was refused and handed back"
            assert any("refused by RWF_NOWAIT" in line for line in said), said


def test_a_refused_write_keeps_its_rings_order(
    tmp_path: Path, group: RingGroup, make_pair: PairFactory
) -> None:
    """xfs refuses a RWF_NOWAIT write whose file's times need an update (the first write after the
    times were set back): that write leaves the group with the rest of its batch, and the ring's
    thread writes them in ring order. Eight writes of one block in one batch: the device holds the
    last one, every time (sent to the I/O pool, they finished in any order)."""
    with _fs(tmp_path, "xfs") as fs:
        path, fd = fs.file("order.img", 8 * MIB)
        pair = _pair(make_pair, group, fd, data_pages=64)
        fe = pair.frontend
        assert fe.write(0, bytes(4096)) == blkif.RSP_OKAY
        for round_ in range(100):
            os.utime(path, (1, 1))  # the times are old: the next RWF_NOWAIT write is refused
            blocks = [bytes([round_ % 200 + 1, k]) * 2048 for k in range(8)]
            ids = [fe.submit_write(0, b) for b in blocks]
            done = fe.collect(len(ids), timeout=30)
            assert all(done[i].response.status == blkif.RSP_OKAY for i in ids)
            assert os.pread(fd, 4096, 0) == blocks[-1], (
                f"round {round_}: a write finished before an earlier one"
            )


def test_a_refused_write_stays_on_its_rings_thread_when_nothing_later_touches_it(
    tmp_path: Path, group: RingGroup, make_pair: PairFactory
) -> None:
    """The same refusal with the batch's eight writes on eight different blocks, where ring order
    asks nothing of their place: the refused write is still written on the ring's own thread, not
    handed to the I/O pool. The pool's only gain was its wake-ups preempting a CPU-bound neighbour
    of the group's CPU (its share 19-43 % -> 4-7 %), while xfs writers kept 0.3-0.7 of their MiB/s
    where nothing throttles: pool writes hold the file's lock, and ~3x the writes were refused
    (bench/README.md, issue 20, the xfs neighbour cost of a refused write). Every block holds its
    own write."""
    with _fs(tmp_path, "xfs") as fs:
        path, fd = fs.file("apart.img", 8 * MIB)
        pair = _pair(make_pair, group, fd, data_pages=64)
        fe = pair.frontend
        assert fe.write(0, bytes(8 * 4096)) == blkif.RSP_OKAY
        executor = pair.dataplane.executor
        assert isinstance(executor, Executor)
        before = executor.writes.refused_writes
        for round_ in range(100):
            os.utime(path, (1, 1))  # the times are old: the next RWF_NOWAIT write is refused
            blocks = [bytes([round_ % 200 + 1, k]) * 2048 for k in range(8)]
            ids = [fe.submit_write(8 * k, b) for k, b in enumerate(blocks)]
            done = fe.collect(len(ids), timeout=30)
            assert all(done[i].response.status == blkif.RSP_OKAY for i in ids)
            assert os.pread(fd, 8 * 4096, 0) == b"".join(blocks), f"round {round_}"
        # counted as it is written on the ring's thread (io.Executor.run_now): one a round at least
        assert executor.writes.refused_writes - before >= 100


def test_a_write_that_slept_in_the_group_holds_its_device_out(
    freezable_fs: FreezableFs, group: RingGroup, make_pair: PairFactory
) -> None:
    """ext4 cannot be asked whether a write will wait, and the dirty pages say nothing of a frozen
    filesystem (or a memcg limit, a journal wait): the first write there sleeps in the group. Its
    thread's voluntary switches show it, and the device's later writes leave the group for a hold
    (1 s, doubling while it recurs) instead of sleeping there too."""
    path = freezable_fs.path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    pair: Pair | None = None
    try:
        pair = _pair(make_pair, group, fd, data_pages=32)
        fe = pair.frontend
        assert fe.write(0, b"\x01" * 4096) == blkif.RSP_OKAY  # the pages are granted and cached
        executor = pair.dataplane.executor
        assert isinstance(executor, Executor)
        state = executor.writes.state
        assert state[writegate.WG_SLEPT] == 0
        freezable_fs.freeze()
        try:
            rid = fe.submit_write(8, b"\x02" * 4096)
            fe.kick()
            time.sleep(0.3)  # the write waits for the thaw, in the group's thread
        finally:
            freezable_fs.thaw()
        assert fe.collect(1, timeout=30)[rid].response.status == blkif.RSP_OKAY
        assert state[writegate.WG_SLEPT] == 1
        assert state[writegate.WG_HOLD_NS] == 1_000_000_000
        for i in range(4):  # within the hold: written by the ring's own thread
            assert fe.write(16 + 8 * i, b"\x03" * 4096) == blkif.RSP_OKAY
        assert state[writegate.WG_LEFT_HELD] >= 1
        assert state[writegate.WG_SLEPT] == 1
    finally:
        if pair is not None:  # before the fd closes (make_pair's own stop then has nothing to do)
            pair.dataplane.stop(timeout=30)
        os.close(fd)


def test_tmpfs_reads_stay_in_the_group(tmp_path: Path, group: RingGroup, make_pair: PairFactory) -> None:
    """tmpfs refuses RWF_NOWAIT reads (EOPNOTSUPP), which sent every read to the I/O pool and out of
    the group; its pages are memory, so reads (and writes) run inline, served by the native pass."""
    with _fs(tmp_path, "tmpfs") as fs:
        expected = os.urandom(MIB)
        _, fd = fs.file("disk.img", MIB, expected)
        pair = _pair(make_pair, group, fd, data_pages=32)
        assert pair.dataplane.executor.writes.cls is WriteClass.MEMORY  # type: ignore[union-attr]
        for i in range(200):
            assert (
                pair.frontend.read(8 * (i % 256), 4096) == expected[(i % 256) * 4096 : (i % 256 + 1) * 4096]
            )
        assert pair.frontend.write(0, b"\x5a" * 4096) == blkif.RSP_OKAY
        fast = pair.dataplane._fast
        assert fast is not None
        deadline = time.monotonic() + 5  # the group reports its counts when it next sleeps
        while fast.served < 195 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fast.served >= 195, f"only {fast.served} of 201 requests were served by the native pass"


def test_classes(tmp_path: Path) -> None:
    """The class from the file's kind: ext4 (the temp dir's, on this host) and a block device are
    GATED, tmpfs MEMORY; what statfs does not know is tried (NOWAIT)."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if writegate.fs_type(fd) == 0xEF53:
            assert writegate.classify(fd) is WriteClass.GATED
    finally:
        os.close(fd)
    if os.path.isdir("/dev/shm"):
        fd = os.open("/dev/shm", os.O_RDONLY)
        try:
            if writegate.fs_type(fd) == 0x01021994:
                assert writegate.classify(fd) is WriteClass.MEMORY
        finally:
            os.close(fd)


@needs_native
def test_the_gates_numbers_are_the_c_passes() -> None:
    """writegate.py and write_gate.h name the same state slots; the C reading of /proc/vmstat is
    the kernel's dirty + writeback over its freerun ceiling, (threshold + background) / 2."""
    from xenblockctl.backend import _fastpass as native

    for name in (
        "HOLD_UNTIL",
        "HOLD_NS",
        "SLEPT",
        "CLOSED",
        "LEFT_DIRTY",
        "LEFT_HELD",
        "DIRTY_PERMILLE",
        "LAST",
        "SIZE",
    ):
        assert getattr(writegate, f"WG_{name}") == getattr(native, f"WG_{name}"), name

    def python_permille() -> int:
        fields = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
        ceiling = (int(fields["nr_dirty_threshold"]) + int(fields["nr_dirty_background_threshold"])) // 2
        return (int(fields["nr_dirty"]) + int(fields["nr_writeback"])) * 1000 // ceiling

    before = python_permille()
    got = native.dirty_permille()
    after = python_permille()
    assert min(before, after) - 5 <= got <= max(before, after) + 5
