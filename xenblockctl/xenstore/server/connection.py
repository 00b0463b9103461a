"""One client connection's protocol state: identity, watches, transactions and output queue.

The output queue is what lets a slow reader not stall the daemon: replies and events are queued
here and written without blocking when the socket accepts them. As in the C daemon (`send_event`),
a watch event identical to one still waiting in the queue is dropped, except `@` events. The queue
counts its bytes and its unsent replies ("outstanding requests"): the quotas look at both.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from xenblockctl.xenstore.server.paths import home
from xenblockctl.xenstore.server.transactions import Transaction
from xenblockctl.xenstore.server.watches import Watch
from xenblockctl.xenstore.server.wire import Op, encode


@dataclass(slots=True)
class _Queued:
    data: bytes
    #: Event payload for de-duplication, None for replies and `@` events.
    event_key: bytes | None
    is_reply: bool = False


@dataclass(eq=False)
class Connection:
    """Protocol state of one connection; the daemon owns the socket that feeds it."""

    conn_id: int
    domid: int
    privileged: bool
    watches: list[Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_tx_id: int = 1
    _queue: deque[_Queued] = field(default_factory=deque)
    _sent_of_head: int = 0
    _pending_events: Counter[bytes] = field(default_factory=Counter)
    queued_bytes: int = 0
    #: Replies queued and not completely sent yet.
    outstanding: int = 0

    @property
    def home(self) -> str:
        return home(self.domid)

    @property
    def watch_memory(self) -> int:
        """Bytes the memory quota charges for this connection's watches (path + token)."""
        return sum(len(w.node) + len(w.token) for w in self.watches)

    @property
    def transaction_memory(self) -> int:
        return sum(t.memory for t in self.transactions.values())

    def new_transaction_id(self) -> int:
        while True:
            tx_id = self.next_tx_id
            self.next_tx_id = (self.next_tx_id + 1) & 0xFFFFFFFF
            if tx_id != 0 and tx_id not in self.transactions:
                return tx_id

    def drop_state(self) -> None:
        """Forget watches and open transactions (disconnect, RESET_WATCHES, RELEASE)."""
        self.watches.clear()
        self.transactions.clear()

    def discard_output(self) -> None:
        """Forget everything queued (the connection is gone)."""
        self._queue.clear()
        self._pending_events.clear()
        self._sent_of_head = self.queued_bytes = self.outstanding = 0

    # Output queue -------------------------------------------------------------------------

    def queue_reply(self, msg_type: int, req_id: int, tx_id: int, payload: bytes) -> None:
        self._push(_Queued(encode(msg_type, req_id, tx_id, payload), None, is_reply=True))
        self.outstanding += 1

    def queue_event(self, payload: bytes) -> bool:
        """Queue a watch event; False when an identical one is still waiting (dropped)."""
        special = payload.startswith(b"@")
        if not special and self._pending_events[payload]:
            return False
        self._push(_Queued(encode(Op.WATCH_EVENT, 0, 0, payload), None if special else payload))
        if not special:
            self._pending_events[payload] += 1
        return True

    def _push(self, item: _Queued) -> None:
        self._queue.append(item)
        self.queued_bytes += len(item.data)

    def has_output(self) -> bool:
        return bool(self._queue)

    def output_chunk(self, limit: int = 256 * 1024) -> bytes:
        """Bytes to try to send next (whole queued messages, the first possibly partly sent)."""
        parts: list[bytes] = []
        size = 0
        for i, item in enumerate(self._queue):
            data = item.data[self._sent_of_head :] if i == 0 else item.data
            parts.append(data)
            size += len(data)
            if size >= limit:
                break
        return b"".join(parts)

    def consume_output(self, sent: int) -> None:
        """The socket accepted `sent` bytes of `output_chunk()`."""
        self.queued_bytes -= sent
        while sent and self._queue:
            head = self._queue[0]
            left = len(head.data) - self._sent_of_head
            if sent < left:
                self._sent_of_head += sent
                return
            sent -= left
            self._queue.popleft()
            self._sent_of_head = 0
            if head.is_reply:
                self.outstanding -= 1
            if head.event_key is not None:
                self._pending_events[head.event_key] -= 1
                if not self._pending_events[head.event_key]:
                    del self._pending_events[head.event_key]
