"""Loop devices against the real kernel: attach, AUTOCLEAR, diskseq, read-only, races, bad targets."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.kernel import ImageFactory
from xenblockctl.kernel import blockdev, loop
from xenblockctl.kernel.errors import (
    DeviceError,
    IdentityMismatch,
    NotOurs,
    TargetEmpty,
    TargetNotFound,
    TargetPermission,
    TargetTypeError,
)
from xenblockctl.kernel.loop_abi import LOOP_CONFIGURE, LoopConfig, LoopFlags, LoopInfo64

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]

TAG = loop.make_tag("test", os.getpid())


def is_bound(number: int) -> bool:
    return os.path.exists(f"/sys/block/loop{number}/loop")


def test_attach_read_write_detach(make_image: ImageFactory, loop_devices: list[loop.LoopDevice]) -> None:
    image = make_image(fill=b"hello from the image")
    dev = loop.attach_file(str(image), read_only=False, tag=TAG)
    loop_devices.append(dev)
    ident = dev.identity
    assert ident.major == 7
    assert ident.size_bytes == 64 << 20
    assert ident.sectors == (64 << 20) // 512
    assert ident.logical_block_size == 512
    assert not ident.read_only
    assert ident.diskseq > 0
    assert ident.physical_device == f"7:{ident.minor:x}"
    assert ident.luid == f"{ident.diskseq:x}"
    assert dev.tag == TAG
    assert dev.autoclear
    assert os.pread(dev.fd, 20, 0) == b"hello from the image"
    os.pwrite(dev.fd, b"X" * 512, 4096)
    os.fsync(dev.fd)
    assert image.read_bytes()[4096:4608] == b"X" * 512
    # sysfs agrees with what the fd said
    assert Path(f"/sys/block/loop{dev.number}/diskseq").read_text().strip() == str(ident.diskseq)
    number = dev.number
    dev.close()
    assert not is_bound(number), "AUTOCLEAR must detach synchronously at the last close"


def test_second_opener_keeps_autoclear_device_alive(make_image: ImageFactory) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag=TAG)
    consumer = blockdev.open_devt(dev.identity.devt, writable=False)
    try:
        assert consumer.identity.diskseq == dev.identity.diskseq
        dev.close()
        assert is_bound(dev.number), "a second opener must keep the device bound"
        assert os.pread(consumer.fd, 512, 0) == b"\0" * 512
    finally:
        dev.close()
        consumer.close()
    assert not is_bound(dev.number)


def test_stale_number_is_caught_by_diskseq(
    make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    """Scenario D of the reference: the tool closes before the consumer opens; the consumer's open
    of 7:N succeeds, and only the diskseq comparison shows it is not the advertised device."""
    dev = loop.attach_file(str(make_image("a.img")), read_only=False, tag=TAG)
    advertised = dev.identity
    dev.close()
    stale = blockdev.open_devt(advertised.devt, writable=False)
    try:
        assert stale.identity.diskseq != advertised.diskseq
        assert stale.identity.size_bytes == 0
        # Someone re-attaches: the stale fd now sees the *new* backing file with yet another diskseq.
        other = loop.attach_file(str(make_image("b.img", fill=b"other disk")), read_only=False, tag=TAG)
        loop_devices.append(other)
        if other.identity.devt == advertised.devt:
            assert blockdev.read_diskseq(stale.fd) == other.identity.diskseq != advertised.diskseq
    finally:
        stale.close()


def test_every_attach_gets_a_fresh_diskseq(make_image: ImageFactory) -> None:
    image = str(make_image())
    seen: list[int] = []
    for _ in range(6):
        with loop.attach_file(image, read_only=True, tag=TAG) as dev:
            seen.append(dev.identity.diskseq)
    assert len(set(seen)) == len(seen)
    assert seen == sorted(seen), "diskseq is a global monotonic counter"


def test_read_only_refuses_writes(make_image: ImageFactory, loop_devices: list[loop.LoopDevice]) -> None:
    image = make_image(fill=b"precious")
    dev = loop.attach_file(str(image), read_only=True, tag=TAG)
    loop_devices.append(dev)
    assert dev.identity.read_only
    assert LoopFlags.READ_ONLY in dev.status.flags
    assert Path(f"/sys/block/loop{dev.number}/ro").read_text().strip() == "1"
    with pytest.raises(OSError) as own_fd:
        os.pwrite(dev.fd, b"Y" * 512, 0)
    assert own_fd.value.errno == errno.EBADF
    try:
        rw = os.open(f"/dev/loop{dev.number}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    else:
        try:
            with pytest.raises(OSError) as other_fd:
                os.pwrite(rw, b"Y" * 512, 0)
            assert other_fd.value.errno == errno.EPERM
        finally:
            os.close(rw)
    assert image.read_bytes()[:8] == b"precious"


def test_set_autoclear_off_and_on(make_image: ImageFactory) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag=TAG)
    number, devt, seq = dev.number, dev.identity.devt, dev.identity.diskseq
    try:
        dev.set_autoclear(False)
        assert not dev.autoclear
        dev.close()
        assert is_bound(number), "without AUTOCLEAR the device outlives its last close"
        assert loop.detach_with_proof(devt, diskseq=seq, tag=TAG) is loop.DetachResult.DETACHED
        assert not is_bound(number)
    finally:
        dev.close()


def test_detach_with_proof(make_image: ImageFactory) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag=TAG, autoclear=False)
    ident = dev.identity
    backing = (dev.status.backing_dev, dev.status.backing_ino)
    try:
        with pytest.raises(NotOurs):
            loop.detach_with_proof(ident.devt, diskseq=ident.diskseq, tag=TAG + "x")
        with pytest.raises(NotOurs):
            loop.detach_with_proof(
                ident.devt, diskseq=ident.diskseq, tag=TAG, backing=(backing[0], backing[1] + 1)
            )
        assert is_bound(dev.number)
        # A wrong diskseq means "not the binding we made": never detach it.
        stale = loop.detach_with_proof(ident.devt, diskseq=ident.diskseq + 1000, tag=TAG)
        assert stale is loop.DetachResult.ALREADY_GONE
        assert is_bound(dev.number)
        # While we (the "consumer") still hold it, CLR_FD only arms AUTOCLEAR.
        done = loop.detach_with_proof(ident.devt, diskseq=ident.diskseq, tag=TAG, backing=backing)
        assert done is loop.DetachResult.DETACHED
        assert is_bound(dev.number)
        assert os.pread(dev.fd, 512, 0) == b"\0" * 512
    finally:
        dev.close()
    assert not is_bound(dev.number)
    assert (
        loop.detach_with_proof(ident.devt, diskseq=ident.diskseq, tag=TAG) is loop.DetachResult.ALREADY_GONE
    )


def test_admin_loop_without_our_tag_is_never_touched(make_image: ImageFactory) -> None:
    image = make_image()
    admin = loop.attach_file(str(image), read_only=False, tag="xenblockctl:")
    try:
        ours = [b.number for b in loop.bound_loops(TAG)]
        assert admin.number not in ours
        with pytest.raises(NotOurs):
            loop.detach_with_proof(admin.identity.devt, diskseq=admin.identity.diskseq, tag=TAG)
        assert is_bound(admin.number)
    finally:
        admin.close()


def test_bound_loops_lists_ours(make_image: ImageFactory, loop_devices: list[loop.LoopDevice]) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag=TAG)
    loop_devices.append(dev)
    found = {b.number: b for b in loop.bound_loops(TAG)}
    assert dev.number in found
    assert found[dev.number].diskseq == dev.identity.diskseq
    assert found[dev.number].backing_file.endswith("disk.img")


def test_bound_loops_skips_a_device_detached_during_the_scan(
    make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another script's remove (or any last close) can detach a loop between the scan's listing
    and its read of `loop/backing_file`; sysfs then answers ENODEV. The scan (every file add's
    sharing check) must skip it, not fail the add as `internal`. The interleaving is forced by
    detaching for real right after the attribute is opened; the ENODEV comes from the kernel."""
    victim = loop.attach_file(str(make_image("victim.img")), read_only=False, tag="xenblockctl:test-victim")
    keeper = loop.attach_file(str(make_image("keeper.img")), read_only=False, tag="xenblockctl:test-keeper")
    real_open = open

    def open_then_detach(path: str, *args: object, **kwargs: object) -> object:
        f = real_open(path, *args, **kwargs)  # type: ignore[call-overload]
        if path.endswith(f"/loop{victim.number}/loop/backing_file"):
            victim.close()  # the last close of an AUTOCLEAR device detaches it at once
        return f

    monkeypatch.setattr(loop, "open", open_then_detach, raising=False)
    try:
        numbers = [bound.number for bound in loop.bound_loops()]
    finally:
        victim.close()
        keeper.close()
    assert keeper.number in numbers
    assert victim.number not in numbers


