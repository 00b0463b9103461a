"""Per-domain quotas for unprivileged connections, with the C daemon's 4.17 defaults.

Privileged connections (dom0, every plain socket connection) are exempt, as in the C daemon.
The comparisons keep the C daemon's exact operators (`>` vs `>=`), so the limits are off by one
in the same places: 129 watches and 11 open transactions are accepted, a node record of 2048
bytes is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from xenblockctl.xenstore.server.store import Node

#: Size of `struct xs_tdb_record_hdr` (u64 generation + 3 x u32, padded) and of one permission.
_RECORD_HEADER = 24
_PERM_SIZE = 8


@dataclass(frozen=True, slots=True)
class Quota:
    nodes_per_domain: int = 1000
    watches_per_domain: int = 128
    transactions: int = 10
    entry_size: int = 2048
    perms_per_node: int = 5
    transaction_nodes: int = 1024


def entry_size(node: Node) -> int:
    """The node's record size as the C daemon accounts it against `entry_size`."""
    children = sum(len(c) + 1 for c in node.children)
    return _RECORD_HEADER + _PERM_SIZE * len(node.perms) + len(node.value) + children
