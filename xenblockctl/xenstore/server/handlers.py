"""One function per message type, answering as the Xen 4.17 C daemon does.

Each handler gets a Request, returns the reply payload, or raises XsError for an ERROR reply.
Tree changes go through `req.view` (staged until success, see view.py); watch events it fires
are delivered before the reply, as in the C daemon (`fire_watches` runs before `send_ack`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.server import paths
from xenblockctl.xenstore.server.domains import DOMID_FIRST_RESERVED
from xenblockctl.xenstore.server.permissions import (
    OWNER,
    READ,
    WRITE,
    Perms,
    format_perms,
    parse_perm,
    perm_for,
)
from xenblockctl.xenstore.server.store import Node
from xenblockctl.xenstore.server.transactions import Transaction
from xenblockctl.xenstore.server.view import RequestView
from xenblockctl.xenstore.server.watches import Watch
from xenblockctl.xenstore.server.wire import (
    PAYLOAD_MAX,
    REL_PATH_MAX,
    Frame,
    Op,
    XsError,
    c_atoi,
    count_strings,
    get_strings,
    onearg,
)

if TYPE_CHECKING:
    from xenblockctl.xenstore.server.connection import Connection
    from xenblockctl.xenstore.server.core import Xenstored

OK = b"OK\0"


@dataclass(eq=False)
class Request:
    server: Xenstored
    conn: Connection
    frame: Frame
    view: RequestView
    txn: Transaction | None
    #: Event payloads for this connection that must follow the reply (WATCH's first event).
    after_reply: list[bytes] = field(default_factory=list)

    def perm(self, node: Node) -> int:
        target = self.server.domains.targets.get(self.conn.domid)
        return perm_for(self.conn.domid, self.conn.privileged, target, node.perms)


# Lookup helpers ----------------------------------------------------------------------------


def _resolve(req: Request, raw: bytes | None) -> str:
    """Absolute, validated node path from a request argument (EINVAL otherwise)."""
    if raw is None:
        raise XsError(errno.EINVAL)
    path = paths.canonicalize(raw.decode("latin-1"), req.conn.domid)
    if not paths.is_valid(path, req.server.quota_path_max):
        raise XsError(errno.EINVAL)
    return path


def _get_node(req: Request, path: str, want: int) -> Node:
    """The node if the caller has `want` rights on it.

    A missing node is ENOENT only if the nearest existing ancestor would grant `want`; otherwise
    EACCES, so that the error does not reveal what exists (`get_node`/`errno_from_parents`).
    """
    node = req.view.get(path)
    if node is not None:
        if req.perm(node) & want != want:
            raise XsError(errno.EACCES)
        return node
    ancestor = path
    while ancestor != "/":
        ancestor = paths.parent(ancestor)
        found = req.view.get(ancestor)
        if found is not None:
            raise XsError(errno.ENOENT if req.perm(found) & want else errno.EACCES)
    raise XsError(errno.EACCES)


def _node_to_write(req: Request, path: str) -> Node | None:
    """The node if the caller may write it; None if it is missing and the caller could create it
    (ENOENT from _get_node); EACCES and the rest raise as there. write, mkdir and rm differ only
    in what they do with a missing node."""
    try:
        return _get_node(req, path, WRITE)
    except XsError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return None


def _create_node(req: Request, path: str, value: bytes) -> Node:
    """Create `path` and any missing parents (empty values, the parent's permissions; an
    unprivileged creator becomes the owner), as `construct_node`/`create_node` do."""
    view = req.view
    missing = [path]
    above = paths.parent(path)
    parent = view.get(above)
    while parent is None:
        if above == "/":
            raise XsError(errno.ENOENT)
        missing.append(above)
        above = paths.parent(above)
        parent = view.get(above)
    conn = req.conn
    if not conn.privileged:
        count = view.owned_count(conn.domid)
        if count + len(missing) > req.server.quota.nodes_per_domain:
            raise XsError(errno.ENOSPC)
    if req.txn is not None:
        req.txn.node_created = True
    parent_path = above
    node = parent
    for name in reversed(missing):
        perms = parent.perms
        if not conn.privileged:
            perms = (perms[0]._replace(domid=conn.domid), *perms[1:])
        node = Node(value if name == path else b"", perms)
        view.put(parent_path, parent.with_child(paths.basename(name)))
        view.put(name, node)
        parent_path, parent = name, node
    return node


def rm_node(view: RequestView, path: str) -> None:
    """Remove `path` and everything below it: children first, each firing exact watches, the
    root last firing non-exact ones (`rm_node`/`delnode_sub`)."""
    parent_path = paths.parent(path)
    parent = view.get(parent_path)
    if parent is None:
        raise XsError(errno.EINVAL)
    order: list[tuple[str, Node]] = []
    stack: list[tuple[str, Node, bool]] = []
    top = view.get(path)
    if top is None:
        raise XsError(errno.ENOENT)
    stack.append((path, top, False))
    while stack:
        name, node, expanded = stack.pop()
        if expanded:
            order.append((name, node))
            continue
        stack.append((name, node, True))
        for child_name in reversed(node.children):
            sub = paths.child(name, child_name)
            found = view.get(sub)
            if found is not None:
                stack.append((sub, found, False))
    for name, node in order:
        view.delete(name)
        view.fire(name, exact=name != path, perms=node.perms)
    view.put(parent_path, parent.without_child(paths.basename(path)), check_quota=False)


# Node operations ---------------------------------------------------------------------------


def op_read(req: Request) -> bytes:
    path = _resolve(req, onearg(req.frame.payload))
    return _get_node(req, path, READ).value


def op_directory(req: Request) -> bytes:
    path = _resolve(req, onearg(req.frame.payload))
    return _get_node(req, path, READ).children_payload()


def op_directory_part(req: Request) -> bytes:
    payload = req.frame.payload
    if count_strings(payload) != 2:
        raise XsError(errno.EINVAL)
    raw_path, raw_offset = get_strings(payload)
    node = _get_node(req, _resolve(req, raw_path), READ)
    offset = c_atoi(raw_offset)
    gen = str(node.generation).encode() + b"\0"
    children = node.children_payload()
    if offset >= len(children):
        return gen + b"\0"
    # Whole names that fit in one reply after the generation; the final chunk ends with an
    # extra NUL (an empty name) so the client knows the list is complete.
    maxlen = PAYLOAD_MAX - len(gen) - 1
    length = 0
    pos = offset
    while True:
        name_len = children.index(b"\0", pos) - pos
        if length + name_len >= maxlen:
            break
        length += name_len + 1
        pos += name_len + 1
        if offset + length == len(children):
            break
    data = gen + children[offset : offset + length]
    if offset + length == len(children):
        data += b"\0"
    return data


def op_write(req: Request) -> bytes:
    payload = req.frame.payload
    strings = get_strings(payload)
    if not strings:
        raise XsError(errno.EINVAL)
    value = payload[len(strings[0]) + 1 :]
    path = _resolve(req, strings[0])
    node = _node_to_write(req, path)
    if node is None:
        node = _create_node(req, path, value)
    else:
        node = node.with_value(value)
        req.view.put(path, node)
    req.view.fire(path, exact=False, perms=node.perms)
    return OK


def op_mkdir(req: Request) -> bytes:
    path = _resolve(req, onearg(req.frame.payload))
    if _node_to_write(req, path) is None:
        node = _create_node(req, path, b"")
        req.view.fire(path, exact=False, perms=node.perms)
    return OK


def op_rm(req: Request) -> bytes:
    path = _resolve(req, onearg(req.frame.payload))
    if _node_to_write(req, path) is None:
        # Removing what is not there is fine, as long as the parent exists.
        if req.view.get(paths.parent(path)) is not None:
            return OK
        raise XsError(errno.ENOENT)
    if path == "/":
        raise XsError(errno.EINVAL)
    rm_node(req.view, path)
    return OK


def op_get_perms(req: Request) -> bytes:
    path = _resolve(req, onearg(req.frame.payload))
    return format_perms(_get_node(req, path, READ).perms)


def op_set_perms(req: Request) -> bytes:
    payload = req.frame.payload
    num = count_strings(payload) - 1
    if num < 1:
        raise XsError(errno.EINVAL)
    conn = req.conn
    if not conn.privileged and num > req.server.quota.perms_per_node:
        raise XsError(errno.ENOSPC)
    strings = get_strings(payload)
    try:
        perms = tuple(parse_perm(s.decode("latin-1")) for s in strings[1 : 1 + num])
    except ValueError:
        raise XsError(errno.EINVAL) from None
    if perms[0].domid >= DOMID_FIRST_RESERVED:
        # An owner that cannot be a domain (`domain_alloc_permrefs` marks it ignored).
        raise XsError(errno.ENOENT)
    raw_path = strings[0]
    if raw_path.startswith(b"@"):
        return _set_perms_special(req, raw_path.decode("latin-1"), perms)
    path = _resolve(req, raw_path)
    node = _get_node(req, path, WRITE | OWNER)
    if not conn.privileged and perms[0].domid != node.owner:
        raise XsError(errno.EPERM)
    new = node.with_perms(perms)
    req.view.put(path, new)
    req.view.fire(path, exact=False, perms=perms, old_perms=node.perms)
    return OK


def _set_perms_special(req: Request, name: str, perms: Perms) -> bytes:
    domains = req.server.domains
    current = domains.special_perms.get(name)
    if current is None:
        raise XsError(errno.EINVAL)
    target = domains.targets.get(req.conn.domid)
    if perm_for(req.conn.domid, req.conn.privileged, target, current) & (WRITE | OWNER) != WRITE | OWNER:
        raise XsError(errno.EACCES)
    domains.special_perms[name] = perms
    return OK


# Watches -----------------------------------------------------------------------------------


def _watch_args(req: Request) -> tuple[bytes, bytes]:
    payload = req.frame.payload
    if count_strings(payload) != 2:
        raise XsError(errno.EINVAL)
    raw_path, token = get_strings(payload)
    return raw_path, token


def op_watch(req: Request) -> bytes:
    raw_path, token = _watch_args(req)
    conn = req.conn
    name = raw_path.decode("latin-1")
    relative_to = None
    if name.startswith("@"):
        if len(name) > REL_PATH_MAX:
            raise XsError(errno.EINVAL)
    else:
        if not name.startswith("/"):
            relative_to = conn.home
        name = _resolve(req, raw_path)
    if any(w.node == name and w.token == token for w in conn.watches):
        raise XsError(errno.EEXIST)
    if (
        not conn.privileged
        and req.server.domain_watch_count(conn.domid) > req.server.quota.watches_per_domain
    ):
        raise XsError(errno.E2BIG)
    if not conn.privileged and not req.server.memory_allows(conn.domid, len(name) + len(token)):
        raise XsError(errno.ENOMEM)
    watch = Watch(name, token, relative_to)
    conn.watches.append(watch)
    # The first event fires at once, whether or not the node exists ("simplifies clients").
    req.after_reply.append(watch.event_payload(name))
    return OK


def op_unwatch(req: Request) -> bytes:
    raw_path, token = _watch_args(req)
    name = paths.canonicalize(raw_path.decode("latin-1"), req.conn.domid)
    for i, watch in enumerate(req.conn.watches):
        if watch.node == name and watch.token == token:
            del req.conn.watches[i]
            return OK
    raise XsError(errno.ENOENT)


def op_reset_watches(req: Request) -> bytes:
    req.conn.drop_state()
    return OK


# Transactions ------------------------------------------------------------------------------


def op_transaction_start(req: Request) -> bytes:
    conn = req.conn
    if req.txn is not None:
        raise XsError(errno.EBUSY)
    quota = req.server.quota
    # Counted per domain: the C daemon's one connection per domain is many sockets here.
    if not conn.privileged and req.server.domain_transaction_count(conn.domid) > quota.transactions:
        raise XsError(errno.ENOSPC)
    tx_id = conn.new_transaction_id()
    conn.transactions[tx_id] = Transaction(tx_id, None if conn.privileged else quota.transaction_nodes)
    return str(tx_id).encode() + b"\0"


def op_transaction_end(req: Request) -> bytes:
    arg = onearg(req.frame.payload)
    if arg not in (b"T", b"F"):
        raise XsError(errno.EINVAL)
    txn = req.txn
    if txn is None:
        raise XsError(errno.ENOENT)
    del req.conn.transactions[txn.id]
    if arg == b"T":
        req.server.commit(req.conn, txn)
    return OK


# Domains -----------------------------------------------------------------------------------


def op_get_domain_path(req: Request) -> bytes:
    arg = onearg(req.frame.payload)
    if arg is None:
        raise XsError(errno.EINVAL)
    return paths.home(c_atoi(arg)).encode() + b"\0"


def op_is_domain_introduced(req: Request) -> bytes:
    arg = onearg(req.frame.payload)
    if arg is None:
        raise XsError(errno.EINVAL)
    return b"T\0" if req.server.domains.is_introduced(c_atoi(arg)) else b"F\0"


def op_introduce(req: Request) -> bytes:
    strings = get_strings(req.frame.payload)
    if len(strings) < 3:
        raise XsError(errno.EINVAL)
    domid = c_atoi(strings[0])
    if c_atoi(strings[2]) == 0:  # the event channel port; the gfn is ignored
        raise XsError(errno.EINVAL)
    req.server.introduce(domid)
    return OK


def _introduced_arg(req: Request) -> int:
    arg = onearg(req.frame.payload)
    if arg is None:
        raise XsError(errno.EINVAL)
    domid = c_atoi(arg)
    if domid == 0:
        raise XsError(errno.EINVAL)
    if domid not in req.server.domains.introduced:
        raise XsError(errno.ENOENT)
    return domid


def op_release(req: Request) -> bytes:
    req.server.release(_introduced_arg(req))
    return OK


def op_resume(req: Request) -> bytes:
    _introduced_arg(req)
    return OK


def op_set_target(req: Request) -> bytes:
    strings = get_strings(req.frame.payload)
    if len(strings) < 2:
        raise XsError(errno.EINVAL)
    domid, target = c_atoi(strings[0]), c_atoi(strings[1])
    for d in (domid, target):
        if d not in req.server.domains.introduced:
            raise XsError(errno.ENOENT)
    req.server.domains.targets[domid] = target
    return OK


def op_control(req: Request) -> bytes:
    """A few CONTROL commands; `fail-commits N` is ours: the next N commits fail with EAGAIN
    (deterministic fault injection for retry loops); so is `drop-watching TOKEN`: every other
    connection with a watch of that token is dropped, as when a daemon goes away under a watcher
    (the warm server's sharing table must then fall back to the walk)."""
    strings = get_strings(req.frame.payload)
    if not strings:
        raise XsError(errno.EINVAL)
    cmd, args = strings[0], strings[1:]
    if cmd == b"help":
        return b"help\nfail-commits <n>\ndrop-watching <token>\n\0"
    if cmd == b"drop-watching" and len(args) == 1:
        req.server.doomed.update(
            conn.conn_id
            for conn in req.server.connections.values()
            if conn is not req.conn and any(w.token == args[0] for w in conn.watches)
        )
        return OK
    if cmd == b"fail-commits" and len(args) == 1:
        count = uint_or_none(args[0].decode("latin-1"), maximum=1 << 20)
        if count is not None:
            req.server.forced_eagain = count
            return OK
    raise XsError(errno.EINVAL)


Handler = Callable[[Request], bytes]

#: type -> (handler, privileged only, ignores tx_id), as `wire_funcs[]` of the C daemon.
HANDLERS: dict[int, tuple[Handler, bool, bool]] = {
    Op.CONTROL: (op_control, True, False),
    Op.DIRECTORY: (op_directory, False, False),
    Op.READ: (op_read, False, False),
    Op.GET_PERMS: (op_get_perms, False, False),
    Op.WATCH: (op_watch, False, True),
    Op.UNWATCH: (op_unwatch, False, True),
    Op.TRANSACTION_START: (op_transaction_start, False, False),
    Op.TRANSACTION_END: (op_transaction_end, False, False),
    Op.INTRODUCE: (op_introduce, True, False),
    Op.RELEASE: (op_release, True, False),
    Op.GET_DOMAIN_PATH: (op_get_domain_path, False, False),
    Op.WRITE: (op_write, False, False),
    Op.MKDIR: (op_mkdir, False, False),
    Op.RM: (op_rm, False, False),
    Op.SET_PERMS: (op_set_perms, False, False),
    Op.IS_DOMAIN_INTRODUCED: (op_is_domain_introduced, True, False),
    Op.RESUME: (op_resume, True, False),
    Op.SET_TARGET: (op_set_target, True, False),
    Op.RESET_WATCHES: (op_reset_watches, False, False),
    Op.DIRECTORY_PART: (op_directory_part, False, False),
}
