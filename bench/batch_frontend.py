"""A benchmark blkfront whose cost per request is far below the engine's (issue 20).

LocalFrontend's `submit_read` + `collect` cost 3.5-3.8 µs of Python per request, more than the
engine's whole native pass (~1.6 µs at 4 KiB): a ring_throughput ratio measured with it measured
the frontend. A real blkfront is kernel C. This one does per *batch* what that one does per
request, on the same LocalFrontend (memfd pages, ring, event channel, registration) and the same
engine and transport:

- every request of a workload is built once, before timing, as the bytes of its ring slot:
  `count` of them (ids 1..count), request k always into buffer k % QD. A buffer is a fixed set of
  pages taken out of the frontend's pool (LocalFrontend.reserve_pages): with persistent grants
  exactly the pages the engine's grant cache keeps mapped, as Linux blkfront reuses its pool. An
  indirect request's descriptor page belongs to its buffer and is written once.
- submitting n requests is one or two copies into the ring (FrontRing.put_request_slots) and one
  push; the n answers published are taken as one copy of their slots (take_response_slots) and
  checked with one `==` against the slots expected: the engine answers in ring order (ring.py),
  so slot k must hold (id k, READ, RSP_OKAY) and then the rest of request k's image (an answer
  writes its own bytes only). Any difference is decoded and reported, and ends the run.
- the data is compared with the file before timing (one round of QD requests, every buffer) and
  after it (the buffers of the last QD requests), so the timed reads land in the right pages.

`requests.run()`'s CPU time is the frontend's cost, reported next to the engine's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import PAGE_SIZE, IndirectRequest, Response
from xenblockctl.backend.frontend import LocalFrontend

#: requests prebuilt per workload (rounded up to a multiple of the ring size and the QD)
DEFAULT_COUNT = 8192


class BatchFrontend:
    """QD reads of `block` bytes kept outstanding on one LocalFrontend's ring, batch by batch."""

    def __init__(
        self,
        fe: LocalFrontend,
        block: int,
        qd: int,
        offsets: Sequence[int],
        *,
        count: int = DEFAULT_COUNT,
    ) -> None:
        ring = fe.ring
        if not 0 < qd <= ring.size:
            raise ValueError(f"queue depth {qd} does not fit a ring of {ring.size} slots")
        if block <= 0 or block % PAGE_SIZE:
            raise ValueError("block must be a positive multiple of the page size")
        self.fe = fe
        self.ring = ring
        self.block = block
        self.qd = qd
        # a multiple of the ring size: a batch wraps the prebuilt list only where it wraps the ring
        step = math.lcm(ring.size, qd)
        self.count = -(-count // step) * step
        pages = block // PAGE_SIZE
        self.buffers = [fe.reserve_pages(pages) for _ in range(qd)]
        abi = fe.abi
        indirect: list[tuple[int, ...]] = []
        if pages > blkif.MAX_SEGMENTS_PER_REQUEST:
            n_ind = blkif.indirect_pages_needed(pages)
            for buf in self.buffers:
                refs = fe.reserve_pages(n_ind, indirect=True)
                raw = blkif.whole_page_descriptors(buf)
                for i, ref in enumerate(refs):
                    chunk = raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                    fe.page(ref)[: len(chunk)] = chunk
                indirect.append(tuple(refs) + (0,) * (blkif.MAX_INDIRECT_PAGES_PER_REQUEST - n_ind))
        e = self.entry = abi.entry_size
        images = bytearray(self.count * e)
        self.offsets = [offsets[k % len(offsets)] for k in range(self.count)]
        for k, off in enumerate(self.offsets):
            j, rid, sector = k % qd, k + 1, off // blkif.SECTOR_SIZE
            if indirect:
                req = IndirectRequest(blkif.OP_READ, pages, rid, sector, 0, indirect[j])
                images[k * e : (k + 1) * e] = abi.encode_request(req)
            else:
                segs = [(ref, 0, blkif.SECTORS_PER_PAGE - 1) for ref in self.buffers[j]]
                abi.pack_segment_request_into(images, k * e, blkif.OP_READ, rid, sector, segments=segs)
        expected = bytearray(images)
        for k in range(self.count):
            abi.response_struct.pack_into(expected, k * e, k + 1, blkif.OP_READ, blkif.RSP_OKAY)
        self.images = memoryview(bytes(images))
        self.expected = bytes(expected)  # bytes: == is a memcmp (a memoryview compares item by item)
        self.submitted = 0
        self.completed = 0

    # -- the batch path ---------------------------------------------------------------------------
    def _submit(self, n: int) -> None:
        e, k = self.entry, self.submitted % self.count
        head = min(n, self.count - k)
        self.ring.put_request_slots(self.images[k * e : (k + head) * e], head)
        if head < n:
            self.ring.put_request_slots(self.images[: (n - head) * e], n - head)
        self.submitted += n

    def _harvest(self) -> int:
        data, n = self.ring.take_response_slots()
        if n:
            e, k = self.entry, self.completed % self.count
            head = min(n, self.count - k)
            want = self.expected[k * e : (k + head) * e]
            if data[: head * e] != want or (head < n and data[head * e :] != self.expected[: (n - head) * e]):
                self._mismatch(data, n)
            self.completed += n
        return n

    def _mismatch(self, data: bytes, n: int) -> None:
        abi, e = self.fe.abi, self.entry
        for i in range(n):
            k = self.completed + i
            got = Response(*abi.response_struct.unpack_from(data, i * e))
            if got != Response(k % self.count + 1, blkif.OP_READ, blkif.RSP_OKAY):
                raise SystemExit(f"request {k % self.count + 1}: got {got}")
        raise SystemExit("a response slot holds bytes its response does not explain")

    def _wait(self, deadline: float) -> None:
        """Until some answer is published (rsp_event armed first: no lost wake-up)."""
        while not self.ring.final_check_for_responses():
            if time.monotonic() > deadline:
                raise SystemExit(f"no answer in time ({self.submitted - self.completed} outstanding)")
            self.fe.evtchn.wait(1.0)

    def run(self, seconds: float) -> tuple[int, float, float]:
        """Keep QD reads outstanding for `seconds`: (completed, elapsed s, this thread's CPU s).
        Every request is answered before it returns (the last ones outside the timing)."""
        fe, qd = self.fe, self.qd
        self._submit(qd - (self.submitted - self.completed))
        fe.kick()
        completed0 = self.completed
        cpu0 = time.thread_time()
        start = time.perf_counter()
        end = start + seconds
        harvest, submit, kick, wait = self._harvest, self._submit, fe.kick, self._wait
        while True:
            n = harvest()
            if not n:
                wait(time.monotonic() + 30)
                continue
            if time.perf_counter() >= end:
                break
            submit(n)
            kick()
        elapsed = time.perf_counter() - start
        cpu = time.thread_time() - cpu0
        done = self.completed - completed0
        self.drain()
        return done, elapsed, cpu

    def drain(self) -> None:
        deadline = time.monotonic() + 30
        while self.completed < self.submitted:
            if not self._harvest():
                self._wait(deadline)

    # -- data checks --------------------------------------------------------------------------------
    def verify(self, fd: int) -> None:
        """The buffers of the last QD answered requests hold the file's bytes at their offsets."""
        for k in range(max(0, self.completed - self.qd), self.completed):
            off = self.offsets[k % self.count]
            got = b"".join(bytes(self.fe.page(ref)) for ref in self.buffers[k % self.qd])
            if got != os.pread(fd, self.block, off):
                raise SystemExit(f"request {k % self.count + 1}: wrong data for offset {off}")

    def warm_and_verify(self, fd: int) -> None:
        """One round of QD requests, answered and checked, before any timing."""
        self._submit(self.qd)
        self.fe.kick()
        self.drain()
        self.verify(fd)


__all__ = ["DEFAULT_COUNT", "BatchFrontend"]
