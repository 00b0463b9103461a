"""The block script as libxl runs it: real loop devices, the embedded xenstored, a subprocess."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from tests.fixtures.engine import wait_for
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Consumer, Libxl
from xenblockctl.blockscript import faults
from xenblockctl.blockscript.owner import OwnerRecord
from xenblockctl.blockscript.remove import run_remove
from xenblockctl.environment import Environment
from xenblockctl.journal import Journal
from xenblockctl.kernel import loop
from xenblockctl.kernel.blockdev import BlockDevice, identify
from xenblockctl.kernel.loop_abi import LOOP_CONFIGURE, LoopConfig, LoopFlags, LoopInfo64
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vbd import BackendPath

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def assert_published(nodes: dict[str, str], device_fd_identity: tuple[int, int, int]) -> None:
    major, minor, diskseq = device_fd_identity
    assert nodes["physical-device"] == f"{major:x}:{minor:x}"
    assert nodes["physical-device-luid"] == f"{diskseq:x}"


def test_add_file_hands_off_to_engine_and_remove_cleans(libxl: Libxl, make_image: ImageFactory) -> None:
    image = make_image(fill=b"guest disk")
    be = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    assert consumer.device is not None
    ident = consumer.device.identity
    nodes = libxl.nodes(be)
    assert_published(nodes, (ident.major, ident.minor, ident.diskseq))
    assert nodes["physical-device-path"] == f"/dev/loop{ident.minor}"
    assert nodes["hotplug-status"] == "connected"
    assert "hotplug-error" not in nodes
    owner = OwnerRecord.parse(nodes["xenblockctl-owner"])
    assert owner.kind == "loop"
    assert owner.autoclear, "the engine holds the device across reconnects: keep AUTOCLEAR"
    assert owner.tag == "xenblockctl:5:51712"
    assert owner.backing == (os.stat(image).st_dev, os.stat(image).st_ino)
    assert os.pread(consumer.device.fd, 10, 0) == b"guest disk"
    # The script has exited: only the consumer keeps the device bound.
    assert ident.minor in bound_loops_under(image.parent)
    consumer.release()
    assert ident.minor not in bound_loops_under(image.parent), "delete-on-close after the consumer let go"
    # libxl: online=0, state=6 (the engine closed), then remove.
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    nodes = libxl.nodes(be)
    for name in ("physical-device", "physical-device-luid", "physical-device-path", "xenblockctl-owner"):
        assert name not in nodes


def test_read_only_add_gives_read_only_loop(libxl: Libxl, make_image: ImageFactory) -> None:
    be = libxl.create_backend(5, 51728, str(make_image()), "r")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    assert consumer.device is not None
    assert consumer.device.identity.read_only
    assert OwnerRecord.parse(libxl.nodes(be)["xenblockctl-owner"]).mode == "r"


def test_kernel_blkback_consumer_gets_a_device_that_survives_reconnects(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    assert consumer.device is not None
    minor = consumer.device.identity.minor
    assert libxl.nodes(be)["hotplug-status"] == "connected"
    # AUTOCLEAR goes off in a child the script forks after hotplug-status=connected (off libxl's
    # critical path); the record says autoclear=0 only once the ioctl is done.
    owner = libxl.wait_autoclear_off(be)
    assert not owner.autoclear, "blkback drops its reference on frontend reconnect: AUTOCLEAR must be off"
    assert Path(f"/sys/block/loop{minor}/loop/autoclear").read_text().strip() == "0"
    consumer.release()  # blkback closes on reconnect ...
    assert minor in bound_loops_under(image.parent), "... and the device must still be there"
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    assert minor not in bound_loops_under(image.parent), "remove detaches what it proved it created"


def _kernel_path_add(libxl: Libxl, image: Path, devid: int) -> tuple[Backend, Consumer]:
    """A kernel-blkback add whose AUTOCLEAR job is done. The callers then remove its backend
    directory, owner record and all: what dom0's libxl does to a driver domain's backend once the
    driver domain is 10 s late (LIBXL_DESTROY_TIMEOUT; ci34's scenario 21)."""
    be = libxl.create_backend(7, devid, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    libxl.wait_autoclear_off(be)
    return be, consumer


def test_remove_detaches_by_its_tag_a_device_whose_record_another_toolstack_removed(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    image = make_image()
    # the same guest's other disks, whose tags start like this vbd's (AUTOCLEAR off too): untouched
    decoys = [
        loop.attach_file(str(make_image(f"decoy{n}.img")), read_only=True, tag=tag, autoclear=False)
        for n, tag in enumerate(("xenblockctl:7:517441", "xenblockctl:7:51744:base"))
    ]
    try:
        be, consumer = _kernel_path_add(libxl, image, 51744)
        minor = consumer.wait_opened().identity.minor
        libxl.store.rm(be.path)
        result = libxl.run("remove", be)
        assert result.returncode == 0, result.stderr
        assert "no owner record: detached by its tag" in result.stderr, result.stderr
        # blkback still held it: LOOP_CLR_FD armed AUTOCLEAR, so its release is the detach
        assert minor in bound_loops_under(image.parent)
        consumer.release()
        assert wait_for(lambda: minor not in bound_loops_under(image.parent), timeout=10), "not cleared"
        # held by this test, a decoy LOOP_CLR_FD touched would only have had AUTOCLEAR armed
        assert [loop.autoclear_now(d.number) for d in decoys] == [False, False], "another tag touched"
        assert libxl.nodes(be) == {}, "remove must not re-create a removed backend"
    finally:
        for decoy in decoys:
            decoy.close()
            loop.detach_with_proof(decoy.identity.devt, diskseq=decoy.identity.diskseq, tag=decoy.tag)


@pytest.mark.parametrize("published_seq", ["same", "older"])
def test_remove_without_a_record_leaves_a_device_another_backend_publishes(
    libxl: Libxl, make_image: ImageFactory, published_seq: str
) -> None:
    """An admin handed the same device to another guest as a block-device target: that backend's
    physical-device and luid name it, and it stays bound. A luid of an older binding of the number
    names another disk (gc's rule too): it does not keep this one."""
    image = make_image()
    be, consumer = _kernel_path_add(libxl, image, 51760)
    device = consumer.wait_opened().identity
    published = {name: value for name, value in libxl.nodes(be).items() if name.startswith("physical-device")}
    if published_seq == "older":
        published["physical-device-luid"] = f"{device.diskseq - 1:x}"
    other = libxl.create_backend(8, 51712, f"/dev/loop{device.minor}", "r", engine=False)
    for name, value in published.items():
        libxl.store.write(other.node(name), value)
    libxl.store.rm(be.path)
    consumer.release()
    try:
        result = libxl.run("remove", be)
        assert result.returncode == 0, result.stderr
        if published_seq == "same":
            assert f"left bound: {other.path} publishes it" in result.stderr, result.stderr
            assert device.minor in bound_loops_under(image.parent), "another backend's device was detached"
        else:
            assert "no owner record: detached by its tag" in result.stderr, result.stderr
            assert device.minor not in bound_loops_under(image.parent), "a stale publication kept it"
    finally:
        if device.minor in bound_loops_under(image.parent):
            loop.detach_with_proof(device.devt, diskseq=device.diskseq, tag="xenblockctl:7:51760")


def test_remove_without_a_record_tries_every_device_and_reports_the_first_failure(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    """Two devices tagged for the vbd (AUTOCLEAR off, nobody holding them), one whose lock another
    holder keeps past lock_timeout: the other is still detached, remove fails with the lock's coded
    error, and a later remove finishes the first."""
    numbers = []
    for n in range(2):
        image = str(make_image(f"d{n}.img"))
        with loop.attach_file(image, read_only=False, tag="xenblockctl:7:51792", autoclear=False) as device:
            numbers.append(device.number)
    be = libxl.create_backend(7, 51792, "/dev/null", "w", engine=False)
    libxl.lock_dir.mkdir(parents=True, exist_ok=True)
    locked, free = numbers
    holder = os.open(libxl.lock_dir / f"loop-7-{locked}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = libxl.run("remove", be, XENBLOCKCTL_LOCK_TIMEOUT="0.3")
        assert result.returncode == 1, result.stderr
        assert "lock-timeout" in result.stderr, result.stderr
        bound = bound_loops_under(libxl.workdir)
        assert free not in bound, "the device whose lock was free was not detached"
        assert locked in bound, "a device was detached without its lock"
    finally:
        os.close(holder)
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    assert bound_loops_under(libxl.workdir) == {}, result.stderr


def test_remove_without_a_record_leaves_an_autoclear_device_to_its_last_close(
    libxl: Libxl, make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    """A device of this vbd with AUTOCLEAR still on (an add's, before its job; the job finding no
    record leaves it on) frees itself at its holder's last close: remove does not touch it."""
    image = make_image()
    held = loop.attach_file(str(image), read_only=False, tag="xenblockctl:7:51776", autoclear=True)
    loop_devices.append(held)
    be = libxl.create_backend(7, 51776, str(image), "w", engine=False)
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    assert "no owner record: left to its last close (AUTOCLEAR on)" in result.stderr, result.stderr
    assert held.autoclear
    assert held.number in bound_loops_under(image.parent)


def test_an_in_process_add_turns_autoclear_off_in_line(libxl: Libxl, make_image: ImageFactory) -> None:
    """The udev hook (and the CLI's attach) run `add` in their own process: no child may be left
    behind there (udev kills it, and a threaded caller must not fork), so AUTOCLEAR is off and the
    record says so by the time it returns."""
    from xenblockctl.blockscript import hotplug

    image = make_image()
    be = libxl.create_backend(7, 51728, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    assert hotplug.main(["block-xenblockctl", "add"], libxl.env("add", be), defer_autoclear=False) == 0
    _cleared_in_line_then_removed(libxl, be, consumer, image)


def _cleared_in_line_then_removed(libxl: Libxl, be: Backend, consumer: Consumer, image: Path) -> None:
    """After an add that returned: AUTOCLEAR is off and the record says so, blkback's release (a
    reconnect) keeps the device, and remove detaches it (no other fd of ours outlived the add)."""
    minor = consumer.wait_opened().identity.minor
    assert not OwnerRecord.parse(libxl.nodes(be)["xenblockctl-owner"]).autoclear
    assert Path(f"/sys/block/loop{minor}/loop/autoclear").read_text().strip() == "0"
    consumer.release()
    assert minor in bound_loops_under(image.parent)
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    assert libxl.run("remove", be).returncode == 0
    assert minor not in bound_loops_under(image.parent)


def test_a_job_the_worker_cannot_take_is_done_in_line(
    libxl: Libxl,
    make_image: ImageFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A warm worker's stage callback that fails (its /dev/null open or the disarm: an EMFILE, a
    fault this host cannot produce on demand, so a stand-in raises it) hands nothing over: the
    add turns AUTOCLEAR off in line, under the lock it still holds, says why, and succeeds."""
    from xenblockctl.blockscript import autoclear, hotplug

    def refuse(job: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(autoclear, "STAGE", refuse)
    image = make_image()
    be = libxl.create_backend(7, 51728, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    assert hotplug.main(["block-xenblockctl", "add"], libxl.env("add", be)) == 0
    err = capsys.readouterr().err
    assert "handing the job to the worker failed (Too many open files): turning AUTOCLEAR off in line" in err
    _cleared_in_line_then_removed(libxl, be, consumer, image)


def test_existing_block_device_is_used_and_never_detached(
    libxl: Libxl, make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    admin = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:admin", autoclear=False)
    loop_devices.append(admin)
    be = libxl.create_backend(5, 51744, f"/dev/loop{admin.number}", "w")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    nodes = libxl.nodes(be)
    assert_published(nodes, (7, admin.number, admin.identity.diskseq))
    assert nodes["physical-device-path"] == f"/dev/loop{admin.number}"
    assert OwnerRecord.parse(nodes["xenblockctl-owner"]).kind == "device"
    consumer.release()
    libxl.store.write(be.node("state"), "6")
    assert libxl.run("remove", be).returncode == 0
    assert os.path.exists(f"/sys/block/loop{admin.number}/loop"), "an admin's device is never detached"
    admin.set_autoclear(True)


def test_no_consumer_times_out_and_leaves_nothing(libxl: Libxl, make_image: ImageFactory) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51760, str(image), "w")
    result = libxl.run("add", be, XENBLOCKCTL_HANDOFF_TIMEOUT="0.5")
    assert result.returncode == 1
    nodes = libxl.nodes(be)
    assert nodes["hotplug-status"] == "error"
    assert nodes["hotplug-error"].startswith("handoff-timeout: ")
    assert "physical-device" not in nodes
    assert "physical-device-luid" not in nodes
    assert "xenblockctl-owner" not in nodes
    assert bound_loops_under(image.parent) == {}


def test_backend_error_node_aborts_handoff(libxl: Libxl, make_image: ImageFactory) -> None:
    be = libxl.create_backend(5, 51776, str(make_image()), "w")
    running = libxl.start("add", be, pause_at=None)
    # The engine refuses (e.g. luid mismatch) by writing its error node.
    assert wait_for(lambda: "physical-device" in libxl.nodes(be), timeout=4)
    libxl.store.write(f"/local/domain/0/error/{be.relative}/error", "engine: diskseq mismatch")
    running.proc.wait(20)
    assert running.proc.returncode == 1
    nodes = libxl.nodes(be)
    assert nodes["hotplug-error"].startswith("handoff-failed: backend reported: engine: diskseq mismatch")
    assert "physical-device" not in nodes


def test_error_node_left_by_an_earlier_backend_does_not_fail_the_next_attach(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    """libxl never deletes `error/backend/...` nodes: one left by a refused attach at the same
    domain/devid must not read as this attach's consumer refusing (seen on real Xen: a blkback
    attach after an engine refusal at xvdb failed with the old message)."""
    be = libxl.create_backend(5, 51792, str(make_image()), "w")
    stale = f"/local/domain/0/error/{be.relative}/error"
    libxl.store.write(stale, "diskseq mismatch on 7:0 (an earlier backend)")
    consumer = libxl.engine_consumer(be)
    result = libxl.run("add", be)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    assert libxl.nodes(be)["hotplug-status"] == "connected"
    assert libxl.store.read_optional(stale) is None, "publishing clears the earlier backend's error node"
    consumer.release()


def test_second_add_is_idempotent_while_the_device_lives(libxl: Libxl, make_image: ImageFactory) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51792, str(image), "w")
    consumer = libxl.engine_consumer(be)
    assert libxl.run("add", be).returncode == 0
    consumer.wait_opened()
    before = libxl.nodes(be)
    again = libxl.run("add", be)
    assert again.returncode == 0, again.stderr
    assert libxl.nodes(be) == before
    consumer.release()  # device gone (AUTOCLEAR): the published identity is now stale
    stale = libxl.run("add", be)
    assert stale.returncode == 1
    after = libxl.nodes(be)
    assert after["hotplug-error"].startswith("identity-mismatch: ")
    assert after["physical-device"] == before["physical-device"], "never a silent rewrite"
    assert after["physical-device-luid"] == before["physical-device-luid"]
    assert bound_loops_under(image.parent) == {}


def test_remove_tolerates_missing_and_repeated(libxl: Libxl, make_image: ImageFactory) -> None:
    be = libxl.create_backend(5, 51808, str(make_image()), "w")
    assert libxl.run("remove", be).returncode == 0, "remove before any add"
    assert libxl.run("remove", be).returncode == 0, "remove twice"
    libxl.store.rm(be.path)
    assert libxl.run("remove", be).returncode == 0, "remove with the backend directory gone"
    assert libxl.nodes(be) == {}, "remove must not re-create a deleted backend"


def test_remove_refuses_a_forged_owner_record(
    libxl: Libxl, make_image: ImageFactory, loop_devices: list[loop.LoopDevice]
) -> None:
    admin = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(admin)
    be = libxl.create_backend(5, 51824, "/dev/null", "w")
    forged = OwnerRecord(
        "loop", 7, admin.number, admin.identity.diskseq, "w", True, (1, 2), tag="xenblockctl:5:51824"
    )
    libxl.store.write(be.node("xenblockctl-owner"), forged.format())
    result = libxl.run("remove", be)
    assert result.returncode == 1
    assert "not-ours" in result.stderr
    assert os.path.exists(f"/sys/block/loop{admin.number}/loop")


def test_diskseq_race_is_caught_by_the_consumer(
    libxl: Libxl, make_image: ImageFactory, tmp_path: Path
) -> None:
    """The script publishes, dies before the consumer opens (its loop auto-clears), and the same
    loop number is re-attached to another file: the consumer must see the luid mismatch."""
    victim = make_image("victim.img", fill=b"victim")
    other = make_image("other.img", fill=b"someone else's disk")
    be = libxl.create_backend(5, 51840, str(victim), "w")
    running = libxl.start("add", be, pause_at="add-published")
    running.wait_paused()
    published = libxl.nodes(be)
    running.kill()
    number = int(published["physical-device"].split(":")[1], 16)
    # Bind *that* number to another file, as a racing attacher that won GET_FREE would.
    fd = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
    with open(other, "r+b") as backing:
        config = LoopConfig(
            fd=backing.fileno(),
            block_size=512,
            info=LoopInfo64(lo_flags=int(LoopFlags.AUTOCLEAR), lo_file_name=b"xenblockctl:intruder"),
        )
        fcntl.ioctl(fd, LOOP_CONFIGURE, config.pack())
    intruder = BlockDevice(fd, identify(fd))
    try:
        consumer = libxl.engine_consumer(be)
        consumer._thread.join(10)  # type: ignore[union-attr]
        assert consumer.outcome.startswith("luid-mismatch"), consumer.outcome
        assert consumer.device is None, "the consumer must not keep the wrong disk"
    finally:
        intruder.close()


def test_kernel_blkback_that_opened_another_device_fails_the_handoff(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    """blkback ignores the luid, so the script is the only one that can notice blkback opened some
    other device than the one published (a stale physical_device, a re-used backend): that is a
    failure, never a hand-off, and the device we made goes with our fd."""
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    bus = libxl.sysfs_bus / f"vbd-{be.domid}-{be.devid}"
    bus.mkdir()
    (bus / "physical_device").write_text("7:fffff\n")
    result = libxl.run("add", be)
    assert result.returncode == 1, result.stderr
    nodes = libxl.nodes(be)
    assert nodes["hotplug-error"].startswith("handoff-failed: kernel blkback opened 7:fffff, not 7:"), nodes
    for name in ("physical-device", "physical-device-luid", "xenblockctl-owner"):
        assert name not in nodes
    assert bound_loops_under(image.parent) == {}


def test_remove_leaves_a_newer_owner_record_alone(libxl: Libxl, monkeypatch: pytest.MonkeyPatch) -> None:
    """remove withdraws the nodes only if the owner record is still the one it acted on: an add
    that published a new device meanwhile (after a forced detach) keeps its nodes."""
    be = libxl.create_backend(5, 51856, "/dev/null", "w")
    old = OwnerRecord("device", 7, 3, 0x10, "w").format()
    new = OwnerRecord("device", 7, 3, 0x11, "w").format()
    libxl.store.write_many({be.node("xenblockctl-owner"): old, be.node("physical-device"): "7:3"})

    def pause(env: Environment, point: str) -> None:
        if point == "remove-detached":
            libxl.store.write_many({be.node("xenblockctl-owner"): new, be.node("physical-device-luid"): "11"})

    monkeypatch.setattr(faults, "pause", pause)
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10) as store:
        result = run_remove(
            store, BackendPath("vbd", 5, 51856), Journal("test-remove", stderr=False), env=Environment({})
        )
    assert result.detached == "record-changed"  # logged like a loop's, not reported as done
    nodes = libxl.nodes(be)
    assert nodes["xenblockctl-owner"] == new
    assert (nodes["physical-device"], nodes["physical-device-luid"]) == ("7:3", "11")
    # without the concurrent add, the same remove withdraws everything
    monkeypatch.setattr(faults, "pause", lambda env, point: None)
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10) as store:
        run_remove(
            store, BackendPath("vbd", 5, 51856), Journal("test-remove", stderr=False), env=Environment({})
        )
    assert not {"xenblockctl-owner", "physical-device", "physical-device-luid"} & set(libxl.nodes(be))
