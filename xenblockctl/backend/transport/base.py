"""The transport interface the engine and the data plane use: grants in, events both ways.

A transport maps a frontend domain's grant references into our address space and binds to the
frontend's event channel port. Two implementations: `local.LocalTransport` (no Xen) and
`xen.XenTransport` (gntdev + evtchn). Both hand out the same two kinds of objects below.
"""

from __future__ import annotations

import abc
import select
from collections.abc import Sequence

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

    def follows(self, index: int) -> bool:
        """True if page index+1 directly follows page index in our address space."""
        return index + 1 < len(self.refs)

    def span(self, start: int, count: int) -> memoryview | None:
        """One contiguous view of pages start..start+count-1, or None if they are not contiguous.

        Lets the data plane merge page-sized segments into one iovec (a 1 MiB request becomes one
        preadv buffer instead of 256)."""
        try:
            return self.buffer[start * 4096 : (start + count) * 4096]
        except GrantError:
            return None

    def __enter__(self) -> GrantMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmap()


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

    @abc.abstractmethod
    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        """Map `refs` of domain `domid`. `contiguous=True` for rings (one virtually contiguous range)."""

    @abc.abstractmethod
    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        """Bind to the frontend's unbound port `remote_port` (its `event-channel` node)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
