"""dm scenarios that need a kernel with device-mapper; run inside the dm lane's guest by
tests/dm/guest.py, each reported to pytest as its own outcome by tests/dm/test_dm_vm.py.

Each scenario is a plain function: it returns metrics (JSON-able) or raises. Real parts only
(real loop devices over tmpfs files, real dm devices); forks and SIGKILL are the fault injection.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from xenblockctl.kernel import dm, loop, sysfs
from xenblockctl.kernel.blockdev import identify, open_devt
from xenblockctl.kernel.dm_abi import DM_DATA_START, Cmd, DmIoctl, Flag, Target, request

SCRATCH = Path("/tmp/xbc-dm")
MIB = 1024 * 1024


class Skip(Exception):
    """The scenario cannot run here; the reason is reported."""


# --- helpers --------------------------------------------------------------------------------------


def _ctl() -> dm.DmControl:
    return dm.DmControl.open()


def _file(name: str, size: int, fill: bytes = b"") -> Path:
    SCRATCH.mkdir(exist_ok=True)
    path = SCRATCH / name
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill * (size // len(fill)))
    return path


@contextlib.contextmanager
def _loop(path: Path, *, read_only: bool = False) -> Iterator[loop.LoopDevice]:
    dev = loop.attach_file(str(path), read_only=read_only, tag=loop.make_tag("dmtest", path.name))
    try:
        yield dev
    finally:
        dev.close()


def _linear(devt: int, sectors: int) -> list[Target]:
    return [Target(0, sectors, "linear", f"{os.major(devt)}:{os.minor(devt)} 0")]


def _admin_device(
    ctl: dm.DmControl, name: str, targets: list[Target], uuid: str | None = None, dev: int | None = None
) -> dm.DeviceStatus:
    """What `dmsetup create` would leave behind: a live device that is not ours."""
    ctl.create(name, uuid, dev=dev)
    ctl.load(targets, name=name)
    return ctl.resume(name=name)


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until predicate() held; AssertionError on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - start


def _gone(ctl: dm.DmControl, **sel: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            ctl.status(**sel)  # type: ignore[arg-type]
        except dm.DmNotFound:
            return True
        return False

    return check


def _loop_unbound(number: int) -> Callable[[], bool]:
    return lambda: not Path(f"/sys/block/loop{number}/loop/backing_file").exists()


def _expect(exc_type: type[BaseException], func: Callable[[], object]) -> BaseException:
    try:
        func()
    except exc_type as exc:
        return exc
    raise AssertionError(f"expected {exc_type.__name__}")


def cleanup_everything() -> list[str]:
    """After each scenario: every dm device and every test loop must be gone. Deferred removal is
    asynchronous, so wait briefly; whatever is still there is force-removed and reported (the host
    test fails on leftovers: a scenario that leaks is a defect)."""
    leftovers: list[str] = []
    try:
        ctl = _ctl()
    except dm.DmError:
        return leftovers
    with ctl:
        with contextlib.suppress(AssertionError):
            _wait_until(lambda: not ctl.list_devices(), timeout=3.0)
        for entry in ctl.list_devices():
            leftovers.append(f"dm:{entry.name}")
            with contextlib.suppress(dm.DmError):
                ctl.remove(name=entry.name)
    with contextlib.suppress(AssertionError):
        _wait_until(lambda: not list(loop.bound_loops()), timeout=2.0)
    for bound in loop.bound_loops():
        leftovers.append(f"loop:{bound}")
    if SCRATCH.exists():
        for p in SCRATCH.iterdir():
            p.unlink()
    return leftovers


# --- scenarios ------------------------------------------------------------------------------------


def version_negotiation() -> dict[str, object]:
    with _ctl() as ctl:
        major, minor, patch = ctl.kernel_version
        assert major == 4, ctl.kernel_version
        # Why we send minor 0: a request minor above the kernel's is refused, and the kernel still
        # writes its own version back.
        for asked in ((4, minor + 1, 0), (5, 0, 0), (3, 0, 0)):
            buf = bytearray(DmIoctl(version=asked).pack())
            try:
                fcntl.ioctl(ctl.fd, request(Cmd.VERSION), buf, True)
            except OSError as exc:
                assert exc.errno == errno.EINVAL, exc
            else:
                raise AssertionError(f"kernel accepted interface {asked}")
            assert DmIoctl.unpack(buf).version == (major, minor, patch)
        targets = {t.name: t.version for t in ctl.target_versions()}
        for needed in ("linear", "snapshot", "error"):
            assert needed in targets, targets
        return {"kernel_version": [major, minor, patch], "targets": {k: list(v) for k, v in targets.items()}}


def open_by_name() -> dict[str, object]:
    pattern = b"XBC-BASE" * 64
    backing = _file("admin.img", 8 * MIB, pattern)
    name = "vg0-lv--data"  # what LVM calls /dev/vg0/lv-data
    with _ctl() as ctl, _loop(backing) as lo:
        uuid = "LVM-xbctest0001"
        st = _admin_device(ctl, name, _linear(lo.identity.devt, lo.identity.sectors), uuid)
        lv = Path("/dev/vg0/lv-data")  # as udev would link it (the guest has no udev)
        lv.parent.mkdir()
        lv.symlink_to(f"../{sysfs.kernel_name(st.major, st.minor)}")
        try:
            assert dm.name_for_path(str(lv)) == name
            with dm.open_named(ctl, name, writable=False) as d:
                assert (d.dev, d.name, d.uuid) == (st.dev, name, uuid)
                seq = sysfs.read_attr(st.major, st.minor, "diskseq")
                assert seq is not None, "no diskseq in sysfs"
                assert d.diskseq == int(seq), (d.diskseq, seq)
                assert d.block.identity.size_bytes == 8 * MIB
                assert os.pread(d.fd, 512, 0) == pattern
            with dm.open_uuid(ctl, uuid, writable=True) as d2:
                assert d2.name == name
            _expect(dm.DmIdentityError, lambda: dm.open_named(ctl, name, uuid="LVM-other", writable=False))
            _expect(dm.DmNotFound, lambda: dm.open_named(ctl, "xbc-nonexistent", writable=False))
        finally:
            lv.unlink()
            lv.parent.rmdir()
            ctl.remove(name=name)
        return {"dev": f"{st.major}:{st.minor}"}


def rename_race_refused() -> dict[str, object]:
    backing = _file("rename.img", 4 * MIB)
    with _ctl() as ctl, _loop(backing) as lo:
        _admin_device(ctl, "xbc-x", _linear(lo.identity.devt, lo.identity.sectors), "ADMIN-X")
        try:
            resolved = ctl.status(name="xbc-x")
            ctl.rename("xbc-x", "xbc-y")  # the race: between resolve and open
            err = _expect(dm.DmIdentityError, lambda: dm.open_confirmed(ctl, resolved, writable=False))
            assert "xbc-y" in str(err), err
            with dm.open_named(ctl, "xbc-y", writable=False) as d:
                assert d.dev == resolved.dev
        finally:
            ctl.remove(name="xbc-y")
        return {"refusal": str(err)}


def recreate_race_refused() -> dict[str, object]:
    backing = _file("recreate.img", 4 * MIB)
    refusals: dict[str, str] = {}
    with _ctl() as ctl, _loop(backing) as lo:
        table = _linear(lo.identity.devt, lo.identity.sectors)
        # A: X removed, an intruder takes X's minor, X comes back elsewhere.
        resolved = _admin_device(ctl, "xbc-x", table, "ADMIN-X1")
        ctl.remove(name="xbc-x")
        _admin_device(ctl, "xbc-intruder", table, dev=resolved.dev)
        _admin_device(ctl, "xbc-x", table, "ADMIN-X1")
        assert ctl.status(name="xbc-x").dev != resolved.dev
        err = _expect(dm.DmIdentityError, lambda: dm.open_confirmed(ctl, resolved, writable=False))
        refusals["other-device-on-minor"] = str(err)
        for n in ("xbc-intruder", "xbc-x"):
            ctl.remove(name=n)
        # B: X recreated with the same name on the same minor, but it is another instance (uuid).
        resolved = _admin_device(ctl, "xbc-x", table, "ADMIN-X1")
        ctl.remove(name="xbc-x")
        _admin_device(ctl, "xbc-x", table, "ADMIN-X2", dev=resolved.dev)
        err = _expect(dm.DmIdentityError, lambda: dm.open_confirmed(ctl, resolved, writable=False))
        refusals["same-name-same-minor-new-uuid"] = str(err)
        ctl.remove(name="xbc-x")
        # C: X removed and nothing took its place.
        err = _expect(dm.DmNotFound, lambda: dm.open_confirmed(ctl, resolved, writable=False))
        refusals["vanished"] = str(err)
    return refusals


def _consumer(devt: int, diskseq: int, ready_w: int, go_r: int, inherited: int) -> None:
    """Child: open the device by number like blkback, confirm the diskseq, hold it until told.
    The fork inherited the tool's dm fd; a real consumer is another process, so drop it."""
    code = 1
    try:
        os.close(inherited)
        with open_devt(devt, writable=True) as held:
            if held.identity.diskseq == diskseq:
                os.write(ready_w, b"k")
                os.read(go_r, 1)
                code = 0
    finally:
        os._exit(code)


