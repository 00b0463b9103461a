"""The committed tree: nodes by absolute path, generation counters, and per-owner node counts.

Like the C daemon's tdb, the tree is a flat map from absolute path to a record holding the value,
the permission list and the ordered child names. Every change of a node gives it a fresh value of
the global generation counter; transactions compare these to detect conflicts
(`xenstored_transaction.c`). Nodes are immutable, so a reader can keep one without copying.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from xenblockctl.xenstore.server.paths import child
from xenblockctl.xenstore.server.permissions import NONE, Perm, Perms

#: Generation of a node that does not exist (`NO_GENERATION`).
NO_GENERATION = -1
#: Size of `struct xs_tdb_record_hdr` (u64 generation + 3 x u32, padded) and of one permission.
RECORD_HEADER = 24
PERM_SIZE = 8


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    generation: int = NO_GENERATION

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    # Direct construction: dataclasses.replace costs several times more on this hot path.
    def with_value(self, value: bytes) -> Node:
        return Node(value, self.perms, self.children, self.generation)

    def with_perms(self, perms: Perms) -> Node:
        return Node(self.value, perms, self.children, self.generation)

    def with_generation(self, generation: int) -> Node:
        return Node(self.value, self.perms, self.children, generation)

    def with_child(self, name: str) -> Node:
        return Node(self.value, self.perms, (*self.children, name), self.generation)

    def without_child(self, name: str) -> Node:
        children = tuple(c for c in self.children if c != name)
        return Node(self.value, self.perms, children, self.generation)

    @property
    def record_size(self) -> int:
        """Size of the node's tdb record in the C daemon: what the entry-size quota limits and,
        with the key, what the memory quota counts."""
        children = sum(len(c) + 1 for c in self.children)
        return RECORD_HEADER + PERM_SIZE * len(self.perms) + len(self.value) + children

    def children_payload(self) -> bytes:
        """DIRECTORY reply: each child name NUL-terminated, in creation order."""
        return b"".join(c.encode("latin-1") + b"\0" for c in self.children)


class Store:
    """The committed nodes. Mutated only through `apply`, one whole request or commit at a time."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._generation = 0
        #: owner domid -> number of nodes it owns (the per-domain node quota counts these).
        self.owned: Counter[int] = Counter()
        #: owner domid -> bytes of its nodes as the C daemon accounts them (key + record), the
        #: committed-tree part of the per-domain memory quota.
        self.owned_bytes: Counter[int] = Counter()
        # What setup_structure() creates: /, /tool, /tool/xenstored, all owned by dom0, no access.
        dom0_only = (Perm(NONE, 0),)
        self.apply(
            [
                ("/", Node(b"", dom0_only, ("tool",))),
                ("/tool", Node(b"", dom0_only, ("xenstored",))),
                ("/tool/xenstored", Node(b"", dom0_only)),
            ]
        )

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, path: str) -> Node | None:
        return self._nodes.get(path)

    def generation_of(self, path: str) -> int:
        node = self._nodes.get(path)
        return NO_GENERATION if node is None else node.generation

    def __len__(self) -> int:
        return len(self._nodes)

    def apply(self, changes: Iterable[tuple[str, Node | None]]) -> None:
        """Write (Node) or delete (None) each path in order, stamping fresh generations."""
        for path, node in changes:
            old = self._nodes.get(path)
            if old is not None:
                self.owned[old.owner] -= 1
                self.owned_bytes[old.owner] -= len(path) + old.record_size
            if node is None:
                self._nodes.pop(path, None)
            else:
                self._nodes[path] = node.with_generation(self.next_generation())
                self.owned[node.owner] += 1
                self.owned_bytes[node.owner] += len(path) + node.record_size

    def walk(self, root: str = "/") -> Iterator[tuple[str, Node]]:
        """Pre-order walk following child lists."""
        node = self._nodes.get(root)
        if node is None:
            return
        stack = [(root, node)]
        while stack:
            path, node = stack.pop()
            yield path, node
            for name in reversed(node.children):
                sub = child(path, name)
                found = self._nodes.get(sub)
                if found is not None:
                    stack.append((sub, found))

    def snapshot(self) -> dict[str, tuple[bytes, Perms, tuple[str, ...]]]:
        """Contents without generations: what tests compare to prove a store was not corrupted."""
        return {p: (n.value, n.perms, n.children) for p, n in self._nodes.items()}
