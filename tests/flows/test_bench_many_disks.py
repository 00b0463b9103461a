"""bench/many_disks.py's native frontend (--frontend native, issue 20): the C loop that drives the
rings in the many-disk rows must measure a working engine, and must notice an engine that answers
with the wrong data, or its IOPS say nothing (bench/README.md, session 17, helper native20)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench import many_disks
from xenblockctl.backend.transport.local import LocalTransport

BLOCKS = 64  # small: a short run reads every block many times, the corrupted one included


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler (cc or gcc): the native frontend is compiled at run time")
    return many_disks.build_native_frontend(tmp_path_factory.mktemp("native-frontend"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    many_disks.make_image(path, BLOCKS * many_disks.BLOCK)
    return path


def _row(transport: LocalTransport, image: Path, native: Path) -> many_disks.Row:
    return many_disks.run(
        transport, image, 3, 1, qd=4, seconds=0.3, frontends=2, io_workers=1, pool=None, native=native
    )


def test_the_image_stamps_each_block_with_its_number(image: Path) -> None:
    data = image.read_bytes()
    for b in (0, 1, BLOCKS - 1):
        block = data[b * many_disks.BLOCK : (b + 1) * many_disks.BLOCK]
        assert int.from_bytes(block[:8], "little") == b
        assert int.from_bytes(block[-8:], "little") == ~b & (2**64 - 1)


def test_a_native_row_measures_the_engine(local_transport: LocalTransport, image: Path, native: Path) -> None:
    row = _row(local_transport, image, native)
    assert row.iops > 0
    assert row.jain > 0.5  # every disk completed reads, not one of them
    assert row.frontend_cpu_us > 0  # the C processes' CPU is counted as the frontends'
    assert row.p99_worst_us > 0


@pytest.mark.parametrize("at", ["head", "tail"])
def test_a_wrong_block_in_an_answer_fails_the_run(
    local_transport: LocalTransport, image: Path, native: Path, at: str
) -> None:
    """The engine serves the image as it is: block 5 stamped as block 6 (at its start, or only in
    its last bytes: a short read) is exactly what an engine reading the wrong offset would return."""
    fd = os.open(image, os.O_WRONLY)
    try:
        if at == "head":
            os.pwrite(fd, (6).to_bytes(8, "little"), 5 * many_disks.BLOCK)
        else:
            os.pwrite(fd, (~6 & (2**64 - 1)).to_bytes(8, "little"), 6 * many_disks.BLOCK - 8)
    finally:
        os.close(fd)
    with pytest.raises(SystemExit, match=r"data mismatch: block read, block asked \(\d+, 5\)"):
        _row(local_transport, image, native)