def deferred_remove_on_last_close() -> dict[str, object]:
    backing = _file("owned.img", 8 * MIB)
    with _ctl() as ctl:
        with _loop(backing) as lo:
            own = dm.create_owned(ctl, "xbc-own", _linear(lo.identity.devt, lo.identity.sectors))
            loop_number = lo.number
        # our loop fd is closed: the dm table now holds the loop
        st = ctl.status(uuid=own.uuid)
        assert own.uuid.startswith(dm.OWNED_UUID_PREFIX)
        assert (st.deferred_remove, st.active, st.suspended, st.open_count) == (True, True, False, 1), st
        seq = sysfs.read_attr(st.major, st.minor, "diskseq")
        assert seq is not None, "no diskseq in sysfs"
        assert own.diskseq == int(seq)
        assert own.block.identity.size_bytes == 8 * MIB, own.block.identity
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _consumer(own.dev, own.diskseq, ready_w, go_r, own.fd)
        try:
            assert os.read(ready_r, 1) == b"k", "consumer did not confirm the diskseq"
            own.close()  # hand-off done: the tool lets go
            time.sleep(0.05)
            held = ctl.status(uuid=own.uuid)
            assert (held.open_count, held.deferred_remove) == (1, True), held
        finally:
            os.write(go_w, b"g")
            _, status = os.waitpid(pid, 0)
            for fd in (ready_r, ready_w, go_r, go_w):
                os.close(fd)
        assert os.waitstatus_to_exitcode(status) == 0
        vanished = _wait_until(_gone(ctl, uuid=own.uuid), timeout=3.0)
        # the name goes first, the gendisk a moment later (dm unhashes before del_gendisk)
        _wait_until(lambda: not Path(f"/sys/dev/block/{st.major}:{st.minor}").exists(), timeout=3.0)
        unbound = _wait_until(_loop_unbound(loop_number), timeout=3.0)
        return {"dm_gone_ms": round(vanished * 1000, 2), "loop_unbound_ms": round(unbound * 1000, 2)}


