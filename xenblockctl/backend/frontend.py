"""A Python blkfront over the local transport, for tests, benchmarks and `xenblockctl sandbox`.

It owns a sealed memfd of grant pages: the first pages hold the ring, then a pool of data pages,
then indirect-descriptor pages. It registers the memfd with the engine's LocalTransport, which
places it in its domain's one grant-ref space (page N is grant ref `gref_base` + N: 0 for a
domain's first disk, so several disks of one domain never share a ref), and allocates one event
channel port (unique in the domain). `xenstore_nodes()` gives what it would publish under its
device directory (`ring-ref*`, `event-channel`, `protocol`, `ring-page-order`,
`feature-persistent`); `multi_queue_nodes()` the same for a disk of several queues (one
LocalFrontend each). Every ref this class takes or hands out is a grant ref.

Grant refs are fixed pages of the memfd, so this frontend always reuses one pool of granted pages.
With `persistent=True` it says so (`feature-persistent` = 1) and hands out the most recently
freed pages first, as Linux blkfront does with grants the backend keeps mapped, so a backend's
bounded grant cache sees a small working set; without it, pages go round the whole pool (oldest
free first). `regrant()` re-registers every ref onto new memory, as a guest whose grants were all
ended and granted again to other pages would look.

Well-behaved use: `read()`, `write()`, `flush()`, `discard()` (synchronous), or `submit_*()` plus
`collect()` for queue depth > 1. Hostile use: `ring` (a FrontRing with `put_request_bytes`,
`poke_index`), `page()` to scribble on any page, and `kick()` to notify.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import (
    Abi,
    DiscardRequest,
    IndirectRequest,
    Request,
    Response,
    SegmentRequest,
)
from xenblockctl.backend.ring import FrontRing
from xenblockctl.backend.transport.base import GrantMapping
from xenblockctl.backend.transport.local import (
    LocalDomainClient,
    LocalEventChannel,
    create_grant_memfd,
    map_memfd_pages,
)
from xenblockctl.errors import XenblockError


class FrontendError(XenblockError):
    code = "frontend"


@dataclass(slots=True)
class _Pending:
    operation: int
    pages: list[int]
    indirect: list[int]
    read_len: int  # bytes to gather on completion (READ only)


class Completion(NamedTuple):
    response: Response
    data: bytes  # READ with gather: the bytes read; otherwise b""


class LocalFrontend:
    """One blkfront ring on the local transport."""

    def __init__(
        self,
        socket_path: str,
        domid: int,
        *,
        abi: Abi = blkif.X86_64,
        ring_page_order: int = 0,
        data_pages: int = 64,
        indirect_pages: int = 8,
        scramble_ring_refs: bool = False,
        ring_last: bool = False,
        persistent: bool = False,
    ) -> None:
        self.abi = abi
        self.persistent = persistent
        self.ring_pages = 1 << ring_page_order
        self.ring_page_order = ring_page_order
        total = self.ring_pages + data_pages + indirect_pages
        self._fd = create_grant_memfd(total, f"xbc-frontend-{domid}")
        self._map = mmap.mmap(self._fd, total * blkif.PAGE_SIZE)
        self._view = memoryview(self._map)
        try:
            self.client = LocalDomainClient(socket_path, domid)
        except BaseException:
            self._close_memory()
            raise
        try:
            #: page N of our memfd is grant ref gref_base + N
            self.gref_base = self.client.register_grant_table(self._fd)
            self.evtchn: LocalEventChannel = self.client.alloc_unbound_port()
        except BaseException:
            self.client.close()
            self._close_memory()
            raise
        # Layout: ring, data pool, indirect pool (or with `ring_last`: data, indirect, ring, so that
        # small hostile grefs never name the ring). `scramble_ring_refs` lists the ring pages in
        # reverse order, so the backend must map non-contiguous refs contiguously.
        base = self.gref_base
        ring_base = base + (data_pages + indirect_pages if ring_last else 0)
        pool_base = base + (0 if ring_last else self.ring_pages)
        order = list(range(ring_base, ring_base + self.ring_pages))
        if scramble_ring_refs:
            order.reverse()
        self.ring_refs = tuple(order)
        self._ring_mapping: GrantMapping | None = None
        self._ring_view = self._contiguous_ring_view()
        self.ring = FrontRing(self._ring_view, abi, self.ring_pages)
        self._free_data = list(range(pool_base, pool_base + data_pages))
        self._free_indirect = list(range(pool_base + data_pages, pool_base + data_pages + indirect_pages))
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._retired: list[tuple[int, mmap.mmap, memoryview]] = []  # grant memory before regrant()

    @property
    def memory_fd(self) -> int:
        """The memfd whose page N is grant ref gref_base + N (a native loop that drives this ring
        inherits it)."""
        return self._fd

    def _close_memory(self) -> None:
        self._view.release()
        self._map.close()
        os.close(self._fd)

    def _contiguous_ring_view(self) -> memoryview:
        first = self.ring_refs[0]
        if self.ring_refs == tuple(range(first, first + self.ring_pages)):
            return self.page(first, self.ring_pages)
        # Non-contiguous ring refs: we need our own contiguous view of those pages too.
        self._ring_mapping = map_memfd_pages(self._fd, [ref - self.gref_base for ref in self.ring_refs])
        return self._ring_mapping.buffer

    # -- handshake data --------------------------------------------------------------------------
    def xenstore_nodes(self) -> dict[str, str]:
        """Frontend nodes to publish before switching to Initialised (3)."""
        return self.ring_nodes() | self.shared_nodes()

    def ring_nodes(self) -> dict[str, str]:
        """This ring's own nodes (`ring-ref*`, `event-channel`): top-level for a single queue, under
        `queue-N/` for queue N of several (multi_queue_nodes)."""
        nodes = {"event-channel": str(self.evtchn.local_port)}
        if self.ring_pages == 1:
            nodes["ring-ref"] = str(self.ring_refs[0])
        else:
            for i, ref in enumerate(self.ring_refs):
                nodes[f"ring-ref{i}"] = str(ref)
        return nodes

    def shared_nodes(self) -> dict[str, str]:
        """The nodes every queue of a disk shares, always top-level."""
        nodes = {"protocol": self.abi.protocol, "feature-persistent": "1" if self.persistent else "0"}
        if self.ring_pages != 1:
            nodes["ring-page-order"] = str(self.ring_page_order)
        return nodes

    # -- raw access --------------------------------------------------------------------------------
    def page(self, ref: int, count: int = 1) -> memoryview:
        """Our view of grant ref `ref` (and the `count` - 1 refs after it)."""
        index = ref - self.gref_base
        if not 0 <= index <= index + count <= self.total_pages:
            raise FrontendError(f"grant ref {ref} is not one of this frontend's pages")
        return self._view[index * blkif.PAGE_SIZE : (index + count) * blkif.PAGE_SIZE]

    @property
    def total_pages(self) -> int:
        return self._map.size() // blkif.PAGE_SIZE

    def regrant(self) -> None:
        """Grant every ref again, onto new memory (a new sealed memfd with the same contents).

        Requests made from now on use the new pages; the ring keeps running on the old ones (both
        sides already hold them). A backend that still serves a ref from its old mapping writes
        where this frontend no longer looks: tests use it to catch stale mappings.
        """
        if self._pending:
            raise FrontendError("regrant() with requests in flight")
        total = self.total_pages
        fd = create_grant_memfd(total, "xbc-frontend-regrant")
        new_map = mmap.mmap(fd, total * blkif.PAGE_SIZE)
        new_view = memoryview(new_map)
        new_view[:] = self._view
        try:
            self.client.regrant(self.gref_base, fd)
        except BaseException:
            new_view.release()
            new_map.close()
            os.close(fd)
            raise
        self._retired.append((self._fd, self._map, self._view))
        self._fd, self._map, self._view = fd, new_map, new_view

    def kick(self) -> None:
        """Publish queued requests and notify if the backend asked for it (or always, if forced)."""
        if self.ring.push_requests():
            self.evtchn.notify()

    def wait_event(self, timeout: float) -> bool:
        return self.evtchn.wait(timeout)

    # -- request building --------------------------------------------------------------------------
    def _alloc(self, pool: list[int], n: int) -> list[int]:
        if len(pool) < n:
            raise FrontendError(f"out of frontend pages ({n} wanted, {len(pool)} free)")
        if self.persistent:
            # most recently freed first (freed pages go to the end): the working set stays small
            taken = pool[len(pool) - n :]
            del pool[len(pool) - n :]
        else:
            taken = pool[:n]
            del pool[:n]
        return taken

    def reserve_pages(self, count: int, *, indirect: bool = False) -> list[int]:
        """Take `count` grant refs out of the data (or indirect-descriptor) pool for good: for a
        caller that builds its own request slots (bench/batch_frontend.py) and must never see
        submit_*() hand the same pages out."""
        return self._alloc(self._free_indirect if indirect else self._free_data, count)

    def _new_id(self) -> int:
        rid = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFFFFFFFFFF
        return rid

    def _submit_rw(self, op: int, sector: int, nbytes: int, data: bytes | None) -> int:
        if nbytes <= 0 or nbytes % blkif.SECTOR_SIZE:
            raise FrontendError("I/O size must be a positive multiple of 512")
        if self.ring.free_slots <= 0:
            raise FrontendError("front ring full")
        whole, tail = divmod(nbytes, blkif.PAGE_SIZE)
        pages = self._alloc(self._free_data, whole + (1 if tail else 0))
        # a sub-page tail is the last segment, sectors 0..n-1 of its page
        tail_seg = [(pages[-1], 0, tail // blkif.SECTOR_SIZE - 1)] if tail else []
        if data is not None:
            for i, ref in enumerate(pages):
                chunk = data[i * blkif.PAGE_SIZE : (i + 1) * blkif.PAGE_SIZE]
                self.page(ref)[: len(chunk)] = chunk
        rid = self._new_id()
        indirect: list[int] = []
        if len(pages) <= blkif.MAX_SEGMENTS_PER_REQUEST:
            segs = [(ref, 0, blkif.SECTORS_PER_PAGE - 1) for ref in pages[:whole]] + tail_seg
            self.ring.put_segment_request(op, rid, sector, segs)
        else:
            n_ind = blkif.indirect_pages_needed(len(pages))
            try:
                indirect = self._alloc(self._free_indirect, n_ind)
            except FrontendError:
                self._free_data.extend(pages)
                raise
            raw = blkif.whole_page_descriptors(pages[:whole]) + blkif.pack_descriptors(tail_seg)
            for i, ref in enumerate(indirect):
                chunk = raw[i * blkif.PAGE_SIZE : (i + 1) * blkif.PAGE_SIZE]
                self.page(ref)[: len(chunk)] = chunk
            grefs = tuple(indirect) + (0,) * (blkif.MAX_INDIRECT_PAGES_PER_REQUEST - n_ind)
            self.ring.put_request(IndirectRequest(op, len(pages), rid, sector, 0, grefs))
        self._pending[rid] = _Pending(op, pages, indirect, nbytes if op == blkif.OP_READ else 0)
        return rid

    def submit_read(self, sector: int, nbytes: int) -> int:
        return self._submit_rw(blkif.OP_READ, sector, nbytes, None)

    def submit_write(self, sector: int, data: bytes, *, op: int = blkif.OP_WRITE) -> int:
        return self._submit_rw(op, sector, len(data), data)

    def submit_flush(self) -> int:
        rid = self._new_id()
        req = SegmentRequest(blkif.OP_FLUSH_DISKCACHE, 0, 0, rid, 0, ())
        self._pending[rid] = _Pending(req.operation, [], [], 0)
        self.ring.put_request(req)
        return rid

    def submit_discard(self, sector: int, nr_sectors: int, *, secure: bool = False) -> int:
        rid = self._new_id()
        req = DiscardRequest(blkif.DISCARD_SECURE if secure else 0, 0, rid, sector, nr_sectors)
        self._pending[rid] = _Pending(req.operation, [], [], 0)
        self.ring.put_request(req)
        return rid

    def submit_raw(self, req: Request) -> None:
        """Queue any request as-is (no page bookkeeping; the response is returned by collect())."""
        self._pending[req.id] = _Pending(req.operation, [], [], 0)
        self.ring.put_request(req)

    # -- completions -------------------------------------------------------------------------------
    def collect(self, want: int = 1, timeout: float = 10.0, *, gather: bool = True) -> dict[int, Completion]:
        """Push, then wait until at least `want` responses arrived (or timeout); return them by id.

        `gather=False` leaves read data in the frontend's pages (Completion.data is b""), as a
        real blkfront that DMAs into the page cache would: benchmarks use it.
        """
        self.kick()
        deadline = time.monotonic() + timeout
        out: dict[int, Completion] = {}
        while True:
            for rsp in self.ring.take_responses():
                out[rsp.id] = self._finish(rsp, gather)
            if len(out) >= want:
                return out
            if self.ring.final_check_for_responses():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendError(f"timed out waiting for {want - len(out)} of {want} responses")
            self.evtchn.wait(min(left, 0.5))

    def _finish(self, rsp: Response, gather: bool = True) -> Completion:
        pending = self._pending.pop(rsp.id, None)
        if pending is None:
            raise FrontendError(f"response for unknown id {rsp.id}")
        data = b""
        if gather and pending.read_len and rsp.status == blkif.RSP_OKAY:
            parts = []
            left = pending.read_len
            for ref in pending.pages:
                chunk = min(left, blkif.PAGE_SIZE)
                parts.append(self.page(ref)[:chunk])
                left -= chunk
            data = b"".join(parts)
        self._free_data.extend(pending.pages)
        self._free_indirect.extend(pending.indirect)
        return Completion(rsp, data)

    # -- synchronous helpers -----------------------------------------------------------------------
    def _one(self, rid: int, timeout: float) -> Completion:
        done = self.collect(1, timeout)
        if rid not in done:
            raise FrontendError(f"unexpected response ids {sorted(done)}")
        return done[rid]

    def read(self, sector: int, nbytes: int, timeout: float = 10.0) -> bytes:
        c = self._one(self.submit_read(sector, nbytes), timeout)
        if c.response.status != blkif.RSP_OKAY:
            raise FrontendError(f"read failed with status {c.response.status}")
        return c.data

    def write(self, sector: int, data: bytes, timeout: float = 10.0) -> int:
        """Returns the blkif status."""
        return self._one(self.submit_write(sector, data), timeout).response.status

    def flush(self, timeout: float = 10.0) -> int:
        return self._one(self.submit_flush(), timeout).response.status

    def discard(self, sector: int, nr_sectors: int, timeout: float = 10.0) -> int:
        return self._one(self.submit_discard(sector, nr_sectors), timeout).response.status

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self.ring.release()
        self._ring_view.release()
        if self._ring_mapping is not None:
            self._ring_mapping.unmap()
        self._view.release()
        self._map.close()
        self.evtchn.close()
        self.client.close()
        os.close(self._fd)
        for fd, old_map, old_view in self._retired:
            old_view.release()
            old_map.close()
            os.close(fd)
        self._retired = []

    def __enter__(self) -> LocalFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def multi_queue_nodes(rings: list[LocalFrontend]) -> dict[str, str]:
    """What a blkfront with these rings (queues, same order and ABI) publishes: one ring as
    `xenstore_nodes()`; several as `multi-queue-num-queues` plus `queue-N/ring-ref*` and
    `queue-N/event-channel`, as Linux blkfront does (it writes no num-queues for one queue)."""
    if len(rings) == 1:
        return rings[0].xenstore_nodes()
    nodes = rings[0].shared_nodes() | {"multi-queue-num-queues": str(len(rings))}
    for q, ring in enumerate(rings):
        nodes |= {f"queue-{q}/{name}": value for name, value in ring.ring_nodes().items()}
    return nodes
