"""SIGKILL the block script at every named step, as libxl does after 40 s, and the child a
kernel-blkback add forks to turn AUTOCLEAR off (blockscript/autoclear.py) at every step of its own.

Invariants afterwards: xenstore never shows physical-device without physical-device-luid and
diskseq, no loop device of ours stays bound unless a consumer holds it, and none held by a
consumer is detached under it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Consumer, Libxl, Running, kill_child, wait_lock_opened
from xenblockctl.blockscript.faults import ADD_POINTS, AUTOCLEAR_POINTS, REMOVE_POINTS
from xenblockctl.xenstore.identity import OwnerRecord

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def assert_consistent(nodes: dict[str, str]) -> None:
    assert ("physical-device" in nodes) == ("physical-device-luid" in nodes), nodes
    assert ("physical-device" in nodes) == ("diskseq" in nodes), nodes  # the kernel patch's node
    if "physical-device" in nodes:
        assert "xenblockctl-owner" in nodes


ADD_CASES = [(p, True) for p in ADD_POINTS] + [
    (p, False)
    for p in ADD_POINTS
    if p not in ("add-consumer-ready", "add-done")  # need a consumer
]


@pytest.mark.parametrize(
    ("point", "with_consumer"), ADD_CASES, ids=[f"{p}-{'consumer' if c else 'alone'}" for p, c in ADD_CASES]
)
def test_kill_during_add(libxl: Libxl, make_image: ImageFactory, point: str, with_consumer: bool) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be) if with_consumer else None
    running = libxl.start("add", be, pause_at=point)
    assert running.wait_paused() == point
    running.kill()
    assert_consistent(libxl.nodes(be))
    if consumer is not None and consumer.device is not None:
        # The consumer holds it, so it may stay bound; it must go as soon as the consumer lets go.
        consumer.release()
    elif consumer is not None:
        consumer.release()
    assert bound_loops_under(image.parent) == {}, f"killed at {point}: loop device leaked"
    remove_after_a_killed_add(libxl, be)


def remove_after_a_killed_add(libxl: Libxl, be: Backend) -> None:
    """libxl then tears the device down: remove must cope with whatever the kill left behind."""
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    nodes = libxl.nodes(be)
    assert "physical-device" not in nodes or "xenblockctl-owner" not in nodes


@pytest.mark.parametrize("point", REMOVE_POINTS)
def test_kill_during_remove(libxl: Libxl, make_image: ImageFactory, point: str) -> None:
    """Kernel-blkback style (AUTOCLEAR off after hand-off), so remove has a real detach to do."""
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    assert libxl.run("add", be).returncode == 0
    consumer.wait_opened()
    libxl.wait_autoclear_off(be)  # the add's forked child
    consumer.release()
    assert len(bound_loops_under(image.parent)) == 1
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    running = libxl.start("remove", be, pause_at=point)
    assert running.wait_paused() == point
    running.kill()
    assert_consistent(libxl.nodes(be))
    # A re-run (libxl does not, but an admin or gc may) finishes the job.
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    assert bound_loops_under(image.parent) == {}
    assert "physical-device" not in libxl.nodes(be)


def _sysfs_autoclear(minor: int) -> str:
    return Path(f"/sys/block/loop{minor}/loop/autoclear").read_text().strip()


def _tear_down(libxl: Libxl, be: Backend) -> None:
    """libxl's destroy: online=0, state=6, then remove, which must succeed and withdraw."""
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    assert "physical-device" not in libxl.nodes(be)


class KernelAdd(NamedTuple):
    image: Path
    be: Backend
    consumer: Consumer
    running: Running
    minor: int


def _kernel_add_paused_in_child(libxl: Libxl, make_image: ImageFactory, point: str) -> KernelAdd:
    """A kernel-blkback add whose script has exited (libxl proceeds) and whose AUTOCLEAR child is
    stopped at `point`; blkback's stand-in holds the device."""
    image = make_image(fill=b"guest disk")
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    running = libxl.start("add", be, pause_at=point)
    assert running.wait_paused(in_child=True) == point
    assert running.proc.wait(10) == 0, "the script itself has finished: libxl proceeds"
    assert running.paused_pid != running.proc.pid
    minor = consumer.wait_opened().identity.minor
    assert libxl.nodes(be)["hotplug-status"] == "connected"
    return KernelAdd(image, be, consumer, running, minor)


KERNEL_CHILD_CASES = [(p, order) for p in AUTOCLEAR_POINTS for order in ("reconnect", "remove-while-held")]


