"""Speak to the C xenstored as an unprivileged guest, through its real ring code.

Every socket connection to the C daemon is privileged (xenstore-for-tests.md §3), so a test that
must see what a *guest* may do needs a domain connection: a shared ring page plus an event
channel. With `$XSSTUB_RING_DIR` set, tests/support/xsstub.c maps `<dir>/ring-<domid>` as the
guest's ring (MAP_SHARED) and polls the FIFO `<dir>/evtchn` as its event channel. `RingClient`
maps the same file, and after INTRODUCE (sent by dom0 over the socket) it writes requests into the
ring and pokes the FIFO. Replies are polled (the daemon's "notify" goes nowhere).

The interface mirrors `tests.fixtures.xenstore.RawClient.call` so a test can hold either.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from pathlib import Path

from tests.fixtures.xenstore import WATCH_EVENT, Msg

RING_SIZE = 1024  # XENSTORE_RING_SIZE (xs_wire.h)
_REQ, _RSP = 0, RING_SIZE
_IDX = struct.Struct("<IIII")  # req_cons, req_prod, rsp_cons, rsp_prod
_IDX_OFFSET = 2 * RING_SIZE
_HEADER = struct.Struct("<IIII")
PAGE = 4096


def ring_path(ring_dir: Path, domid: int) -> Path:
    return ring_dir / f"ring-{domid}"


def prepare_ring(ring_dir: Path, domid: int) -> Path:
    """Create the zeroed page before INTRODUCE, so daemon and test map the same file."""
    path = ring_path(ring_dir, domid)
    with open(path, "wb") as f:
        f.truncate(PAGE)
    return path


class RingClient:
    def __init__(self, ring_dir: Path, domid: int, timeout: float = 5.0) -> None:
        self.domid = domid
        self.timeout = timeout
        self._fd = os.open(ring_path(ring_dir, domid), os.O_RDWR)
        self._page = mmap.mmap(self._fd, PAGE, mmap.MAP_SHARED)
        self._wake = os.open(ring_dir / "evtchn", os.O_WRONLY | os.O_NONBLOCK)
        self._req_id = 0
        self._buf = b""
        self.events: list[Msg] = []

    def close(self) -> None:
        self._page.close()
        os.close(self._fd)
        os.close(self._wake)

    def __enter__(self) -> RingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _indexes(self) -> tuple[int, int, int, int]:
        req_cons, req_prod, rsp_cons, rsp_prod = _IDX.unpack_from(self._page, _IDX_OFFSET)
        return req_cons, req_prod, rsp_cons, rsp_prod

    def _poke(self) -> None:
        # BlockingIOError: the FIFO is full of wake-ups already, so the daemon will look anyway.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake, b"!")

    def _send_bytes(self, data: bytes) -> None:
        deadline = time.monotonic() + self.timeout
        while data:
            req_cons, req_prod, _, _ = self._indexes()
            space = RING_SIZE - (req_prod - req_cons) % (1 << 32)
            chunk = data[: min(space, RING_SIZE - req_prod % RING_SIZE)]
            if chunk:
                start = _REQ + req_prod % RING_SIZE
                self._page[start : start + len(chunk)] = chunk
                # The producer index moves only after the bytes are in place (x86: stores stay
                # in order), as a guest's xenbus driver does with its write barrier.
                struct.pack_into("<I", self._page, _IDX_OFFSET + 4, (req_prod + len(chunk)) % (1 << 32))
                data = data[len(chunk) :]
            self._poke()
            if data:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dom{self.domid}: request ring stayed full")
                time.sleep(0.001)

    def _recv_bytes(self, want: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        while len(self._buf) < want:
            _, _, rsp_cons, rsp_prod = self._indexes()
            avail = (rsp_prod - rsp_cons) % (1 << 32)
            if avail:
                start = rsp_cons % RING_SIZE
                n = min(avail, RING_SIZE - start)
                self._buf += bytes(self._page[_RSP + start : _RSP + start + n])
                struct.pack_into("<I", self._page, _IDX_OFFSET + 8, (rsp_cons + n) % (1 << 32))
                self._poke()  # room in the response ring: let the daemon write the rest
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"dom{self.domid}: no reply within {self.timeout} s")
            time.sleep(0.001)
        out, self._buf = self._buf[:want], self._buf[want:]
        return out

    def recv_msg(self) -> Msg:
        msg_type, req_id, tx_id, length = _HEADER.unpack(self._recv_bytes(_HEADER.size))
        return Msg(msg_type, req_id, tx_id, self._recv_bytes(length))

    def call(self, msg_type: int, *args: bytes, tx_id: int = 0, raw: bytes | None = None) -> Msg:
        """Send `args` NUL-terminated (or exactly `raw`) and return the reply (events seen
        meanwhile go to `events`)."""
        payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
        self._req_id += 1
        self._send_bytes(_HEADER.pack(msg_type, self._req_id, tx_id, len(payload)) + payload)
        while True:
            msg = self.recv_msg()
            if msg.type == WATCH_EVENT:
                self.events.append(msg)
                continue
            assert msg.req_id == self._req_id, (msg, self._req_id)
            return msg
