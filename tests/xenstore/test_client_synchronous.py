"""The synchronous link (what the block script uses) keeps its promises, seen from the kernel's
side with strace: a batch of requests leaves in one send(), replies are read by the calling thread
(no thread is ever started), and nothing of pyxs, socket or threading is imported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cxenstored import Daemon

ROOT = Path(__file__).resolve().parents[2]
STRACE = ["strace", "-f", "-e", "trace=clone,clone3,sendto,sendmsg,write"]
CLIENT = """
import sys
sys.path.insert(0, sys.argv[1])
from xenblockctl.xenstore.client import XenStore
with XenStore.connect(timeout=5, synchronous=True) as store:
    store.write_many({f"/sync/n{i}": str(i) for i in range(6)})
    print("MARK", flush=True)
    assert store.read_many([f"/sync/n{i}" for i in range(6)]) == [str(i) for i in range(6)]
    print("MARK", flush=True)
    store.watch("/sync", "tok")
    assert store.wait_watch(5) == ("/sync", "tok")
    store.unwatch("/sync", "tok")
loaded = [m for m in ("socket", "threading", "queue", "pyxs", "platform") if m in sys.modules]
print("LOADED", loaded, flush=True)
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_one_send_per_batch_and_no_thread(daemon: Daemon, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    result = subprocess.run(
        [
            "strace",
            "-f",
            "-o",
            str(trace),
            "-e",
            "trace=clone,clone3,sendto,sendmsg,write",
            sys.executable,
            "-c",
            CLIENT,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
    calls = trace.read_text().splitlines()
    assert not [c for c in calls if "clone" in c], "the synchronous link must not start a thread"
    # The socket's sends between the two MARK lines (stdout writes): the read_many batch of 6 READs.
    # (send() on a socket is the sendto syscall; the threaded link made 12 sends: header, payload.)
    marks = [i for i, c in enumerate(calls) if "MARK" in c]
    assert len(marks) == 2, calls
    between = [
        c for c in calls[marks[0] + 1 : marks[1]] if c.split(None, 1)[-1].startswith(("sendto", "sendmsg"))
    ]
    assert len(between) == 1, f"6 reads must leave in one send, saw {between}"
