"""The tree as one request sees it, with its writes staged until the request succeeds.

Every request runs against a RequestView: reads come from the request's own staged writes, then
from its transaction (recording the access for conflict detection), then from the committed store.
Writes and watch events are only staged; `finish()` applies them all (to the store, or into the
transaction) once the handler returned without error. A request that fails half-way — a quota hit
while creating parents, a bug — therefore leaves the tree untouched: no request can corrupt it.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass

from xenblockctl.xenstore.server.permissions import Perms
from xenblockctl.xenstore.server.quota import Quota, entry_size
from xenblockctl.xenstore.server.store import Node, Store
from xenblockctl.xenstore.server.transactions import Transaction
from xenblockctl.xenstore.server.wire import XsError


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """A change that may fire watches once it is committed."""

    path: str
    exact: bool
    #: Permissions of the node after the change (None: look them up when firing).
    perms: Perms | None
    #: Permissions before the change (SET_PERMS; transaction commits): a watcher losing access
    #: still hears about it.
    old_perms: Perms | None = None


class RequestView:
    def __init__(
        self, store: Store, txn: Transaction | None, domid: int, privileged: bool, quota: Quota
    ) -> None:
        self.store = store
        self.txn = txn
        self.domid = domid
        self.privileged = privileged
        self.quota = quota
        self._staged: dict[str, Node | None] = {}
        self.events: list[NodeEvent] = []

    @property
    def staged(self) -> dict[str, Node | None]:
        """The writes (Node) and deletions (None) `finish()` would apply."""
        return self._staged

    def get(self, path: str) -> Node | None:
        if path in self._staged:
            return self._staged[path]
        if self.txn is not None:
            return self.txn.read(self.store, path)
        return self.store.get(path)

    def put(self, path: str, node: Node, *, check_quota: bool = True) -> None:
        if check_quota and not self.privileged and entry_size(node) >= self.quota.entry_size:
            if self.txn is not None:
                self.txn.failed = True
            raise XsError(errno.ENOSPC)
        self._staged[path] = node

    def delete(self, path: str) -> None:
        self._staged[path] = None

    def fire(self, path: str, exact: bool, perms: Perms | None, old_perms: Perms | None = None) -> None:
        self.events.append(NodeEvent(path, exact, perms, old_perms))

    def owned_count(self, domid: int) -> int:
        """Nodes `domid` owns as this request sees the tree (the per-domain node quota)."""
        delta: Counter[int] = Counter()
        if self.txn is not None:
            delta = self.txn.owned_delta(self.store)
        for path, new in self._staged.items():
            old = self.txn.overlay.get(path, self.store.get(path)) if self.txn else self.store.get(path)
            if old is not None:
                delta[old.owner] -= 1
            if new is not None:
                delta[new.owner] += 1
        return self.store.owned[domid] + delta[domid]

    def finish(self) -> list[NodeEvent]:
        """Apply the staged writes; returns the events to fire now (none inside a transaction)."""
        if self.txn is None:
            self.store.apply(self._staged.items())
            return self.events
        for path, node in self._staged.items():
            self.txn.stage(self.store, path, node)
        for event in self.events:
            self.txn.queue_event(event.path, event.exact)
        return []
