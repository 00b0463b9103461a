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
from xenblockctl.xenstore.server.quota import Quota
from xenblockctl.xenstore.server.store import Store
from xenblockctl.xenstore.server.transactions import Transaction
from xenblockctl.xenstore.server.view import NodeEvent, RequestView
from xenblockctl.xenstore.server.wire import (
    PAYLOAD_MAX,
    REL_PATH_MAX,
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
        self.quota_path_max = REL_PATH_MAX
        self.connections: dict[int, Connection] = {}
        self._next_conn_id = 1
        #: Fault injection (CONTROL fail-commits): this many next commits fail with EAGAIN.
        self.forced_eagain = 0
        self.trace = trace

    # Connections ------------------------------------------------------------------------------

    def connect(self, domid: int = 0) -> Connection:
        conn = Connection(self._next_conn_id, domid, privileged=domid == 0)
        self._next_conn_id += 1
        self.connections[conn.conn_id] = conn
        if self.trace:
            self.trace(f"CREATE connection {conn.conn_id} domid={domid}")
        return conn

    def disconnect(self, conn: Connection) -> None:
        """A dropped connection's open transactions are discarded, never committed."""
        conn.drop_state()
        self.connections.pop(conn.conn_id, None)
        if self.trace:
            self.trace(f"DESTROY connection {conn.conn_id}")

    def domain_watch_count(self, domid: int) -> int:
        return sum(len(c.watches) for c in self.connections.values() if c.domid == domid)

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

    def _reply(self, conn: Connection, msg_type: int, frame: Frame, payload: bytes) -> None:
        if self.trace:
            self._trace_io("OUT", conn, msg_type, payload)
        conn.queue_reply(msg_type, frame.req_id, frame.tx_id, payload)

    def _reply_error(self, conn: Connection, frame: Frame, err: int) -> None:
        self._reply(conn, Op.ERROR, frame, error_payload(err))

    def _queue_event(self, conn: Connection, payload: bytes) -> None:
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
        parent."""
        if conn.privileged:
            return True
        target = self.domains.targets.get(conn.domid)

        def readable(perms: Perms | None) -> bool:
            return perms is not None and bool(perm_for(conn.domid, False, target, perms) & READ)

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