def cancel_deferred_remove() -> dict[str, object]:
    backing = _file("cancel.img", 4 * MIB)
    with _ctl() as ctl, _loop(backing) as lo:
        own = dm.create_owned(ctl, "xbc-keep", _linear(lo.identity.devt, lo.identity.sectors))
        try:
            ctl.cancel_deferred_remove(uuid=own.uuid)
            assert not ctl.status(uuid=own.uuid).deferred_remove
        finally:
            own.close()
        time.sleep(0.2)
        st = ctl.status(uuid=own.uuid)  # survived its last close
        assert st.open_count == 0
        ctl.remove(uuid=own.uuid)
        return {}


def sweep_after_kill_in_window() -> dict[str, object]:
    backing = _file("sweep.img", 4 * MIB)
    with _ctl() as ctl, _loop(backing) as lo:
        table = _linear(lo.identity.devt, lo.identity.sectors)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                with dm.DmControl.open() as child_ctl:
                    uuid = dm.make_owned_uuid("leak")
                    child_ctl.create("xbc-leak", uuid)
                    child_ctl.load(table, uuid=uuid)
                    os.write(w, uuid.encode())
                    time.sleep(60)  # killed here: after create+load, before open/arm
            finally:
                os._exit(1)
        os.close(w)
        try:
            leaked_uuid = os.read(r, 256).decode()
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
        st = ctl.status(uuid=leaked_uuid)
        assert (st.open_count, st.deferred_remove) == (0, False), st
        # Ours but with a live creator (this process, inside its own window): must survive.
        live_uuid = dm.make_owned_uuid("live")
        ctl.create("xbc-live", live_uuid)
        ctl.load(table, uuid=live_uuid)
        # An admin's device: never ours.
        _admin_device(ctl, "xbc-admin", table, "ADMIN-1")
        try:
            removed = dm.sweep_owned(ctl)
            assert removed == ["xbc-leak"], removed
            assert _gone(ctl, uuid=leaked_uuid)()
            assert ctl.status(uuid=live_uuid).name == "xbc-live"
            assert ctl.status(name="xbc-admin").uuid == "ADMIN-1"
            assert dm.sweep_owned(ctl) == []
        finally:
            with contextlib.suppress(dm.DmError):
                ctl.remove(uuid=live_uuid)
            ctl.remove(name="xbc-admin")
        return {"removed": removed}


