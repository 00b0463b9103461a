"""Per-domain quotas for unprivileged connections, with the C daemon's 4.17 defaults.

Privileged connections (dom0, every plain socket connection) are exempt, as in the C daemon.
The comparisons keep the C daemon's exact operators (`>` vs `>=`), so the limits are off by one
in the same places: 129 watches and 11 open transactions are accepted, a node record of 2048
bytes is not.

The memory quota counts what `domain_memory_add` counts in xenstored 4.17: the domain's nodes
(key + record), the nodes its open transactions have written (the transaction's copies), its
watches (path + token) and the replies and events queued for it (header + payload). Reaching the
hard limit makes writes and watches fail with ENOMEM, drops its watch events, and stops the
daemon reading its requests until it falls below again; the soft limit only logs.

Two limits are ours, because the C daemon has exactly one ring connection per domain while a
domain socket here may be connected to many times: open transactions are counted per domain
(the C daemon's documented meaning, "per domain"), and `connections` caps the connections of one
domain. Outstanding requests (replies queued but not read) are counted per connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from xenblockctl.xenstore.server.store import Node
from xenblockctl.xenstore.server.wire import REL_PATH_MAX

#: `DEFAULT_BUFFER_SIZE`: replies up to this size are queued even above the hard memory limit
#: (an error name always fits), larger ones are refused with ENOMEM.
SMALL_REPLY = 16


@dataclass(frozen=True, slots=True)
class Quota:
    nodes_per_domain: int = 1000
    watches_per_domain: int = 128
    transactions: int = 10
    entry_size: int = 2048
    perms_per_node: int = 5
    transaction_nodes: int = 1024
    path_max: int = REL_PATH_MAX
    outstanding: int = 20
    memory_soft: int = 2 * 1024 * 1024
    memory_hard: int = 2 * 1024 * 1024 + 512 * 1024
    #: Ours (see the module doc): connections one domain may hold open at once.
    connections: int = 8


#: Names of `--quota NAME=N` (the C daemon's -Q names, plus ours) -> Quota field.
QUOTA_NAMES = {
    "transaction-nodes": "transaction_nodes",
    "outstanding": "outstanding",
    "memory": "memory_hard",
    "connections": "connections",
}
#: `--quota-soft NAME=N`.
SOFT_QUOTA_NAMES = {"memory": "memory_soft"}


def entry_size(node: Node) -> int:
    """The node's record size as the C daemon accounts it against `entry_size`."""
    return node.record_size


def over_hard(quota: Quota, memory: int) -> bool:
    """`domain_chk_quota`: a hard limit of 0 means none."""
    return bool(quota.memory_hard) and memory >= quota.memory_hard
