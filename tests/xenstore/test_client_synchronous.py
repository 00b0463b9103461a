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


BATCH_CLIENT = """
import sys
sys.path.insert(0, sys.argv[1])
from xenblockctl.xenstore.client import XenStore
paths = [f"/batch/n{i}" for i in range(256)]
with XenStore.connect(timeout=5, synchronous=True) as store:
    for start in range(0, 256, 64):
        store.write_many({p: "v" * (i % 9) for i, p in enumerate(paths) if start <= i < start + 64})
    print("MARK", flush=True)
    assert store.read_many(paths) == ["v" * (i % 9) for i in range(256)]
    print("MARK", flush=True)
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_batch_of_replies_is_read_in_a_few_reads_without_polling(daemon: Daemon, tmp_path: Path) -> None:
    """256 replies: the kernel holds the read until at least a header per outstanding reply is
    there (SO_RCVLOWAT), so a handful of reads and no poll/select; before, every wake-up (one per
    reply or few, as the daemon wrote them) cost select + the socket timeout's poll + recv, ~50
    of each per batch of this size (bench/README.md, issue 18 round 5)."""
    trace = tmp_path / "trace"
    result = subprocess.run(
        [
            "strace",
            "-f",
            "-o",
            str(trace),
            "-e",
            "trace=network,poll,ppoll,select,pselect6,write",
            sys.executable,
            "-c",
            BATCH_CLIENT,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    calls = trace.read_text().splitlines()
    marks = [i for i, c in enumerate(calls) if "MARK" in c]
    assert len(marks) == 2, calls
    between = [c.split(None, 1)[-1] for c in calls[marks[0] + 1 : marks[1]]]
    reads = [c for c in between if c.startswith(("recvfrom", "recvmsg", "read("))]
    waits = [c for c in between if c.startswith(("poll", "ppoll", "select", "pselect6"))]
    sends = [c for c in between if c.startswith(("sendto", "sendmsg"))]
    assert len(sends) == 1, sends
    assert not waits, waits
    # 256 replies of 17-24 bytes: each read takes at least 16 bytes per outstanding reply, so
    # the outstanding count falls by about two thirds per read (plus reads cut by the 50 ms check)
    assert 1 <= len(reads) <= 12, reads
