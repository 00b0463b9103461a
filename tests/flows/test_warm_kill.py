"""test_kill.py's guarantees when libxl kills the warm server's *client* only (blockscript/warm.py):
the worker must die by kill-on-hangup at that instant and leave what a killed script leaves --
except once a kernel-blkback add has handed it the AUTOCLEAR job, after which it must survive the
client as the script's forked child does. The harness kills nothing but the client here
(test_warm_kill_all.py runs test_kill.py's own tests, whose harness also kills the worker), so
these are the tests of the kill-on-hangup itself."""

from __future__ import annotations

import signal
import time

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl, process_state, stat_fields, wait_gone
from tests.fixtures.warm import WarmServer
from tests.flows.test_kill import _sysfs_autoclear, _tear_down, assert_consistent, remove_after_a_killed_add
from xenblockctl.blockscript.faults import ADD_POINTS, REMOVE_POINTS

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


@pytest.mark.parametrize("point", ADD_POINTS)
def test_killing_the_client_kills_the_worker_during_add(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory, point: str
) -> None:
    image = make_image()
    be = libxl.create_backend(5, 51712, str(image), "w")
    consumer = libxl.engine_consumer(be)
    running = libxl.start("add", be, pause_at=point)
    assert running.wait_paused() == point
    worker = running.paused_pid
    assert worker != running.proc.pid, "the flow ran in the client, not in a worker"
    running.proc.send_signal(signal.SIGKILL)  # libxl at 40 s: the client's pid only
    running.proc.wait(10)
    wait_gone(worker)  # reaped client != done worker: its last close comes just after
    assert_consistent(libxl.nodes(be))
    consumer.release()
    assert bound_loops_under(image.parent) == {}, f"killed at {point}: loop device leaked"
    remove_after_a_killed_add(libxl, be)


@pytest.mark.parametrize("point", REMOVE_POINTS)
def test_killing_the_client_kills_the_worker_during_remove(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory, point: str
) -> None:
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    assert libxl.run("add", be).returncode == 0
    consumer.wait_opened()
    libxl.wait_autoclear_off(be)  # the worker's AUTOCLEAR job, after its reply
    consumer.release()
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    running = libxl.start("remove", be, pause_at=point)
    assert running.wait_paused() == point
    worker = running.paused_pid
    assert worker != running.proc.pid, "the flow ran in the client, not in a worker"
    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait(10)
    wait_gone(worker)
    assert_consistent(libxl.nodes(be))
    result = libxl.run("remove", be)
    assert result.returncode == 0, result.stderr
    assert bound_loops_under(image.parent) == {}
    assert "physical-device" not in libxl.nodes(be)


def test_the_autoclear_job_outlives_a_killed_client(
    warm: WarmServer, libxl: Libxl, make_image: ImageFactory
) -> None:
    """Killed after the flow handed the worker its AUTOCLEAR job (autoclear.STAGE): the worker
    disarmed its kill-on-hangup then, so it survives the client (as today's script's forked child
    survives libxl's kill), finishes the flow and turns AUTOCLEAR off."""
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    running = libxl.start("add", be, pause_at="add-done")
    assert running.wait_paused() == "add-done"
    worker = running.paused_pid
    running.proc.send_signal(signal.SIGKILL)
    running.proc.wait(10)
    time.sleep(0.2)  # a SIGKILL by the hangup would have landed by now (it is sent at the close)
    assert process_state(worker) == "T", "the worker died with its client: the AUTOCLEAR job went with it"
    running.resume()
    wait_gone(worker)
    minor = consumer.wait_opened().identity.minor
    libxl.wait_autoclear_off(be)
    consumer.release()
    assert minor in bound_loops_under(image.parent), "AUTOCLEAR was off: the device stays for a reconnect"
    libxl.store.write(be.node("online"), "0")
    libxl.store.write(be.node("state"), "6")
    assert libxl.run("remove", be).returncode == 0
    assert bound_loops_under(image.parent) == {}


def test_a_kernel_path_add_forks_nothing(warm: WarmServer, libxl: Libxl, make_image: ImageFactory) -> None:
    """The worker runs the AUTOCLEAR job itself after its reply (no child on the add's path): it
    has let go of libxl's pipes before the job starts, said so on them, and is what holds the
    device meanwhile."""
    image = make_image()
    be = libxl.create_backend(7, 51712, str(image), "w", engine=False)
    consumer = libxl.blkback_consumer(be)
    running = libxl.start("add", be, pause_at="autoclear-started")
    assert running.wait_paused(in_child=True) == "autoclear-started"
    # EOF on both pipes while the job is stopped: no process of ours holds libxl's output now
    _out, err = running.proc.communicate(timeout=10)
    assert running.proc.returncode == 0, "the client has its status before the job runs"
    assert "left to this worker, after its reply" in err, err
    assert "handed to child" not in err, err
    worker = running.paused_pid
    assert int(stat_fields(worker)[1]) == warm.proc.pid, (
        "the job runs in the server's worker, not a child of it"
    )
    minor = consumer.wait_opened().identity.minor
    assert libxl.nodes(be)["hotplug-status"] == "connected"
    assert _sysfs_autoclear(minor) == "1"
    running.resume()
    wait_gone(worker)
    libxl.wait_autoclear_off(be)
    consumer.release()
    _tear_down(libxl, be)
    assert bound_loops_under(image.parent) == {}
