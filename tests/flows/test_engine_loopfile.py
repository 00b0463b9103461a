"""Issue 20: the engine serves a loop device's guest I/O on the loop's backing file (backend/
loopfile.py) unless told not to, end to end: our block script makes the loop device, the engine
verifies it by its diskseq, and only then moves the I/O to the file it verified; the loop device
stays what it holds, and its own page cache stays out of the data path (as under kernel blkback)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.fixtures.engine import InprocEngine, attach_guest, detach_guest, wait_for
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Libxl
from tests.unit.test_ring_loop import _cached
from xenblockctl.backend import blkif
from xenblockctl.backend.io import DeviceTarget

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def _same_file(fd: int, image: Path) -> bool:
    st, img = os.fstat(fd), os.stat(image)
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (img.st_dev, img.st_ino)


@pytest.mark.parametrize(
    ("engine_inproc", "on_file"),
    [({}, True), ({"loop_file": False}, False)],
    ids=["default", "no-loop-file"],
    indirect=["engine_inproc"],
)
def test_the_engine_serves_the_verified_loop_devices_backing_file(
    libxl: Libxl,
    engine_inproc: InprocEngine,
    on_file: bool,
    make_image: ImageFactory,
    capfd: pytest.CaptureFixture[str],
) -> None:
    image = make_image()
    be, guest = attach_guest(libxl, engine_inproc.transport, image, 61, persistent=True)
    try:
        dev = engine_inproc.device(61)
        assert dev.device is not None
        assert isinstance(dev.target, DeviceTarget)
        assert stat.S_ISBLK(os.fstat(dev.device.fd).st_mode), "the loop device is what the engine holds"
        assert _same_file(dev.target.fd, image) is on_file
        assert dev.target.size_bytes == dev.device.identity.size_bytes
        ring = guest.ring
        assert ring is not None
        data = os.urandom(256 << 10)
        assert ring.write(2048, data) == blkif.RSP_OKAY
        assert ring.read(2048, len(data)) == data
        loop_cache = _cached(dev.device.fd, 1 << 20, len(data))[0]
        # the point: the file's cache (blkback's loop worker's), not the loop device's
        assert (loop_cache == 0) is on_file, loop_cache
        assert ring.flush() == blkif.RSP_OKAY
        with open(image, "rb") as f:
            f.seek(1 << 20)
            assert f.read(len(data)) == data
    finally:
        detach_guest(libxl, be, guest)
    assert wait_for(lambda: bound_loops_under(image.parent) == {}), "detach releases the loop device"
    err = capfd.readouterr().err
    assert ("I/O on its backing file" in err) is on_file, err