def _backing(image: Path) -> tuple[int, int]:
    st = os.stat(image)
    return st.st_dev, st.st_ino


@pytest.mark.parametrize("virtual_dir", ["real", "missing"])
def test_bound_loops_backed_by_is_the_full_scan_filtered(
    make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, virtual_dir: str
) -> None:
    """The sharing scan of a file add: exactly the records bound_loops gives for that file, whether
    it looks at the minors through /sys/devices/virtual/block (one dir fd) or, where that does not
    list them, through /sys/block's paths."""
    if virtual_dir == "missing":
        monkeypatch.setattr(loop, "SYS_VIRTUAL_BLOCK", str(tmp_path))
    a, b, unused = make_image("a.img"), make_image("b.img"), make_image("unused.img")
    devices: list[loop.LoopDevice] = []
    try:
        for image, read_only, tag in ((a, False, "a1"), (a, True, "a2"), (b, False, "b1")):
            devices.append(loop.attach_file(str(image), read_only=read_only, tag=f"xenblockctl:test-{tag}"))
        for image, count in ((a, 2), (b, 1), (unused, 0)):
            found = list(loop.bound_loops_backed_by(_backing(image)))
            full = [
                x
                for x in loop.bound_loops(tag_prefix=None)
                if (x.status.backing_dev, x.status.backing_ino) == _backing(image)
            ]
            assert found == full
            assert len(found) == count
        (ro,) = [x for x in loop.bound_loops_backed_by(_backing(a)) if x.number == devices[1].number]
        assert ro.diskseq == devices[1].identity.diskseq
        assert LoopFlags.READ_ONLY in ro.status.flags
        assert ro.status.tag == "xenblockctl:test-a2"
        assert ro.backing_file == str(a)
    finally:
        for dev in devices:
            dev.close()


