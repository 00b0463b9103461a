"""The Xen lane's pvgrub phase stamper (tests/xen/scenarios/phase_stamp.py), run on the host against
the embedded xenstored: it stamps exactly the nodes pvgrub.sh's phase split reads, in the order they
were written, with the values they had, in the shell stamper's line format."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.xenstore import EmbeddedXenstored
from xenblockctl.xenstore.client import XenStore

STAMPER = Path(__file__).parent / "scenarios" / "phase_stamp.py"


def _lines(path: Path, count: int) -> list[list[str]]:
    deadline = time.monotonic() + 20
    while True:
        lines = [line.split() for line in path.read_text().splitlines()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_stamps_the_boot_nodes_in_order_with_their_values(
    xenstored: EmbeddedXenstored, tmp_path: Path
) -> None:
    out = tmp_path / "phases.log"
    # our own pid stands in for the engine's: its CPU column must be a number
    argv = [sys.executable, str(STAMPER), str(out), str(os.getpid())]
    proc = subprocess.Popen(argv, env={**os.environ, **xenstored.env}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not Path(f"{out}.ready").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the stamper never set its watch"
            time.sleep(0.05)
        be = "/local/domain/0/backend/vbd/7/51712"
        writes = [
            (f"{be}/state", "1", ["be", "1"]),
            (f"{be}/params", "/img", None),  # not a node of the split
            (f"{be}/state", "2", ["be", "2"]),
            ("/local/domain/7/device/vbd/51712/state", "1", ["fe", "1"]),
            (f"{be}/physical-device", "7:0", ["pdev", "7:0"]),
            (f"{be}/hotplug-status", "connected", ["hotplug", "connected"]),
            ("/local/domain/7/device/vbd/51760/state", "3", None),  # another disk
            ("/local/domain/7/device/vbd/51712/state", "3", ["fe", "3"]),
            (f"{be}/state", "4", ["be", "4"]),
            ("/local/domain/7/data/other", "x", None),
            ("/local/domain/7/data/xenci-phase", "connected", ["phase", "connected"]),
            (f"{be}/hotplug-status", None, ["hotplug", "gone"]),  # removed
        ]
        want: list[list[str]] = []
        with XenStore.connect(xenstored.socket_path) as store:
            for path, value, stamped in writes:
                if value is None:
                    store.rm(path)
                else:
                    store.write(path, value)
                if stamped is not None:
                    # the next write waits for this one's stamp: the value read after an event is
                    # the node's value then, which a quicker next write would already have replaced
                    want.append(stamped)
                    assert len(_lines(out, len(want))) == len(want), f"no stamp for {path}"
        lines = _lines(out, len(want))
    finally:
        proc.kill()
        proc.wait()
    # only the split's nodes, in order, with their values; the unstamped writes left no line
    assert [line[1:3] for line in lines] == want
    stamps = [float(line[0]) for line in lines]
    assert stamps == sorted(stamps)
    for line in lines:
        assert len(line) == 7, line
        assert all(v.isdigit() for v in line[3:]), line