@pytest.mark.parametrize(
    ("point", "order"), KERNEL_CHILD_CASES, ids=[f"{p}-{o}" for p, o in KERNEL_CHILD_CASES]
)
def test_kill_autoclear_child(libxl: Libxl, make_image: ImageFactory, point: str, order: str) -> None:
    """The add's child killed at each of its steps. "reconnect": blkback drops its reference (a
    frontend reconnect) and then libxl removes; "remove-while-held": libxl removes while blkback
    still holds the device, which must stay readable until blkback lets go."""
    image, be, consumer, running, minor = _kernel_add_paused_in_child(libxl, make_image, point)
    device = consumer.wait_opened()
    kill_child(running.paused_pid)
    nodes = libxl.nodes(be)
    assert_consistent(nodes)
    assert OwnerRecord.parse(nodes["xenblockctl-owner"]).autoclear, "the child never rewrote the record"
    cleared = point == "autoclear-cleared"
    assert _sysfs_autoclear(minor) == ("0" if cleared else "1")
    assert os.pread(device.fd, 10, 0) == b"guest disk"
    if order == "reconnect":
        consumer.release()
        if cleared:
            assert minor in bound_loops_under(image.parent), "AUTOCLEAR was off: a reconnect keeps the disk"
        else:
            # The degraded case: AUTOCLEAR stayed on and blkback's reference governed: nothing leaks,
            # but the reconnecting guest loses its disk (as with kernel_autoclear=true).
            assert minor not in bound_loops_under(image.parent)
        _tear_down(libxl, be)
    else:
        _tear_down(libxl, be)
        assert minor in bound_loops_under(image.parent), "remove must not detach a device blkback holds"
        assert os.pread(device.fd, 10, 0) == b"guest disk"
        consumer.release()
    assert bound_loops_under(image.parent) == {}, f"child killed at {point}: loop device leaked"


def kill_kernel_path_add(
    libxl: Libxl, make_image: ImageFactory, point: str
) -> tuple[Path, Backend, Consumer, int]:
    """A kernel-blkback add killed at `point`, blkback's stand-in holding the device: (image,
    backend, consumer, minor), the nodes checked consistent."""
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    running = libxl.start("add", be, pause_at=point)
    assert running.wait_paused() == point
    running.kill()
    minor = consumer.wait_opened().identity.minor
    assert_consistent(libxl.nodes(be))
    return image, be, consumer, minor


@pytest.mark.parametrize("point", ["add-consumer-ready", "add-done"])
def test_kill_kernel_path_add(libxl: Libxl, make_image: ImageFactory, point: str) -> None:
    """The script killed on the kernel-blkback path: before the hand-off tail (no child, AUTOCLEAR
    stays on, nothing connected) or after it forked (the child finishes on its own)."""
    image, be, consumer, minor = kill_kernel_path_add(libxl, make_image, point)
    if point == "add-done":
        libxl.wait_autoclear_off(be)
        consumer.release()
        assert minor in bound_loops_under(image.parent)
    else:
        assert "hotplug-status" not in libxl.nodes(be)
        assert _sysfs_autoclear(minor) == "1"
        consumer.release()
    _tear_down(libxl, be)
    assert bound_loops_under(image.parent) == {}, f"killed at {point}: loop device leaked"


def _remove_waiting_for_the_child(libxl: Libxl, make_image: ImageFactory) -> tuple[KernelAdd, Running]:
    """libxl's remove started while the add's AUTOCLEAR child, stopped after its check, holds the
    device lock: the remove must be waiting for it."""
    add = _kernel_add_paused_in_child(libxl, make_image, "autoclear-checked")
    libxl.store.write(add.be.node("online"), "0")
    libxl.store.write(add.be.node("state"), "6")
    remover = libxl.start("remove", add.be)
    time.sleep(0.3)
    assert remover.proc.poll() is None, "remove must wait for the AUTOCLEAR child's device lock"
    return add, remover


def test_remove_waits_for_the_autoclear_child(libxl: Libxl, make_image: ImageFactory) -> None:
    """A remove racing the child: the child checked the record, then remove's LOOP_CLR_FD arms
    AUTOCLEAR (blkback still holds the device), then the child's ioctl would clear it again and the
    device would outlive blkback. Remove waits for the child's lock instead."""
    (image, be, consumer, running, minor), remover = _remove_waiting_for_the_child(libxl, make_image)
    running.resume()
    _out, err = remover.proc.communicate(timeout=20)
    assert remover.proc.returncode == 0, err
    assert "physical-device" not in libxl.nodes(be)
    assert minor in bound_loops_under(image.parent), "blkback still holds it"
    consumer.release()  # blkback lets go: the detach remove armed must happen now
    assert bound_loops_under(image.parent) == {}, "the child's ioctl cancelled remove's detach: leaked"


