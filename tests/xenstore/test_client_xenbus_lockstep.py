"""Over a xenbus character device the client keeps one request in flight (Linux's /dev/xen/xenbus
sends a queued request's body from the file's single message buffer, which the next write()
overwrites: pipelining corrupts requests; seen in the real-Xen lane, scenario 14).

The device is stood in for by a raw pty: its slave is a character device, so the client picks its
xenbus transport, and a peer on the master side answers READ and WRITE and records whether a
second request arrived before the first one's reply was sent."""

from __future__ import annotations

import os
import select
import struct
import threading
import tty
from collections.abc import Iterator

import pytest

from xenblockctl.xenstore.client import XenStore

#: Every test runs over both links: threaded (pyxs reader) and synchronous (the block script's).
pytestmark = pytest.mark.usefixtures("link")

HEADER = struct.Struct("=IIII")
READ, WRITE, TRANSACTION_START, TRANSACTION_END = 2, 11, 6, 7


class FakeXenbusDevice:
    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # binary-clean: no echo, no line discipline
        self.path = os.ttyname(self.slave)
        self.overlaps = 0
        self.requests = 0  # reads and writes
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read_exact(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if self.stop.is_set():
                return None
            if ready:
                data += os.read(self.master, size - len(data))
        return data

    def _serve(self) -> None:
        while not self.stop.is_set():
            header = self._read_exact(HEADER.size)
            if header is None:
                return
            op, req_id, tx_id, size = HEADER.unpack(header)
            payload = self._read_exact(size) if size else b""
            if payload is None:
                return
            self.requests += op in (READ, WRITE)
            # Hold the reply a moment: a pipelining client sends its next request meanwhile.
            early, _, _ = select.select([self.master], [], [], 0.05)
            if early:
                self.overlaps += 1
            if op == READ:
                body = b"value of " + payload.rstrip(b"\0")
            elif op == TRANSACTION_START:
                body = b"7\0"
            elif op in (WRITE, TRANSACTION_END):
                body = b"OK\0"
            else:
                body = b"EINVAL\0"
                op = 16
            os.write(self.master, HEADER.pack(op, req_id, tx_id, len(body)) + body)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def device() -> Iterator[FakeXenbusDevice]:
    dev = FakeXenbusDevice()
    yield dev
    dev.close()


def test_character_device_endpoint_is_xenbus_and_never_pipelines(device: FakeXenbusDevice, link: str) -> None:
    paths = [f"/local/domain/0/data/k{i}" for i in range(12)]
    with XenStore.connect(device.path, timeout=5) as store:
        assert store.endpoint.kind == "xenbus"
        assert store.read_many(paths) == [f"value of {p}" for p in paths]
        store.write_many(dict.fromkeys(paths, "v"))
        if link == "threaded":  # only the threaded link may be shared between threads
            # Two threads sharing the connection must not interleave requests either.
            threads = [threading.Thread(target=store.read_many, args=(paths,)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
    assert device.requests == 12 * (4 if link == "threaded" else 2)
    assert device.overlaps == 0, f"{device.overlaps} requests were sent before the previous reply"
