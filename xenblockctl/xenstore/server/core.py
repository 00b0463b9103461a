"""The daemon's protocol core, independent of sockets: connections in, replies and events out.

`Xenstored.handle()` takes one decoded request of one connection and queues the reply (and any
watch events, on whichever connections they reach) on the connections' output queues. The event
loop in daemon.py only moves bytes. Order per connection follows the C daemon: watch events caused
by a request precede its reply; WATCH's own first event follows the reply.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable

from xenblockctl.xenstore.server import paths
from xenblockctl.xenstore.server.connection import Connection
from xenblockctl.xenstore.server.domains import Domains
from xenblockctl.xenstore.server.handlers import HANDLERS, Request, rm_node
from xenblockctl.xenstore.server.permissions import READ, Perms, perm_for
from xenblockctl.xenstore.server.quota import SMALL_REPLY, Quota, over_hard
from xenblockctl.xenstore.server.store import Store
from xenblockctl.xenstore.server.transactions import Transaction
from xenblockctl.xenstore.server.view import NodeEvent, RequestView
from xenblockctl.xenstore.server.wire import (
    HEADER_SIZE,
    PAYLOAD_MAX,
    Frame,
    Op,
    XsError,
    error_payload,
    op_name,
)

log = logging.getLogger(__name__)

Tracer = Callable[[str], None]


class Xenstored:
    def __init__(self, quota: Quota | None = None, trace: Tracer | None = None) -> None:
        self.store = Store()
        self.domains = Domains()
        self.quota = quota or Quota()
        self.quota_path_max = self.quota.path_max
        self.connections: dict[int, Connection] = {}
        #: domid -> "soft" / "hard": the memory limit it was last reported above.
        self._memory_state: dict[int, str] = {}
        self._next_conn_id = 1
        #: Fault injection (CONTROL fail-commits): this many next commits fail with EAGAIN.
        self.forced_eagain = 0
        #: Fault injection (CONTROL drop-watching): connections the daemon drops after this turn.
        self.doomed: set[int] = set()
        self.trace = trace

    # Connections ------------------------------------------------------------------------------

    def connect(self, domid: int = 0) -> Connection:
        conn = Connection(self._next_conn_id, domid, privileged=domid == 0)
        self._next_conn_id += 1
        self.connections[conn.conn_id] = conn
        if self.trace:
            self.trace(f"CREATE connection {conn.conn_id} domid={domid}")
        return conn

    def may_connect(self, domid: int) -> bool:
        """Whether another connection of `domid` is allowed (quota `connections`)."""
        return domid == 0 or len(self._domain_connections(domid)) < self.quota.connections

    def disconnect(self, conn: Connection) -> None:
        """A dropped connection's open transactions are discarded, never committed; everything
        it held (staged copies, watches, queued output) goes with it."""
        conn.drop_state()
        conn.discard_output()
        self.connections.pop(conn.conn_id, None)
        if not conn.privileged:
            self._check_memory(conn.domid)
        if self.trace:
            self.trace(f"DESTROY connection {conn.conn_id}")

    def domain_watch_count(self, domid: int) -> int:
        return sum(len(c.watches) for c in self.connections.values() if c.domid == domid)

    def domain_transaction_count(self, domid: int) -> int:
        return sum(len(c.transactions) for c in self.connections.values() if c.domid == domid)

    # Memory quota -----------------------------------------------------------------------------

    def domain_memory(self, domid: int) -> int:
        """Bytes charged to `domid` as the C daemon counts them (see quota.py)."""
        total = self.store.owned_bytes[domid]
        for conn in self._domain_connections(domid):
            total += conn.watch_memory + conn.transaction_memory + conn.queued_bytes
        return total

    def memory_allows(self, domid: int, more: int) -> bool:
        """False when charging `more` bytes to an unprivileged domain reaches its hard limit."""
        if domid == 0 or more <= 0:
            return True
        return not over_hard(self.quota, self.domain_memory(domid) + more)

    def accepts_requests(self, conn: Connection) -> bool:
        """Whether the daemon reads this connection's next request now (`domain_can_read`): an
        unprivileged one waits while its replies are unread or its domain is at the hard
        memory limit."""
        if conn.privileged:
            return True
        if conn.outstanding >= self.quota.outstanding:
            return False
        return not over_hard(self.quota, self.domain_memory(conn.domid))

    def _check_memory(self, domid: int) -> None:
        """Log when a domain crosses its soft or hard memory limit, and when it is back below
        (`domain_chk_quota`): a stalled guest must be visible in the log."""
        memory = self.domain_memory(domid)
        state = ""
        if over_hard(self.quota, memory):
            state = "hard"
        elif self.quota.memory_soft and memory >= self.quota.memory_soft:
            state = "soft"
        before = self._memory_state.get(domid, "")
        if state == before:
            return
        if state:
            self._memory_state[domid] = state
            log.warning(
                "domain %d uses %d bytes, above its %s memory quota%s",
                domid,
                memory,
                state,
                " (requests stalled, events dropped)" if state == "hard" else "",
            )
        else:
            del self._memory_state[domid]
            log.info("domain %d uses %d bytes, below its memory quotas again", domid, memory)

    def _staged_memory(self, conn: Connection, view: RequestView) -> dict[int, int]:
        """Bytes the staged writes of one request would add, per charged domain."""
        if view.txn is not None:
            return {conn.domid: view.txn.copy_delta(self.store, view.staged)}
        delta: dict[int, int] = {}
        for path, new in view.staged.items():
            old = self.store.get(path)
            if old is not None:
                delta[old.owner] = delta.get(old.owner, 0) - len(path) - old.record_size
            if new is not None:
                delta[new.owner] = delta.get(new.owner, 0) + len(path) + new.record_size
        return delta

    # Requests ---------------------------------------------------------------------------------

    def handle(self, conn: Connection, frame: Frame) -> None:
        if self.trace:
            self._trace_io("IN", conn, frame.type, frame.payload)
        entry = HANDLERS.get(frame.type)
        if entry is None:
            self._reply_error(conn, frame, errno.ENOSYS)
            return
        func, privileged_only, ignores_tx = entry
        if privileged_only and not conn.privileged:
            self._reply_error(conn, frame, errno.EACCES)
            return
        txn: Transaction | None = None
        if not ignores_tx and frame.tx_id != 0:
            txn = conn.transactions.get(frame.tx_id)
            if txn is None:
                self._reply_error(conn, frame, errno.ENOENT)
                return
        view = RequestView(self.store, txn, conn.domid, conn.privileged, self.quota)
        req = Request(self, conn, frame, view, txn)
        try:
            payload = func(req)
            if len(payload) > PAYLOAD_MAX:
                raise XsError(errno.E2BIG)
            if view.staged:
                for domid, more in self._staged_memory(conn, view).items():
                    if not self.memory_allows(domid, more):
                        log.warning(
                            "connection %d (domain %d): %s refused, domain %d at its memory quota",
                            conn.conn_id,
                            conn.domid,
                            op_name(frame.type),
                            domid,
                        )
                        raise XsError(errno.ENOMEM)
            events = view.finish()
        except XsError as exc:
            self._reply_error(conn, frame, exc.errno)
            return
        except Exception:
            # A bug must cost one request, not the daemon; staged writes were not applied.
            log.exception("internal error handling %s", op_name(frame.type))
            self._reply_error(conn, frame, errno.EIO)
            return
        self.fire(events)
        self._reply(conn, frame.type, frame, payload)
        for event in req.after_reply:
            self._queue_event(conn, event)
        if not conn.privileged:
            self._check_memory(conn.domid)

    def _reply(self, conn: Connection, msg_type: int, frame: Frame, payload: bytes) -> None:
        if (
            not conn.privileged
            and len(payload) > SMALL_REPLY
            and not self.memory_allows(conn.domid, HEADER_SIZE + len(payload))
        ):
            # `send_reply`: only a reply that fits the preallocated buffer ignores the quota.
            log.warning(
                "connection %d (domain %d): %s reply of %d bytes refused, domain at its memory quota",
                conn.conn_id,
                conn.domid,
                op_name(msg_type),
                len(payload),
            )
            msg_type, payload = Op.ERROR, error_payload(errno.ENOMEM)
        if self.trace:
            self._trace_io("OUT", conn, msg_type, payload)
        conn.queue_reply(msg_type, frame.req_id, frame.tx_id, payload)

    def _reply_error(self, conn: Connection, frame: Frame, err: int) -> None:
        self._reply(conn, Op.ERROR, frame, error_payload(err))

    def _queue_event(self, conn: Connection, payload: bytes) -> None:
        if not conn.privileged and not self.memory_allows(conn.domid, HEADER_SIZE + len(payload)):
            # `send_event` cannot report an error to anyone: the event is lost, say so.
            log.warning(
                "connection %d (domain %d): watch event %r dropped, domain at its memory quota",
                conn.conn_id,
                conn.domid,
                payload.split(b"\0", 1)[0][:80],
            )
            return
        if conn.queue_event(payload) and self.trace:
            self._trace_io("OUT", conn, Op.WATCH_EVENT, payload)

    def _trace_io(self, prefix: str, conn: Connection, msg_type: int, payload: bytes) -> None:
        assert self.trace is not None
        text = payload.decode("latin-1").replace("\0", " ")
        self.trace(f"{prefix} {conn.conn_id} {op_name(msg_type)} ({text})")

    # Watches ----------------------------------------------------------------------------------

    def fire(self, events: Iterable[NodeEvent]) -> None:
        for event in events:
            for conn in self.connections.values():
                if not conn.watches or not self._may_see(conn, event):
                    continue
                for watch in conn.watches:
                    if watch.matches(event.path, event.exact):
                        self._queue_event(conn, watch.event_payload(event.path))

    def _may_see(self, conn: Connection, event: NodeEvent) -> bool:
        """`watch_permitted`: the watcher can read the node (before or after the change) or its
        parent. Privileged watchers too need permissions to look at: a transaction's commit event
        for a node that existed neither before nor after it (created and removed inside the
        transaction) has none, and the C daemon sends it to nobody."""
        target = self.domains.targets.get(conn.domid)

        def readable(perms: Perms | None) -> bool:
            return perms is not None and bool(perm_for(conn.domid, conn.privileged, target, perms) & READ)

        if readable(event.old_perms):
            return True
        perms = event.perms
        if perms is None:
            node = self.store.get(event.path)
            if node is None:
                return False
            perms = node.perms
        if readable(perms):
            return True
        parent = self.store.get(paths.parent(event.path))
        return parent is not None and readable(parent.perms)

    def fire_special(self, name: str) -> None:
        perms = self.domains.special_perms[name]
        for conn in self.connections.values():
            target = self.domains.targets.get(conn.domid)
            if not perm_for(conn.domid, conn.privileged, target, perms) & READ:
                continue
            for watch in conn.watches:
                if watch.node == name:
                    self._queue_event(conn, watch.event_payload(name))

    # Transactions -----------------------------------------------------------------------------

    def commit(self, conn: Connection, txn: Transaction) -> None:
        if txn.failed:
            raise XsError(errno.ENOMEM)
        if txn.node_created and not conn.privileged:
            delta = txn.owned_delta(self.store)
            for domid, change in delta.items():
                if self.store.owned[domid] + change >= self.quota.nodes_per_domain:
                    raise XsError(errno.ENOSPC)
        if self.forced_eagain > 0:
            self.forced_eagain -= 1
            raise XsError(errno.EAGAIN)
        if txn.conflicts(self.store):
            raise XsError(errno.EAGAIN)
        self.store.apply(txn.changes())
        self.fire(NodeEvent(e.path, e.exact, None, e.old_perms) for e in txn.events())

    # Domains ----------------------------------------------------------------------------------

    def introduce(self, domid: int) -> None:
        if domid in self.domains.introduced:
            # Re-introduction resets the domain's connection (`domain_conn_reset`).
            if domid != 0:
                for conn in self._domain_connections(domid):
                    conn.drop_state()
            return
        self.domains.introduced.add(domid)
        self.fire_special("@introduceDomain")

    def release(self, domid: int) -> None:
        """RELEASE: the domain's connections lose watches and transactions, the nodes it owns
        are removed (the C daemon's default without --keep-orphans), @releaseDomain fires.

        Deviation: the C daemon frees the domain's one ring connection; our domain-socket
        connections stay open (a test may go on using them, or re-introduce the domain)."""
        for conn in self._domain_connections(domid):
            conn.drop_state()
        self.domains.introduced.discard(domid)
        view = RequestView(self.store, None, 0, True, self.quota)
        orphans: list[str] = []
        for path, node in self.store.walk("/"):
            # Pre-order: a removed subtree's nodes follow its root, so one look back suffices.
            if node.owner == domid and path != "/" and not (orphans and paths.is_child(path, orphans[-1])):
                orphans.append(path)
        for path in orphans:
            rm_node(view, path)
        self.fire(view.finish())
        self.domains.forget(domid)
        self.fire_special("@releaseDomain")

    def _domain_connections(self, domid: int) -> list[Connection]:
        return [c for c in self.connections.values() if c.domid == domid]
