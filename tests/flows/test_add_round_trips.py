"""Round trips of one file add, seen from the kernel's side (strace of the script's sends): two
pairs of requests that used to wait for each other go in one batch (bench/README.md, issue 18
round 6: where the serial add waits): our home with the backend's nodes, and the hand-off's
watches with its first check's reads (the daemon handles a connection's requests in order, so
the reads see every change the watches do not report)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Libxl
from xenblockctl.xenstore import wire

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]

STRACE = ("strace", "-f", "-xx", "-s", "65536", "-e", "trace=sendto")
SEND = re.compile(r'^\d+ +sendto\(\d+, "((?:\\x[0-9a-f]{2})*)"')


def _sends(trace: Path) -> list[list[int]]:
    """The request types of each send of the script, in order."""
    batches = []
    for line in trace.read_text().splitlines():
        m = SEND.match(line)
        if m is None:
            continue
        data = bytes.fromhex(m.group(1).replace("\\x", ""))
        ops, offset = [], 0
        while offset + wire.HEADER_SIZE <= len(data):
            op, _rq, _tx, length = wire.HEADER.unpack_from(data, offset)
            ops.append(op)
            offset += wire.HEADER_SIZE + length
        batches.append(ops)
    return batches


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_home_and_config_in_one_send_and_the_first_check_with_the_watches(
    libxl: Libxl, make_image: ImageFactory, tmp_path: Path
) -> None:
    be = libxl.create_backend(5, 51712, str(make_image()), "w")
    consumer = libxl.engine_consumer(be)
    trace = tmp_path / "strace.txt"
    result = subprocess.run(
        [*STRACE, "-o", str(trace), *libxl.argv("add")],
        env=libxl.env("add", be),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    consumer.release()
    sends = _sends(trace)
    assert sends, trace.read_text()[:2000]
    first = sends[0]
    assert first[0] == wire.GET_DOMAIN_PATH, sends
    assert len(first) > 1, sends
    assert first[1:] == [wire.READ] * (len(first) - 1), sends
    watches = [ops for ops in sends if wire.WATCH in ops]
    assert len(watches) == 1, sends
    assert watches[0] == [wire.WATCH, wire.WATCH, wire.READ, wire.READ, wire.READ, wire.READ], sends