def test_remove_leaves_a_record_changed_while_it_waited_for_the_lock(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    """The record names another device by the time remove holds the device lock (a concurrent add
    after a forced detach): remove detaches only the binding it read (by proof), withdraws nothing,
    and logs `record-changed` with what the record names now. The old binding must not outlive
    blkback (remove used to detach nothing here, and the child had turned AUTOCLEAR off: leaked)."""
    (image, be, consumer, running, minor), remover = _remove_waiting_for_the_child(libxl, make_image)
    newer = OwnerRecord("device", 8, 0x20, 0x7777, "w").format()
    libxl.store.write_many({be.node("xenblockctl-owner"): newer, be.node("physical-device"): "8:20"})
    running.resume()  # the child turns AUTOCLEAR off, then finds the record changed: left as is
    _out, err = remover.proc.communicate(timeout=20)
    assert remover.proc.returncode == 0, err
    assert "owner record changed since it was read (kind=device 8:32 seq 7777)" in err, err
    assert "removed (record-changed)" in err, err
    nodes = libxl.nodes(be)
    assert (nodes["xenblockctl-owner"], nodes["physical-device"]) == (newer, "8:20"), (
        "withdrew a newer record"
    )
    assert minor in bound_loops_under(image.parent), "blkback still holds it"
    consumer.release()
    assert bound_loops_under(image.parent) == {}, "the binding remove read was not detached: leaked"


def test_remove_lock_timeout_changes_nothing(libxl: Libxl, make_image: ImageFactory) -> None:
    """A child that holds the device lock too long (here: stopped) makes remove fail with a coded
    error, touching neither the device nor the nodes; a later remove finishes."""
    image, be, consumer, running, minor = _kernel_add_paused_in_child(libxl, make_image, "autoclear-checked")
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    before = libxl.nodes(be)
    result = libxl.run("remove", be, XENBLOCKCTL_LOCK_TIMEOUT="0.3")
    assert result.returncode == 1
    assert "lock-timeout" in result.stderr
    assert libxl.nodes(be) == before
    running.resume()
    libxl.wait_autoclear_off(be)
    consumer.release()
    assert minor in bound_loops_under(image.parent), "the failed remove detached nothing"
    _tear_down(libxl, be)
    assert bound_loops_under(image.parent) == {}


def test_autoclear_child_leaves_a_withdrawn_backend_alone(libxl: Libxl, make_image: ImageFactory) -> None:
    """The backend (and our record) vanished between the fork and the child's check, as when the
    toolstack deletes a backend without running remove: the child must leave AUTOCLEAR on, so the
    device goes with blkback's reference instead of staying bound with nobody to detach it."""
    image, be, consumer, running, minor = _kernel_add_paused_in_child(libxl, make_image, "autoclear-started")
    libxl.store.rm(be.path)
    running.resume()
    running.wait_child_gone()
    assert _sysfs_autoclear(minor) == "1", "the child cleared AUTOCLEAR of a device nobody records"
    consumer.release()
    assert bound_loops_under(image.parent) == {}, "leaked: AUTOCLEAR off and no record to remove it by"


def test_a_record_removed_after_the_job_checked_it_is_detached_by_tag(
    libxl: Libxl, make_image: ImageFactory
) -> None:
    """dom0's libxl removed the backend directory (a driver domain 10 s late) after the AUTOCLEAR
    job had read the record and before its ioctl: the job turns AUTOCLEAR off and finds the record
    gone; a remove that scanned meanwhile saw AUTOCLEAR still on, and must read it again under the
    lock, which the job held throughout, or the device stays bound for good (review of bb87b97)."""
    image, be, consumer, running, minor = _kernel_add_paused_in_child(libxl, make_image, "autoclear-checked")
    libxl.store.rm(be.path)
    remover = libxl.start("remove", be)  # scans (AUTOCLEAR on), then waits for the job's lock
    wait_lock_opened(libxl.lock_dir / f"loop-7-{minor}", besides=running.paused_pid)
    running.resume()
    _out, err = remover.proc.communicate(timeout=20)
    assert remover.proc.returncode == 0, err
    assert "no owner record: detached by its tag" in err, err
    assert "removed (detached)" in err, err
    assert minor in bound_loops_under(image.parent), "blkback still holds it"
    consumer.release()
    assert bound_loops_under(image.parent) == {}, "leaked: AUTOCLEAR off and nothing detached it"


def test_remove_during_the_hand_off_is_not_undone(libxl: Libxl, make_image: ImageFactory) -> None:
    """A remove (gc, a forced detach) that ran while add waited for blkback withdrew our nodes:
    add must not write the record back and report connected (it used to, reviving the record of a
    device remove had already detached), nor fork a child for it."""
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    running = libxl.start("add", be, pause_at="add-consumer-ready")
    assert running.wait_paused() == "add-consumer-ready"
    consumer.wait_opened()
    removed = libxl.run("remove", be)
    assert removed.returncode == 0, removed.stderr
    running.resume()
    _out, err = running.proc.communicate(timeout=20)
    assert running.proc.returncode == 1, err
    assert "backend-missing" in err
    nodes = libxl.nodes(be)
    assert "xenblockctl-owner" not in nodes
    assert "physical-device" not in nodes
    assert nodes.get("hotplug-status") == "error"
    consumer.release()
    assert bound_loops_under(image.parent) == {}, "remove's detach must take effect once blkback lets go"
