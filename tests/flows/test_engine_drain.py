"""A guest's write must never land in the wrong file: while a request is in flight the engine keeps
its device fd, its ring and its pages, and publishes neither Closing nor Closed, however long the
I/O takes. The disk hangs for real: the image lives on an ext4 the test freezes (fsfreeze), so the
engine's flush blocks in the kernel until the test thaws it."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.fixtures.engine import InprocEngine, attach_guest, wait_for
from tests.fixtures.kernel import FreezableFs, bound_loops_under
from tests.fixtures.libxl import Libxl
from xenblockctl.backend import blkif, xenbus

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def test_detach_with_stuck_io_holds_everything_until_it_ends(
    libxl: Libxl,
    engine_inproc: InprocEngine,
    freezable_fs: FreezableFs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # short deadlines so the test sees what happens *after* the drain deadline passed
    monkeypatch.setattr(xenbus, "DRAIN_TIMEOUT", 0.5)
    monkeypatch.setattr(xenbus, "FRONTEND_CLOSE_GRACE", 0.2)
    image = freezable_fs.path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    be, guest = attach_guest(libxl, engine_inproc.transport, image, 44)
    dev = engine_inproc.device(44)
    assert dev.device is not None
    assert guest.ring is not None
    fd, devt = dev.device.fd, dev.device.identity.devt
    payload = b"the guest's payload".ljust(4096, b"!")
    sentinel_fd = -1
    freezable_fs.freeze()
    try:
        # a flush with data: fdatasync (blocks while frozen), then the write itself
        rid = guest.ring.submit_write(64, payload, op=blkif.OP_FLUSH_DISKCACHE)
        guest.ring.kick()
        assert wait_for(lambda: dev.dataplane is not None and dev.dataplane.in_flight == 1, 10)
        # libxl detaches; the guest does not wait for its answer
        libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
        # Watch well past the drain deadline. The old engine closed the fd and published Closed here.
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            assert libxl.nodes(be).get("state") != "6", "Closed published with a request in flight"
            assert dev.device is not None, "device closed with a request in flight"
            time.sleep(0.05)
        held = os.fstat(fd)
        assert stat.S_ISBLK(held.st_mode), "the device's fd number now names something else"
        assert held.st_rdev == devt, "the device's fd number now names another device"
        assert dev.dataplane is not None, "ring and grant pages released with a request in flight"
        assert str(image) in bound_loops_under(image.parent).values(), "the loop device must still be held"
        # whatever is opened now could get the device's fd number if it had been closed
        sentinel_fd = os.open(tmp_path / "unrelated", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    finally:
        freezable_fs.thaw()
    try:
        done = guest.ring.collect(1, timeout=30)
        assert done[rid].response.status == blkif.RSP_OKAY
        assert wait_for(lambda: libxl.nodes(be).get("state") == "6"), libxl.nodes(be)
        assert os.fstat(sentinel_fd).st_size == 0, "the guest's write landed in an unrelated file"
    finally:
        if sentinel_fd >= 0:
            os.close(sentinel_fd)
        guest.close()
        guest.store.close()
    with open(image, "rb") as f:
        f.seek(64 * 512)
        assert f.read(4096) == payload
    assert libxl.run("remove", be).returncode == 0
    assert wait_for(lambda: str(image) not in bound_loops_under(image.parent).values(), 10), "device released"
