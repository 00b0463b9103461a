"""Round trips of one file add, seen from the kernel's side (strace of the script's sends): two
pairs of requests that used to wait for each other go in one batch (bench/README.md, issue 18
round 6: where the serial add waits): our home with the backend's nodes, and the hand-off's
watches with its first check's reads (the daemon handles a connection's requests in order, so
the reads see every change the watches do not report)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.blockscript import handoff
from xenblockctl.xenstore import wire
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vbd import BackendPath

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


def _traced(libxl: Libxl, action: str, be: Backend, trace: Path) -> list[list[int]]:
    """Run the script's `action` for `be` under strace: the request types of each of its sends."""
    result = subprocess.run(
        [*STRACE, "-o", str(trace), *libxl.argv(action)],
        env=libxl.env(action, be),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    sends = _sends(trace)
    assert sends, trace.read_text()[:2000]
    return sends


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_home_and_config_in_one_send_and_the_first_check_with_the_watches(
    libxl: Libxl, make_image: ImageFactory, tmp_path: Path
) -> None:
    be = libxl.create_backend(5, 51712, str(make_image()), "w")
    consumer = libxl.engine_consumer(be)
    sends = _traced(libxl, "add", be, tmp_path / "strace.txt")
    consumer.wait_opened()
    consumer.release()
    first = sends[0]
    assert first[0] == wire.GET_DOMAIN_PATH, sends
    assert len(first) > 1, sends
    assert first[1:] == [wire.READ] * (len(first) - 1), sends
    watches = [ops for ops in sends if wire.WATCH in ops]
    assert len(watches) == 1, sends
    assert watches[0] == [wire.WATCH, wire.WATCH, wire.READ, wire.READ, wire.READ, wire.READ], sends
    # The hand-off's unwatches ride with the start of the transaction that marks it connected
    # (issue 18, session 14): nothing waits for their reply alone.
    unwatches = [ops for ops in sends if wire.UNWATCH in ops]
    assert unwatches == [[wire.UNWATCH, wire.UNWATCH, wire.TRANSACTION_START]], sends
    assert len(sends) <= 9, sends  # GDP+R, TS, publish, TE, WATCH+R, [R], UNWATCH+TS, mark, TE


def test_the_watches_initial_events_do_not_cost_a_check(
    libxl: Libxl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine opens the device 50 ms into the hand-off: the script reads once with its
    watches, then once after the `opened` event, and not in between for the events xenstored
    fires when a watch is set (before: three reads, the first two alike). The re-check without an
    event (ENGINE_POLL) is pushed out of the way."""
    monkeypatch.setattr(handoff, "ENGINE_POLL", 10.0)
    be = libxl.create_backend(5, 51712, "/srv/disk.img", "w")
    path = BackendPath.parse(be.relative)
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10, synchronous=True) as store:
        home = store.home()
        reads = 0
        read_many = store.read_many

        def counting(paths: list[str]) -> list[str | None]:
            nonlocal reads
            reads += 1
            return read_many(paths)

        monkeypatch.setattr(store, "read_many", counting)
        opener = threading.Timer(0.05, lambda: libxl.store.write(be.node("opened"), "1"))
        opener.start()
        try:
            consumer = handoff.wait_for_consumer(
                store,
                home=home,
                backend=store.absolute(be.relative),
                path=path,
                physical_device="7:0",
                timeout=10,
                bus=str(libxl.sysfs_bus),
            )
        finally:
            opener.join()
    assert consumer is handoff.Consumer.ENGINE
    assert reads == 1, reads


class _CountingReads:
    """The hand-off's store with its reads counted (the real store underneath)."""

    def __init__(self, store: XenStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        read_many = store.read_many

        def counting(paths: list[str]) -> list[str | None]:
            self.reads += 1
            return read_many(paths)

        monkeypatch.setattr(store, "read_many", counting)


def _kernel_handoff(libxl: Libxl, be: Backend, store: XenStore) -> handoff.Consumer:
    path = BackendPath.parse(be.relative)
    return handoff.wait_for_consumer(
        store,
        home=store.home(),
        backend=store.absolute(be.relative),
        path=path,
        physical_device="7:0",
        timeout=5,
        bus=str(libxl.sysfs_bus),
    )


def _blkback_dir(libxl: Libxl, be: Backend) -> Path:
    """As xenbus probing leaves it before libxl runs the script: the directory, no physical_device."""
    d = Path(handoff.blkback_dir(BackendPath.parse(be.relative), str(libxl.sysfs_bus)))
    d.mkdir(parents=True)
    return d


def test_the_kernel_path_polls_sysfs_without_reading_the_store(
    libxl: Libxl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernel blkback opens the device 100 ms into the hand-off: its sysfs attribute is polled
    (every 0.2 ms at first); the store is read only with the watches, not again at each poll
    (before: a round trip per poll, 19 more in these 100 ms; bench/README.md, issue 18, poll20).
    The re-read without an event (ENGINE_POLL) is pushed out of the way."""
    monkeypatch.setattr(handoff, "ENGINE_POLL", 10.0)
    be = libxl.create_backend(5, 51712, "/srv/disk.img", "w", engine=False)
    d = _blkback_dir(libxl, be)
    opener = threading.Timer(0.1, lambda: (d / "physical_device").write_text("7:0\n"))
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10, synchronous=True) as store:
        counted = _CountingReads(store, monkeypatch)
        opener.start()
        try:
            consumer = _kernel_handoff(libxl, be, store)
        finally:
            opener.join()
    assert consumer is handoff.Consumer.KERNEL
    assert counted.reads == 0, counted.reads


def test_the_kernel_path_reads_the_store_again_on_an_event(
    libxl: Libxl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While sysfs is polled, a backend that starts closing (its watch fires) still ends the
    hand-off at once, not at the next re-read without an event (pushed out to 10 s here): one
    read after the watches' batch, on the event (before: 18 in these 100 ms)."""
    monkeypatch.setattr(handoff, "ENGINE_POLL", 10.0)
    be = libxl.create_backend(5, 51712, "/srv/disk.img", "w", engine=False)
    _blkback_dir(libxl, be)
    closer = threading.Timer(0.1, lambda: libxl.store.write(be.node("state"), "5"))
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10, synchronous=True) as store:
        counted = _CountingReads(store, monkeypatch)
        closer.start()
        try:
            with pytest.raises(handoff.HandoffError, match="backend is closing"):
                _kernel_handoff(libxl, be, store)
        finally:
            closer.join()
    assert counted.reads == 1, counted.reads


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_remove_reads_the_record_with_our_home_and_again_only_in_the_withdrawal(
    libxl: Libxl, make_image: ImageFactory, tmp_path: Path
) -> None:
    """A loop's remove makes 4 round trips, as the floor script does: our home and the owner
    record (relative: the daemon resolves it against our home), as add's first send is; then the
    withdrawal's transaction, whose batch reads the record again with the removals. The re-read
    under the device lock was a fifth (bench/README.md, issue 18, session 14)."""
    be = libxl.create_backend(5, 51712, str(make_image()), "w")
    consumer = libxl.engine_consumer(be)
    added = libxl.run("add", be)
    assert added.returncode == 0, added.stderr
    consumer.wait_opened()
    consumer.release()
    libxl.store.write(be.node("state"), "6")
    assert libxl.nodes(be)["xenblockctl-owner"].startswith("v1 kind=loop ")
    sends = _traced(libxl, "remove", be, tmp_path / "strace.txt")
    removals = [wire.RM] * 5  # identity.PUBLISHED
    assert sends == [
        [wire.GET_DOMAIN_PATH, wire.READ],
        [wire.TRANSACTION_START],
        [wire.READ, *removals],
        [wire.TRANSACTION_END],
    ], sends
    assert "xenblockctl-owner" not in libxl.nodes(be)