def test_bound_loops_tagged_is_the_full_scan_with_the_exact_tag(make_image: ImageFactory) -> None:
    """remove's pass over a vbd's devices without a record: exactly bound_loops' records whose tag
    is the one asked for, not those that only start like it (another devid, a snapshot's part)."""
    tags = (
        "xenblockctl:test-7:5",
        "xenblockctl:test-7:5",
        "xenblockctl:test-7:51",
        "xenblockctl:test-7:5:base",
    )
    devices = [
        loop.attach_file(str(make_image(f"t{n}.img")), read_only=True, tag=tag) for n, tag in enumerate(tags)
    ]
    try:
        found = list(loop.bound_loops_tagged("xenblockctl:test-7:5"))
        full = [x for x in loop.bound_loops(tag_prefix=None) if x.status.tag == "xenblockctl:test-7:5"]
        assert found == full
        assert sorted(x.number for x in found) == sorted(d.number for d in devices[:2])
        assert list(loop.bound_loops_tagged("xenblockctl:test-7")) == []
        assert [loop.autoclear_now(d.number) for d in devices] == [True] * 4
    finally:
        for dev in devices:
            dev.close()
    assert loop.autoclear_now(1 << 19) is None, "no such device: None"  # (a freed minor may be re-bound)


def test_bound_loops_backed_by_skips_a_device_detached_during_the_scan(
    make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detached between the sysfs look and the open (another script's remove): the open works on
    the now unbound minor and LOOP_GET_STATUS64 answers ENXIO; skipped, not an error. Forced by
    detaching for real right before the open."""
    image = make_image("shared.img")
    victim = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-victim")
    keeper = loop.attach_file(str(image), read_only=False, tag="xenblockctl:test-keeper")
    real_open = loop._open_for_scan

    def detach_then_open(devt: int, node: str) -> int:
        if devt == victim.identity.devt:
            victim.close()  # the last close of an AUTOCLEAR device detaches it at once
        return real_open(devt, node)

    monkeypatch.setattr(loop, "_open_for_scan", detach_then_open)
    try:
        numbers = [bound.number for bound in loop.bound_loops_backed_by(_backing(image))]
    finally:
        victim.close()
        keeper.close()
    assert numbers == [keeper.number]


def test_direct_io_request(make_image: ImageFactory, loop_devices: list[loop.LoopDevice]) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag=TAG, direct_io=True)
    loop_devices.append(dev)
    # Effective DIO depends on the backing filesystem; either way the device works and reports it.
    assert dev.direct_io == (Path(f"/sys/block/loop{dev.number}/loop/dio").read_text().strip() == "1")
    os.pwrite(dev.fd, b"d" * 4096, 0)


def test_private_node_when_dev_has_no_loop_nodes(
    make_image: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    loop_devices: list[loop.LoopDevice],
) -> None:
    empty_dev = tmp_path / "empty-dev"
    empty_dev.mkdir()
    monkeypatch.setattr(loop, "DEV_DIR", str(empty_dev))
    dev = loop.attach_file(str(make_image()), read_only=False, tag=TAG)
    loop_devices.append(dev)
    assert stat.S_ISBLK(os.fstat(dev.fd).st_mode)
    assert list(empty_dev.iterdir()) == [], "the private node must not be left behind"
    assert os.pread(dev.fd, 512, 0) == b"\0" * 512


def _attach_worker(
    image: str, barrier: multiprocessing.synchronize.Barrier, rounds: int, out: multiprocessing.Queue[object]
) -> None:
    results = []
    for _ in range(rounds):
        barrier.wait(timeout=30)
        dev = loop.attach_file(image, read_only=True, tag=TAG)
        results.append((dev.identity.devt, dev.identity.diskseq))
        barrier.wait(timeout=30)  # all hold their device at once: numbers must be unique now
        dev.close()
    out.put(results)


def test_parallel_attach_is_race_free(make_image: ImageFactory) -> None:
    workers, rounds = 8, 5
    images = [str(make_image(f"p{i}.img")) for i in range(workers)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [
        ctx.Process(target=_attach_worker, args=(images[i], barrier, rounds, out)) for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    for r in range(rounds):
        devts = [res[r][0] for res in results]
        assert len(set(devts)) == workers, f"round {r}: two workers got the same loop device"
    seqs = [seq for res in results for _, seq in res]
    assert len(set(seqs)) == workers * rounds


def test_a_race_lost_to_another_binder_is_retried_at_once(
    make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another binder takes the number GET_FREE handed us just before our LOOP_CONFIGURE: the
    EBUSY is a race it won (the device is bound now), so the next GET_FREE is asked without a
    backoff sleep, and we end up on another device."""
    ours, theirs = make_image("ours.img"), make_image("theirs.img")
    real_ioctl = fcntl.ioctl
    intruders: list[int] = []  # the other binder's loop fd (AUTOCLEAR: closing it detaches)
    sleeps: list[float] = []

    def racing_ioctl(fd: int, request: int, *args: Any) -> object:  # args go to the real ioctl
        if request == LOOP_CONFIGURE and not intruders:
            # Bind *that* number to another file first, as a binder that won GET_FREE would.
            theirs_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
            intruders.append(theirs_fd)
            with open(theirs, "r+b") as backing:
                config = LoopConfig(
                    fd=backing.fileno(),
                    block_size=512,
                    info=LoopInfo64(lo_flags=int(LoopFlags.AUTOCLEAR), lo_file_name=b"xenblockctl:intruder"),
                )
                real_ioctl(theirs_fd, LOOP_CONFIGURE, config.pack())
        return real_ioctl(fd, request, *args)

    monkeypatch.setattr(fcntl, "ioctl", racing_ioctl)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    try:
        dev = loop.attach_file(str(ours), read_only=False, tag=TAG)
        try:
            assert intruders, "the race was not staged"
            assert dev.identity.devt != os.fstat(intruders[0]).st_rdev
            assert sleeps == [], "a race lost to another binder must not back off"
        finally:
            dev.close()
    finally:
        for fd in intruders:
            os.close(fd)


def test_ebusy_on_a_device_nobody_bound_backs_off(
    make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EBUSY on a device that is still unbound (nobody won it: claimed, being torn down) is no
    proof of progress: that retry sleeps (jittered, bounded) before asking GET_FREE again."""
    image = make_image()
    real_ioctl = fcntl.ioctl
    refused: list[int] = []
    sleeps: list[float] = []

    def busy_once(fd: int, request: int, *args: Any) -> object:  # args go to the real ioctl
        if request == LOOP_CONFIGURE and not refused:
            refused.append(fd)
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return real_ioctl(fd, request, *args)

    monkeypatch.setattr(fcntl, "ioctl", busy_once)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    dev = loop.attach_file(str(image), read_only=False, tag=TAG)
    dev.close()
    assert len(sleeps) == 1, sleeps
    assert 0 <= sleeps[0] <= loop.DEFAULT_RETRY.max_delay


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("missing", TargetNotFound),
        ("directory", TargetTypeError),
        ("fifo", TargetTypeError),
        ("chardev", TargetTypeError),
        ("empty", TargetEmpty),
        ("tiny", TargetEmpty),
        ("socket", TargetTypeError),
    ],
)
def test_bad_targets_give_typed_errors_and_leave_nothing(
    tmp_path: Path, kind: str, error: type[DeviceError]
) -> None:
    path = tmp_path / kind
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
    elif kind == "empty":
        path.touch()
    elif kind == "tiny":
        path.write_bytes(b"x" * 100)
    elif kind == "socket":
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    with pytest.raises(error) as exc_info:
        loop.attach_file(str(path), read_only=False, tag=TAG)
    assert exc_info.value.code == error.code
    assert "\n" not in exc_info.value.one_line()
    # the autouse leak guard proves nothing stayed bound


def test_unreadable_target_as_unprivileged_user(make_image: ImageFactory) -> None:
    """Root bypasses file modes, so the permission path is exercised in a child that drops to nobody."""
    image = make_image()
    image.chmod(0o000)
    image.parent.chmod(0o755)
    code = (
        "import os, sys\n"
        "from xenblockctl.kernel import blockdev\n"
        "from xenblockctl.kernel.errors import TargetPermission\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    blockdev.open_path({str(image)!r}, writable=False)\n"
        "except TargetPermission as e:\n"
        "    print(e.code); sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == TargetPermission.code


def test_open_block_device_refuses_regular_file(make_image: ImageFactory) -> None:
    with pytest.raises(TargetTypeError):
        blockdev.open_block_device(str(make_image()), writable=False)


def test_identity_from_block_device_path(
    make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag=TAG)
    loop_devices.append(dev)
    with blockdev.open_block_device(f"/dev/loop{dev.number}", writable=False) as opened:
        assert opened.identity == blockdev.identify(dev.fd)


def test_loop_bound_to_another_file_is_undone(
    make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After LOOP_CONFIGURE the status is read back: a device whose backing file is not the one we
    opened (what a path-based set-up racing a rename could give) is unbound and refused, never used.
    Fault injection: the kernel binds the fd it is given, so the read-back is what is played."""
    image = make_image("ours.img")
    other = os.stat(make_image("theirs.img"))
    seen: list[int] = []
    real = loop.get_status

    def other_backing(fd: int) -> loop.LoopStatus | None:
        status = real(fd)
        seen.append(os.minor(os.fstat(fd).st_rdev))
        return None if status is None else status._replace(backing_dev=other.st_dev, backing_ino=other.st_ino)

    monkeypatch.setattr(loop, "get_status", other_backing)
    with pytest.raises(IdentityMismatch, match="bound to another file"):
        loop.attach_file(str(image), read_only=False, tag=TAG, autoclear=False)
    assert seen, "the status was read back"
    assert not is_bound(seen[-1]), "the device we bound was undone"
