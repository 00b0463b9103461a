"""The transport interface the engine and the data plane use: grants in, events both ways.

A transport maps a frontend domain's grant references into our address space and binds to the
frontend's event channel port. Two implementations: `local.LocalTransport` (no Xen) and
`xen.XenTransport` (gntdev + evtchn). Both hand out the same two kinds of objects below.
"""

from __future__ import annotations

import abc
import ctypes
import mmap
import os
import select
from collections.abc import Callable, Sequence
from typing import Final

from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.errors import XenblockError


class TransportError(XenblockError):
    """A transport-level failure (cannot bind, device node missing, peer gone)."""

    code = "transport"


class GrantError(TransportError):
    """A grant reference could not be mapped (bad ref, not granted, out of range).

    For data and indirect pages this turns into a BLKIF_RSP_ERROR for that one request; for the ring
    pages it fails the connection.
    """

    code = "grant-map"


def merge_extents(
    view: memoryview, page_starts: Sequence[int], extents: Sequence[tuple[int, int]]
) -> list[memoryview]:
    """Views of `view` covering [page_starts[i] + offset, ... + length) for each extent i, with
    ranges that continue each other merged. Extents must already be validated to lie in a page."""
    out: list[memoryview] = []
    run_start = run_end = -1
    for start, (offset, length) in zip(page_starts, extents, strict=True):
        lo = start + offset
        if lo != run_end:
            if run_end >= 0:
                out.append(view[run_start:run_end])
            run_start = lo
        run_end = lo + length
    if run_end >= 0:
        out.append(view[run_start:run_end])
    return out


class GrantMapping(abc.ABC):
    """Writable (or read-only) memory backing a list of grant refs, in order.

    `page(i)` is the 4 KiB view of `refs[i]`. `buffer` is one contiguous view of all pages; only
    mappings made with `contiguous=True` (rings) are guaranteed to have it. Views handed out stay
    valid until `unmap()`; callers must release them first (the memory goes away).
    """

    refs: tuple[int, ...]
    writable: bool

    @abc.abstractmethod
    def page(self, index: int) -> memoryview: ...

    @property
    @abc.abstractmethod
    def buffer(self) -> memoryview: ...

    @abc.abstractmethod
    def unmap(self) -> None: ...

    def iovecs(self, extents: Sequence[tuple[int, int]] | None = None) -> list[memoryview]:
        """Buffers for preadv/pwritev: bytes [offset, offset + length) of page i for each extent i
        (None: every page whole), in order.

        Ranges that are adjacent in our address space merge into one buffer, so a 1 MiB request
        over contiguous pages is one iovec instead of 256. The caller releases the views before
        `unmap()`. This default is for mappings whose pages are one contiguous `buffer` (gntdev
        maps every request that way); other layouts override it.
        """
        n = len(self.refs)
        buf = self.buffer
        if extents is None:
            return [buf[: n * PAGE_SIZE]]
        return merge_extents(buf, range(0, n * PAGE_SIZE, PAGE_SIZE), extents)

    def page_location(self, index: int) -> tuple[memoryview, int]:
        """(view, offset) with page `index` at view[offset : offset + PAGE_SIZE].

        The view is read-only for a read-only mapping. Mappings that are slices of one larger
        mapping (local) return that larger view, so a caller holding many one-page mappings
        (backend/grantcache.py) can merge neighbouring pages into one iovec; gntdev mappings are
        each their own mmap and return their own buffer.
        """
        if not 0 <= index < len(self.refs):
            raise IndexError(index)
        return self.buffer, index * PAGE_SIZE

    def __enter__(self) -> GrantMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmap()


