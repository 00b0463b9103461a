"""Transactions: first-access snapshots, generation-based conflict detection, commit.

As in the C daemon 4.17 (`xenstored_transaction.c`): the first time a transaction touches a node,
the node (or its absence) is copied into the transaction and, for a read, its generation is
recorded. Later reads in the transaction see that copy and the transaction's own writes; other
connections see nothing until commit. Commit fails with EAGAIN when any recorded generation no
longer matches the committed tree. Every write first reads the node (and creating a node reads and
rewrites its parent), so concurrent writes of the same node, and concurrent creation of siblings
under one parent, both conflict. Watch events are held back and fire at commit, in the order the
transaction first touched the nodes; a non-exact event replaces an exact one for the same node.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass

from xenblockctl.xenstore.server.permissions import Perms
from xenblockctl.xenstore.server.store import NO_GENERATION, Node, Store
from xenblockctl.xenstore.server.wire import XsError


@dataclass(slots=True)
class Accessed:
    generation: int
    check_generation: bool
    #: Permissions when first touched: watchers who could read the node then get the event.
    perms: Perms | None
    modified: bool = False
    fire: bool = False
    exact: bool = True


@dataclass(frozen=True, slots=True)
class PendingEvent:
    path: str
    exact: bool
    old_perms: Perms | None


class Transaction:
    def __init__(self, tx_id: int, node_limit: int | None) -> None:
        self.id = tx_id
        #: Unprivileged connections may touch at most this many nodes in one transaction.
        self.node_limit = node_limit
        self.accessed: dict[str, Accessed] = {}
        self.overlay: dict[str, Node | None] = {}
        #: Set when a write failed half-way: the C daemon cannot undo it and refuses the commit.
        self.failed = False
        self.node_created = False
        #: Bytes of the transaction's own node copies as the C daemon accounts them (key
        #: `<generation>/<path>` + record): charged to the connection's domain memory quota.
        self.memory = 0
        self._copy_size: dict[str, int] = {}
        self._key_prefix = 0

    def _admit(self, path: str) -> None:
        if self.node_limit is not None and len(self.accessed) >= self.node_limit:
            self.failed = True
            raise XsError(errno.ENOSPC)

    def read(self, store: Store, path: str) -> Node | None:
        if path in self.overlay:
            return self.overlay[path]
        self._admit(path)
        node = store.get(path)
        self.accessed[path] = Accessed(
            NO_GENERATION if node is None else node.generation,
            check_generation=True,
            perms=None if node is None else node.perms,
        )
        self.overlay[path] = node
        return node

    def stage(self, store: Store, path: str, node: Node | None) -> None:
        entry = self.accessed.get(path)
        if entry is None:
            self._admit(path)
            current = store.get(path)
            entry = Accessed(NO_GENERATION, False, None if current is None else current.perms)
            self.accessed[path] = entry
        entry.modified = True
        # A write inside a transaction still consumes a global generation, as in the C daemon
        # (visible through DIRECTORY_PART inside the transaction).
        self.overlay[path] = None if node is None else node.with_generation(store.next_generation())
        self.memory -= self._copy_size.pop(path, 0)
        if node is not None:
            size = self.copy_size(store, path, node)
            self._copy_size[path] = size
            self.memory += size

    def copy_size(self, store: Store, path: str, node: Node | None) -> int:
        """Accounted size of this transaction's copy of `node` at `path` (0 for a deletion)."""
        if node is None:
            return 0
        if not self._key_prefix:
            self._key_prefix = len(str(store.generation)) + 1
        return self._key_prefix + len(path) + node.record_size

    def copy_delta(self, store: Store, changes: dict[str, Node | None]) -> int:
        """How much staging `changes` would change `memory`."""
        return sum(self.copy_size(store, p, n) - self._copy_size.get(p, 0) for p, n in changes.items())

    def queue_event(self, path: str, exact: bool) -> None:
        entry = self.accessed.get(path)
        if entry is None:
            # The C daemon fails the transaction when it cannot remember an event.
            self.failed = True
            return
        if not entry.fire:
            entry.fire, entry.exact = True, exact
        elif not exact:
            entry.exact = False

    def owned_delta(self, store: Store) -> Counter[int]:
        """Change of per-owner node counts the commit would make."""
        delta: Counter[int] = Counter()
        for path, entry in self.accessed.items():
            if not entry.modified:
                continue
            old, new = store.get(path), self.overlay.get(path)
            if old is not None:
                delta[old.owner] -= 1
            if new is not None:
                delta[new.owner] += 1
        return delta

    def conflicts(self, store: Store) -> bool:
        return any(
            e.check_generation and store.generation_of(p) != e.generation for p, e in self.accessed.items()
        )

    def changes(self) -> list[tuple[str, Node | None]]:
        return [(p, self.overlay.get(p)) for p, e in self.accessed.items() if e.modified]

    def events(self) -> list[PendingEvent]:
        return [PendingEvent(p, e.exact, e.perms) for p, e in self.accessed.items() if e.fire]