def loop_under_dm_refuses_excl() -> dict[str, object]:
    backing = _file("excl.img", 4 * MIB)
    with _ctl() as ctl, _loop(backing) as lo:
        node = f"/dev/loop{lo.number}"
        st = _admin_device(ctl, "xbc-stack", _linear(lo.identity.devt, lo.identity.sectors))
        try:
            holders = sysfs.holders(7, lo.number)
            assert holders == [sysfs.kernel_name(st.major, st.minor)], holders
            assert dm.dm_holders(7, lo.number) == ["xbc-stack"]
            try:
                os.close(os.open(node, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EBUSY, exc
            else:
                raise AssertionError("O_EXCL claim of a loop under a dm table succeeded")
            os.close(os.open(node, os.O_RDWR | os.O_CLOEXEC))  # plain opens still work
        finally:
            ctl.remove(name="xbc-stack")
        assert sysfs.holders(7, lo.number) == []
        assert dm.dm_holders(7, lo.number) == []
        os.close(os.open(node, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC))
        return {"holders": holders}


def _tmp_free_bytes() -> int:
    st = os.statvfs(SCRATCH)
    return st.f_bfree * st.f_frsize


def snapshot_volatile() -> dict[str, object]:
    base_path = _file("base.img", 8 * MIB, b"B" * 4096)
    baseline = _tmp_free_bytes()
    cow_path = _file("cow.img", 8 * MIB)
    with _ctl() as ctl:
        with _loop(base_path, read_only=True) as base, _loop(cow_path) as cow:
            os.unlink(cow_path)  # the COW lives only as long as its loop device
            with _loop(base_path) as rw:
                _expect(dm.DmError, lambda: dm.create_volatile(ctl, "xbc-bad", rw, cow))
            vol = dm.create_volatile(ctl, "xbc-vol", base, cow)
            numbers = (base.number, cow.number)
        # the tool's loop fds are closed; the snapshot table holds both loops
        try:
            assert vol.block.identity.size_bytes == 8 * MIB
            assert dm.dm_holders(7, numbers[0]) == ["xbc-vol"]
            assert dm.dm_holders(7, numbers[1]) == ["xbc-vol"]
            assert os.pread(vol.fd, 4096, 4096) == b"B" * 4096
            os.pwrite(vol.fd, b"W" * 4096, 4096)
            os.pwrite(vol.fd, b"G" * (2 * MIB), 2 * MIB)  # the "guest" writes 2 MiB more
            os.fsync(vol.fd)
            assert os.pread(vol.fd, 4096, 4096) == b"W" * 4096
            assert os.pread(vol.fd, 4096, 3 * MIB) == b"G" * 4096
            assert os.pread(vol.fd, 4096, 5 * MIB) == b"B" * 4096
            with open(base_path, "rb") as f:
                assert f.read() == b"B" * (8 * MIB), "a write reached the base image"
            cow_used = baseline - _tmp_free_bytes()
            assert cow_used >= 2 * MIB, f"COW holds only {cow_used} bytes after 2 MiB of writes"
            uuid = vol.uuid
        finally:
            vol.close()
        vanished = _wait_until(_gone(ctl, uuid=uuid), timeout=3.0)
        cow_gone = _wait_until(_loop_unbound(numbers[1]), timeout=3.0)
        _wait_until(_loop_unbound(numbers[0]), timeout=3.0)
        # the unlinked COW file's pages went with its loop device
        _wait_until(lambda: baseline - _tmp_free_bytes() < 256 * 1024, timeout=3.0)
        with open(base_path, "rb") as f:
            assert f.read() == b"B" * (8 * MIB)
        return {
            "dm_gone_ms": round(vanished * 1000, 2),
            "cow_loop_unbound_ms": round(cow_gone * 1000, 2),
            "cow_bytes_while_live": cow_used,
        }


def killed_holder_unwinds_stack() -> dict[str, object]:
    """A tool holding our dm device (deferred remove armed) over its AUTOCLEAR loop is SIGKILLed
    with no consumer: both layers disappear, nothing leaks."""
    backing = _file("unwind.img", 4 * MIB)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            with dm.DmControl.open() as child_ctl, _loop(backing) as lo:
                own = dm.create_owned(child_ctl, "xbc-unwind", _linear(lo.identity.devt, lo.identity.sectors))
                os.write(w, f"{own.uuid} {lo.number}".encode())
                time.sleep(60)
        finally:
            os._exit(1)
    os.close(w)
    try:
        uuid, number = os.read(r, 256).decode().split()
    finally:
        os.close(r)
    with _ctl() as ctl:
        try:
            assert ctl.status(uuid=uuid).deferred_remove
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        killed = time.monotonic()
        _wait_until(_gone(ctl, uuid=uuid), timeout=3.0)
        dm_ms = (time.monotonic() - killed) * 1000
        _wait_until(_loop_unbound(int(number)), timeout=3.0)
        loop_ms = (time.monotonic() - killed) * 1000
    return {"dm_gone_ms": round(dm_ms, 2), "loop_unbound_ms": round(loop_ms, 2)}


def sweep_spares_live_creators() -> dict[str, object]:
    """Sweeps running while three processes create, arm and drop devices: a sweep must never take
    a device from a live creator (some are inside their create->arm window at any moment)."""
    backing = _file("race.img", 4 * MIB)
    rounds = 15
    with _ctl() as ctl, _loop(backing) as lo:
        table = _linear(lo.identity.devt, lo.identity.sectors)
        pids = []
        for worker in range(3):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(lo.fd)
                    with dm.DmControl.open() as child_ctl:
                        for i in range(rounds):
                            dm.create_owned(child_ctl, f"xbc-w{worker}-{i}", table).close()
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        removed: list[str] = []
        sweeps = 0
        running = set(pids)
        while running:
            removed += dm.sweep_owned(ctl)
            sweeps += 1
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    running.discard(pid)
                    assert os.waitstatus_to_exitcode(status) == 0, f"worker {pid} failed"
        assert removed == [], removed
        _wait_until(lambda: not ctl.list_devices(), timeout=5.0)
    return {"sweeps": sweeps, "devices_created": 3 * rounds}


class _Recorder:
    """An IoctlFn that records what the kernel wrote back, for unit tests to replay."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def __call__(self, fd: int, req: int, buf: bytearray) -> int:
        sent = bytes(buf)
        result: int = fcntl.ioctl(fd, req, buf, True)
        got = DmIoctl.unpack(buf)
        end = max(DM_DATA_START, got.data_size) if got.data_size <= len(buf) else len(buf)
        self.calls.append(
            {
                "cmd": Cmd(req & 0xFF).name,
                "sent": sent[: max(DM_DATA_START, len(sent.rstrip(b"\0")))].hex(),
                "reply": bytes(buf[:end]).hex(),
            }
        )
        return result


def capture_buffers() -> dict[str, object]:
    """Real kernel replies (list, status, table status, deps, versions, BUFFER_FULL) as hex."""
    backing = _file("capture.img", 4 * MIB)
    rec = _Recorder()
    fd = os.open(dm.CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
    ctl = dm.DmControl(fd, ioctl=rec)
    with ctl, _loop(backing) as lo:
        half = lo.identity.sectors // 2
        m, n = os.major(lo.identity.devt), os.minor(lo.identity.devt)
        two = [Target(0, half, "linear", f"{m}:{n} 0"), Target(half, half, "linear", f"{m}:{n} {half}")]
        _admin_device(ctl, "xbc-cap-a", two, "CAP-UUID-A")
        _admin_device(ctl, "xbc-cap-bb", _linear(lo.identity.devt, 8))
        try:
            rec.calls.clear()
            ctl.version()
            ctl.list_devices()
            ctl.status(name="xbc-cap-a")
            ctl.table(name="xbc-cap-a")
            ctl.table(name="xbc-cap-a", table=False)
            ctl.deps(name="xbc-cap-a")
            ctl.target_versions()
            small = bytearray(DmIoctl(flags=Flag.UUID, data_size=DM_DATA_START + 16).pack() + bytes(16))
            fcntl.ioctl(fd, request(Cmd.LIST_DEVICES), small, True)
            rec.calls.append({"cmd": "LIST_DEVICES_SMALL", "sent": "", "reply": bytes(small).hex()})
        finally:
            ctl.remove(name="xbc-cap-a")
            ctl.remove(name="xbc-cap-bb")
        return {"calls": rec.calls, "loop_dev": [m, n]}


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "min_ms": round(ordered[0], 2),
        "p50_ms": round(statistics.median(ordered), 2),
        "p90_ms": round(statistics.quantiles(ordered, n=10)[8], 2),
        "max_ms": round(ordered[-1], 2),
    }


def timing_create_to_armed() -> dict[str, object]:
    """create+load+open+confirm+arm+resume (create_owned) under TCG; each device closed after.
    A second pass times the same steps one by one to show where the time goes."""
    backing = _file("timing.img", 8 * MIB)
    whole: list[float] = []
    steps: dict[str, list[float]] = {
        k: [] for k in ("create", "load", "open_confirm", "arm", "resume", "identify")
    }
    with _ctl() as ctl, _loop(backing) as lo:
        table = _linear(lo.identity.devt, lo.identity.sectors)
        for i in range(41):
            t0 = time.perf_counter()
            d = dm.create_owned(ctl, f"xbc-t{i}", table)
            whole.append((time.perf_counter() - t0) * 1000)
            d.close()
        for i in range(40):
            uuid = dm.make_owned_uuid()
            marks = [time.perf_counter()]
            ctl.create(f"xbc-s{i}", uuid)
            marks.append(time.perf_counter())
            ctl.load(table, uuid=uuid)
            marks.append(time.perf_counter())
            d = dm.open_confirmed(ctl, ctl.status(uuid=uuid), writable=True)
            marks.append(time.perf_counter())
            ctl.remove(uuid=uuid, deferred=True)
            marks.append(time.perf_counter())
            ctl.resume(uuid=uuid)
            marks.append(time.perf_counter())
            identify(d.fd)
            marks.append(time.perf_counter())
            d.close()
            for key, start, end in zip(steps, marks, marks[1:], strict=False):
                steps[key].append((end - start) * 1000)
        _wait_until(lambda: not ctl.list_devices(), timeout=10.0)
        # Baselines in the same boot: the bare ioctls (create+load+resume, no open, no checks) and
        # dmsetup (what a shell script would run), when the host has it.
        raw: list[float] = []
        for i in range(40):
            t0 = time.perf_counter()
            ctl.create(f"xbc-r{i}", f"RAW-{i}")
            ctl.load(table, name=f"xbc-r{i}")
            ctl.resume(name=f"xbc-r{i}")
            raw.append((time.perf_counter() - t0) * 1000)
            ctl.remove(name=f"xbc-r{i}")
        dmsetup = shutil.which("dmsetup")
        tool: list[float] = []
        line = table[0].line()
        for i in range(10 if dmsetup else 0):
            assert dmsetup is not None
            t0 = time.perf_counter()
            subprocess.run(
                [dmsetup, "create", f"xbc-d{i}", "--uuid", f"DMS-{i}", "--noudevsync", "--table", line],
                check=True,
                capture_output=True,
            )
            tool.append((time.perf_counter() - t0) * 1000)
            subprocess.run([dmsetup, "remove", "--noudevsync", f"xbc-d{i}"], check=True, capture_output=True)
    ours = statistics.median(whole[1:])
    return {
        "n": len(whole) - 1,
        "cold_ms": round(whole[0], 2),
        **_summary(whole[1:]),
        "steps_p50_ms": {k: round(statistics.median(v), 2) for k, v in steps.items()},
        "raw_create_load_resume": _summary(raw),
        "dmsetup_create": _summary(tool) if tool else None,
        "ours_over_raw": round(ours / statistics.median(raw), 2),
        "dmsetup_over_ours": round(statistics.median(tool) / ours, 2) if tool else None,
    }


#: Guest-side limits in seconds (default 90); timing runs ~150 iterations incl. dmsetup processes.
TIMEOUTS = {"timing_create_to_armed": 300}

SCENARIOS: dict[str, Callable[[], dict[str, object]]] = {
    f.__name__: f
    for f in (
        version_negotiation,
        open_by_name,
        rename_race_refused,
        recreate_race_refused,
        deferred_remove_on_last_close,
        cancel_deferred_remove,
        sweep_after_kill_in_window,
        sweep_spares_live_creators,
        loop_under_dm_refuses_excl,
        snapshot_volatile,
        killed_holder_unwinds_stack,
        capture_buffers,
        timing_create_to_armed,
    )
}
