"""What a `XenStore` needs from its connection to the daemon, whichever way it is built.

Two links implement it:

    transport.RouterLink     pyxs's reader thread matches replies to requests by id and queues
                             watch events: any number of threads may share one XenStore (the
                             engine, the CLI, tests)
    synchronous.DirectLink   one socket (up to 4 for a large read batch) or the xenbus device, no
                             thread: the calling thread
                             sends a batch in one write and reads its replies itself, setting aside
                             watch events it meets; for one-shot, one-thread callers (the block
                             script), where the thread, `socket`, `queue` and pyxs's `platform`
                             import cost more than the whole xenstore conversation (bench/README.md)

A request is `(type, req_id, tx_id, payload)`; a reply is a `wire.Frame`. Failures are the three
exceptions below, which the client turns into its typed XenstoreErrors (it knows what each
request was for).
"""

from __future__ import annotations

from xenblockctl.xenstore.endpoints import Endpoint
from xenblockctl.xenstore.wire import Frame

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

Request = tuple[int, int, int, bytes]


class LinkTimeout(Exception):
    """The reply to request number `index` of the batch did not arrive before the deadline."""

    def __init__(self, index: int) -> None:
        super().__init__(f"request {index}: no reply before the deadline")
        self.index = index


class LinkLost(Exception):
    """The connection is gone (closed by the daemon, reader died, unparseable stream)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


class LinkSendFailed(Exception):
    """Request number `index` could not be sent; the stream position is unknown."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


class Link:
    """The contract (documentation and type; both links override every method but
    exchange_stream, whose level-by-level default serves any link that can exchange, and
    interrupt, which only a link whose waits other threads share has)."""

    endpoint: Endpoint

    def exchange(self, requests: Sequence[Request], deadline: float) -> list[Frame]:
        """Send every request, return their replies in request order. Sockets pipeline (the batch
        is sent before the first reply is awaited); xenbus goes one request at a time (Linux's
        /dev/xen/xenbus corrupts pipelined requests, tests/xenstore/test_client_xenbus_lockstep).
        Watch events met meanwhile are kept for `next_event`."""
        raise NotImplementedError

    def exchange_stream(
        self,
        requests: Sequence[Request],
        follow: Callable[[list[tuple[int, Frame]]], Sequence[Request]],
        deadline: float,
    ) -> None:
        """Send `requests`; hand the replies, as they arrive, to `follow([(index, reply), ...])`,
        which returns the requests they lead to (sent on the same terms, numbered on in the order
        `follow` returned them). For a walk whose next requests depend on the replies (a listing,
        then a read per child): the daemon need not wait for a whole level before the next one
        starts. If `follow` raises, no further reply is handed to it, the requests already sent
        are still collected (the connection stays usable), and the exception is raised at the end.

        This default (the threaded link, the xenbus device) goes level by level: exchange() of the
        requests, then of everything `follow` returned for them, and so on. DirectLink on a
        socket sends follow-ups as soon as their replies are read (synchronous.py)."""
        first = 0
        while requests:
            replies = self.exchange(requests, deadline)
            more = follow(list(enumerate(replies, first)))
            first += len(requests)
            requests = more

    def next_event(self, timeout: float) -> tuple[bytes, bytes] | None:
        """(path, token) of the next event of a subscribed token, None after `timeout` seconds;
        LinkLost once the connection is gone (and on every later call)."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """Make the next_event() waiting now (in any thread), or else the next one, return None at
        once. Safe to call from a signal handler."""
        raise NotImplementedError("only the threaded link's waits can be interrupted")

    def subscribe(self, token: str) -> None:
        """Deliver events carrying `token` from now on (called once per token)."""
        raise NotImplementedError

    def unsubscribe(self, token: str) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def describe_failure(self) -> str:
        """Why the connection is gone, for error messages."""
        raise NotImplementedError

    def close(self, timeout: float) -> None:
        """Close; bounded by `timeout` even when a reader is wedged. Idempotent."""
        raise NotImplementedError