class MmapGrantMapping(GrantMapping):
    """A mapping that is one mmap of `len(refs)` pages (gntdev, or a remapped memfd): page views and
    the contiguous buffer are slices of it. Subclasses set `refs`, `writable`, `_map` and `_view`,
    and may release more after the munmap in `_after_munmap()`."""

    _map: mmap.mmap | None
    _view: memoryview | None

    def page(self, index: int) -> memoryview:
        if not 0 <= index < len(self.refs):
            raise IndexError(index)
        return self.buffer[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise GrantError("mapping already unmapped")
        return self._view

    def unmap(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()  # BufferError if a caller still holds a view: a bug we want to see
            self._map = None
            self._after_munmap()

    def _after_munmap(self) -> None:
        """Hook run once, after the memory is unmapped."""


class PersistentGrants(abc.ABC):
    """All of a domain's grantable pages, mapped once and kept for the life of a data plane.

    Only a transport whose grants cannot be revoked or shrunk under us offers this (local: a sealed
    memfd). Per request it costs a bounds check and a slice or two: no map/unmap, no objects. This
    is a transport shortcut, not the blkif `feature-persistent` protocol: when a frontend negotiates
    persistent grants the data plane uses backend/grantcache.py on every transport instead, so
    the cache is tested without Xen.
    """

    @abc.abstractmethod
    def iovecs(
        self, refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, *, writable: bool
    ) -> list[memoryview]:
        """What `map_grants(refs, writable=...).iovecs(extents)` gives; GrantError for a ref that is
        not granted. The caller releases the views before `close()`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Refuse further use."""


# GNTST_* (xen/include/public/grant_table.h): what a grant copy did with one segment.
GNTST_OKAY: Final = 0
GNTST_GENERAL_ERROR: Final = -1
GNTST_BAD_DOMAIN: Final = -2
GNTST_BAD_GNTREF: Final = -3
GNTST_BAD_VIRT_ADDR: Final = -5
GNTST_PERMISSION_DENIED: Final = -8
GNTST_BAD_PAGE: Final = -9
GNTST_BAD_COPY_ARG: Final = -10
GNTST_EAGAIN: Final = -12
_GNTST_NAMES: Final = {
    GNTST_OKAY: "okay",
    GNTST_GENERAL_ERROR: "general error",
    GNTST_BAD_DOMAIN: "bad domain",
    GNTST_BAD_GNTREF: "bad grant ref",
    -4: "bad handle",
    GNTST_BAD_VIRT_ADDR: "bad virtual address",
    -6: "bad device address",
    -7: "no device space",
    GNTST_PERMISSION_DENIED: "permission denied (read-only grant?)",
    GNTST_BAD_PAGE: "bad page",
    GNTST_BAD_COPY_ARG: "copy crosses a page boundary",
    -11: "address size not supported",
    GNTST_EAGAIN: "page paged out, try again",
}


def gntst_name(status: int) -> str:
    """A GNTST_* status for a log line (`status` comes from the hypervisor or the local transport)."""
    return f"{_GNTST_NAMES.get(status, 'unknown status')} ({status})"


class Bounce:
    """Engine-owned, page-aligned memory a request's data passes through when the transport copies
    grants instead of mapping them (`Transport.grant_copy`). Anonymous (no fd), `address` fixed for
    its life: gntdev's copy takes our side as a virtual address, the local transport as `view`."""

    __slots__ = ("_map", "address", "nbytes", "view")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._map: mmap.mmap | None = mmap.mmap(-1, nbytes)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.address: int = ctypes.addressof(anchor)
        del anchor  # the export would keep close() from unmapping
        self.view: memoryview = memoryview(self._map)

    def close(self) -> None:
        """munmap. BufferError while a slice of `view` handed out is still alive (a bug we want)."""
        if self._map is not None:
            self.view.release()
            self._map.close()
            self._map = None


#: one request's pages for a grant copy: (its grant refs, (byte offset in the page, length) of each
#: or None for whole pages, our Bounce). Its segments lie back to back in the Bounce from its start;
#: on the guest's side each lies inside its page (validated), on ours it may cross pages.
CopyItem = tuple[Sequence[int], Sequence[tuple[int, int]] | None, Bounce]


def copy_segments(
    refs: Sequence[int], extents: Sequence[tuple[int, int]] | None, at: int = 0
) -> list[tuple[int, int, int, int]]:
    """A CopyItem's segments spelled out: (ref, offset in its page, length, offset in the Bounce)."""
    if extents is None:
        return [(ref, 0, PAGE_SIZE, at + i * PAGE_SIZE) for i, ref in enumerate(refs)]
    out: list[tuple[int, int, int, int]] = []
    for ref, (offset, length) in zip(refs, extents, strict=True):
        out.append((ref, offset, length, at))
        at += length
    return out


#: how the native grant-copy pass copies (Transport.native_copier): gntdev's fd, or -1 and a copier
NativeCopier = tuple[int, Callable[[memoryview], object] | None]

#: how a native loop waits on, unmasks and notifies an event channel (EventChannel.native_waiter;
#: _grantcopy.c's struct waiter): (kind, fd it reads, our port, fd it notifies, NOTIFY ioctl number)
NativeWaiter = tuple[int, int, int, int, int]
#: its kinds, as _grantcopy.c spells them (WAIT_EVTCHN, WAIT_EVENTFD; a test holds them equal):
#: an evtchn fd (read() gives ports, writing our port unmasks it, NOTIFY is an ioctl on the fd),
#: or the local transport's eventfd pair (read() gives a counter, a write to the peer notifies)
WAIT_EVTCHN: Final = 1
WAIT_EVENTFD: Final = 2


class EventChannel(abc.ABC):
    """Our end of an interdomain event channel.

    Xen semantics: an arriving event is *pending* (and masked) until `ack()` consumes and unmasks it;
    events coalesce. `fileno()` is readable while an event is pending, so several channels and a stop
    pipe can share one poll.
    """

    local_port: int

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def notify(self) -> None:
        """Send an event to the other end."""

    @abc.abstractmethod
    def ack(self) -> bool:
        """Consume pending events without blocking and unmask; True if there was one."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # The blocking wake-up (issue 20): a ring thread that sleeps on this channel alone blocks in
    # one read() that also consumes the event, instead of poll() on it and a stop pipe followed by
    # a read() to consume it: one system call fewer per wake-up of a one-request-at-a-time frontend
    # (pvgrub). A stop reaches the sleeping thread through the channel itself (interrupt()).
    def start_blocking(self) -> bool:
        """Switch this channel to the blocking wake-up if it has one: True if it did. From then on
        one thread waits on it, with take(); ack() and wait() are not for it any more."""
        return False

    def take(self) -> bool:
        """Block until an event or interrupt() and consume it, without unmasking (unmask() does,
        later): True if the other end's event was among it. Only after start_blocking()."""
        raise TransportError("this event channel has no blocking wake-up", code="internal")

    def unmask(self) -> None:
        """Let the next event through after take() returned True."""
        raise TransportError("this event channel has no blocking wake-up", code="internal")

    def interrupt(self) -> None:
        """Make the take() running now, or the next one, return (the stop of the ring thread)."""
        return  # without start_blocking() nothing sleeps in take(): nothing to interrupt

    def native_waiter(self) -> NativeWaiter | None:
        """What a native loop needs to do take(), unmask() and notify() itself on this channel's
        fds (grantcopy.NativeCopy.loop), or None: only after start_blocking(), and the channel
        must outlive the loop (DataPlane closes it after its ring thread ended)."""
        return None

    def wait(self, timeout: float | None) -> bool:
        """Block up to `timeout` seconds (None: forever) for an event; consume it. True if one came."""
        if self.ack():
            return True
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not poller.poll(ms):
            return False
        return self.ack()


class Transport(abc.ABC):
    """Maps a frontend's grants and binds its event channels."""

    #: A frontend's ring grants and event-channel port outlive our process, so a successor engine
    #: can map and bind them again (issue 21). Xen: yes (the hypervisor keeps the grant; closing
    #: our port makes the frontend's unbound-to-us again). Local: no, the registry dies with us.
    rings_outlive_engine: bool = False

    @abc.abstractmethod
    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        """Map `refs` of domain `domid`. `contiguous=True` for rings (one virtually contiguous range)."""

    def map_persistent(self, domid: int) -> PersistentGrants | None:
        """All of `domid`'s grantable pages for a data plane's lifetime, or None: map per request."""
        return None

    #: whether `grant_copy` works here (else the data plane maps each request's pages)
    copies_grants: bool = False

    def grant_copy(self, domid: int, items: Sequence[CopyItem], *, to_guest: bool) -> list[int]:
        """Copy every segment of `items` between `domid`'s granted page and our Bounce, all in one
        call: into the guest's pages if `to_guest` (the answer to a READ), else out of them.
        Returns one GNTST_* status per segment, in order (GNTST_OKAY = 0): a bad segment fails
        alone. Raises GrantError (code grant-map) only when the call as a whole failed."""
        raise GrantError(f"{type(self).__name__} cannot copy grants")

    def native_copier(self, domid: int, bounce: Bounce) -> NativeCopier | None:
        """How the native grant-copy pass (backend/_grantcopy.c) copies `domid`'s grants to and from
        `bounce`: (the gntdev fd, None) to make the ioctl itself; (-1, copier) where the transport
        does the copy (copier(segments) takes the ioctl's array of 24-byte struct
        gntdev_grant_copy_segment and writes each one's status into it); None: it cannot."""
        return None

    @abc.abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        """Bind to the frontend's unbound port `remote_port` (its `event-channel` node)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def export_state(self) -> tuple[dict[str, object], list[int]] | None:
        """What a successor engine needs of this transport to keep the frontends' rings (`backend
        --takeover`), as (meta, fds); None: nothing (Xen: the hypervisor keeps it all)."""
        return None

    def adopt_state(self, meta: dict[str, object], fds: list[int]) -> None:
        """Take over what a predecessor's export_state() gave (the fds are ours)."""
        for fd in fds:
            os.close(fd)
        raise TransportError("this transport cannot adopt another's state", code="handover")

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
