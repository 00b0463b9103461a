"""The warm hotplug server's sharing table: which backend publishes which physical-device, kept
current from xenstore watches, so that a block-device add in a worker does not walk every backend.

A block-device add's sharing check needs the backends whose `physical-device` names its device
(identity.backends_publishing): the walk lists and reads every vbd and vbd3 backend, ~2 requests
per backend, +1.4-1.7 ms of the daemon's work per add with 128 backends (bench/README.md, issue
18). The server (blockscript/warm.py) keeps that node of every backend instead:

  * built by one walk, with watches on `<home>/backend/vbd` and `<home>/backend/vbd3` set first;
  * an event marks what it names dirty: the kind's or a domain's directory (re-walked: an rm of a
    subtree fires once, for its root), a backend directory or its physical-device (re-read);
    events anywhere else (state, mode, a frontend's nodes) change nothing the table holds;
  * queried by a worker **after it holds the per-target lock**, over a socketpair it inherited at
    the fork: the server first sends one marker request on the watch connection, and once it is
    answered every change committed before the query has had its event read (C xenstored 4.17
    and the embedded daemon queue an event on the watcher's connection at the change, in the one
    FIFO out-queue later replies go through, and never drop a privileged connection's event but
    for one identical to an event still queued, which the queued one stands for; bench/README.md,
    issue 18, session 19). It re-reads what is dirty and answers with the entries the walk would
    find (BackendEntry), so sharing.py's rules run on them unchanged.

A table copied into the worker at the fork would miss an add of ours that took the per-target lock
first and published (two writable adds of one device): hence the query after the lock.

Whenever the table is not known good the worker walks as before: no table yet, a daemon whose order
is not proven (oxenstored holds events back in per-watch queues while replies pass; any daemon
whose CONTROL `help` is not C xenstored's or ours), the xenbus device (replies can overtake events
there), a lost or failed connection, a query for another daemon or home, a slow answer. The server
logs each change of the table's state once, with its reason; not every add.

Query (worker -> server, one SOCK_SEQPACKET message): `Q\\0<endpoint>\\0<home>\\0<skip>\\0<pd>\\0`;
answer: `T\\0` + `<kind>\\0<domid>\\0<devid>\\0` per entry, or `W\\0<reason>\\0` (walk). Both
sides parse strictly; anything else is a walk."""

from __future__ import annotations

import _socket
import posix
import time

from xenblockctl.xenstore import identity
from xenblockctl.xenstore.backends import BackendEntry, read_in_backends
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.endpoints import Endpoint
from xenblockctl.xenstore.paths import decode_value
from xenblockctl.xenstore.synchronous import DirectLink
from xenblockctl.xenstore.vbd import BACKEND_KINDS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from xenblockctl.journal import Journal

TOKEN = "xenblockctl-sharing-table"
#: Each request of the table's connection; a daemon this slow is one the worker had better walk.
XENSTORE_TIMEOUT = 2.0
#: After a failure the table is not rebuilt for this long: the adds meanwhile walk, as before.
RETRY_AFTER = 5.0
#: A worker waits this long for its answer, then walks (and says so).
QUERY_TIMEOUT = 1.0
MAX_MESSAGE = 65536
#: Daemons with a table at once (a dom0 has one; see ShareTables).
MAX_TABLES = 4
MAX_FIELD = 4096
#: C xenstored's CONTROL `help` names these (4.17: check, log, live-update, logfile, memreport,
#: print, quota, quota-soft, help); oxenstored answers `help` with nothing of the kind.
C_XENSTORED_COMMANDS = frozenset(("memreport", "quota-soft", "help"))
EMBEDDED_HELP = "help\nfail-commits <n>\ndrop-watching <token>\n"
PD = identity.PHYSICAL_DEVICE


class QueryError(Exception):
    """A query or answer not in the format above."""


def ordered_daemon(help_text: str) -> str | None:
    """Which daemon the CONTROL `help` answer names, if its event order is proven: "C xenstored",
    "embedded", else None."""
    if help_text == EMBEDDED_HELP:
        return "embedded"
    names = {line.split("\t", 1)[0] for line in help_text.split("\n") if line and not line[0].isspace()}
    return "C xenstored" if names >= C_XENSTORED_COMMANDS else None


# -- the wire between a worker and the server ----------------------------------------------------


def _fields(msg: bytes, tag: bytes) -> list[str]:
    if len(msg) > MAX_MESSAGE or not msg.endswith(b"\0"):
        raise QueryError("message too long or not NUL-terminated")
    parts = msg[:-1].split(b"\0")
    if parts[0] != tag:
        raise QueryError(f"message tagged {parts[0][:8]!r}, not {tag!r}")
    out = []
    for part in parts[1:]:
        if len(part) > MAX_FIELD:
            raise QueryError("field too long")
        try:
            out.append(part.decode("ascii"))
        except UnicodeDecodeError:
            raise QueryError("field not ASCII") from None
    return out


def encode_query(endpoint: str, home: str, skip: str, physical_device: str) -> bytes:
    return b"".join(f.encode("ascii") + b"\0" for f in ("Q", endpoint, home, skip, physical_device))


def parse_query(msg: bytes) -> tuple[str, str, str, str]:
    """(endpoint, home, skip, physical-device text); QueryError for anything else."""
    fields = _fields(msg, b"Q")
    if len(fields) != 4:
        raise QueryError(f"{len(fields)} fields, not 4")
    endpoint, home, skip, pd = fields
    if not endpoint.startswith("/") or not home.startswith("/") or home.endswith("/"):
        raise QueryError("endpoint or home not an absolute path")
    if skip and not skip.startswith(f"{home}/backend/"):
        raise QueryError("skip is not a backend of home")
    try:
        major, minor = identity.parse_physical_device(pd)
    except identity.IdentityError:
        raise QueryError(f"physical-device {pd[:40]!r} malformed") from None
    if identity.format_physical_device(major, minor) != pd:
        raise QueryError("physical-device not canonical")
    return endpoint, home, skip, pd


def encode_answer(entries: list[BackendEntry]) -> bytes:
    return b"T\0" + b"".join(f"{e.kind}\0{e.domid}\0{e.devid}\0".encode("ascii") for e in entries)


def encode_walk(reason: str) -> bytes:
    return b"W\0" + reason.encode("ascii", "replace")[:MAX_FIELD].replace(b"\0", b" ") + b"\0"


def parse_answer(msg: bytes, home: str) -> list[BackendEntry] | str:
    """The entries (paths built under `home` as the walk builds them), or the server's reason to
    walk; QueryError for anything else."""
    if msg.startswith(b"W\0"):
        fields = _fields(msg, b"W")
        if len(fields) != 1:
            raise QueryError("walk answer without one reason")
        return fields[0] or "no reason given"
    fields = _fields(msg, b"T")
    if len(fields) % 3:
        raise QueryError(f"{len(fields)} fields, not triples")
    entries = []
    for k in range(0, len(fields), 3):
        kind, domid, devid = fields[k : k + 3]
        if kind not in BACKEND_KINDS or not domid or not devid or "/" in domid + devid:
            raise QueryError(f"entry {kind!r} {domid!r} {devid!r} is not a backend")
        entries.append(BackendEntry(kind, domid, devid, f"{home}/backend/{kind}/{domid}/{devid}"))
    return entries


def ask(fd: int, endpoint: Endpoint, home: str, skip: str, devt: int) -> list[BackendEntry] | str:
    """A worker's query over its socketpair `fd`: the entries publishing `devt`, or the server's
    reason to walk; QueryError when the query itself failed (no answer in time, a broken channel,
    a malformed answer): the channel is then not to be used again."""
    pd = identity.format_physical_device(posix.major(devt), posix.minor(devt))
    sock = _socket.socket(fileno=posix.dup(fd))
    try:
        sock.settimeout(QUERY_TIMEOUT)
        sock.send(encode_query(endpoint.path, home.rstrip("/"), skip, pd))
        reply = sock.recv(MAX_MESSAGE + 1)
    except TimeoutError:
        raise QueryError(f"no answer from the server within {QUERY_TIMEOUT:g} s") from None
    except OSError as exc:
        raise QueryError(f"query failed ({exc.strerror})") from None
    finally:
        sock.close()
    if not reply:
        raise QueryError("the server closed the channel")
    return parse_answer(reply, home.rstrip("/"))


# -- the server's table -------------------------------------------------------------------------


class ShareTable:
    """Every `<home>/backend/<kind>/<domid>/<devid>/physical-device` of one daemon, with what is
    dirty. Single-threaded: the server's poll loop calls it."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.store: XenStore | None = None
        self.link: DirectLink | None = None
        self.endpoint = ""
        self.home = ""
        self.root = ""
        #: backend path -> (entry, physical-device text), for backends that have the node
        self.nodes: dict[str, tuple[BackendEntry, str]] = {}
        self.dirty_kinds: set[str] = set()
        self.dirty_domains: set[tuple[str, str]] = set()
        self.dirty_backends: set[tuple[str, str, str]] = set()
        #: why there is no table (logged once when it changes), and when to try again
        self.off: str | None = "not built yet"
        self.retry_at = 0.0
        self.syncs = 0

    # -- lifecycle

    def fileno(self) -> int:
        """The watch connection's fd for the server's poll, -1 without a table."""
        if self.link is None or self.link.closed:
            return -1
        return self.link.fileno()

    def close(self) -> None:
        """Drop the connection (also in a forked worker: closes its copies of the fds only)."""
        store, self.store, self.link = self.store, None, None
        if store is not None:
            store.close()
        self.nodes.clear()

    def _lose(self, reason: str, *, for_good: bool = False) -> str:
        """Off, said once; rebuilt RETRY_AFTER later, or never (`for_good`: the daemon's kind)."""
        self.close()
        self.retry_at = float("inf") if for_good else time.monotonic() + RETRY_AFTER
        if self.off != reason:
            self.off = reason
            until = "while this server runs" if for_good else "until it is rebuilt"
            self.journal.warning(
                f"sharing table off: {reason}; block-device adds walk every backend {until}",
                CODE="warm-sharing-off",
            )
        return reason

    def build(self, endpoint: str) -> str | None:
        """Connect to `endpoint`, check the daemon, watch, walk; None when built, else why not."""
        self.close()
        self.endpoint = endpoint
        link: DirectLink | None = None
        try:
            link = DirectLink(Endpoint("socket", endpoint), XENSTORE_TIMEOUT)
            store = XenStore(link, link.endpoint, XENSTORE_TIMEOUT, 0)
            self.store, self.link = store, link
            link = None
            try:
                daemon = ordered_daemon(store.control("help"))
            except Exception as exc:  # EACCES, EINVAL, ...: nothing proven about its order
                return self._lose(f"xenstored at {endpoint} answers no CONTROL help ({exc})")
            if daemon is None:  # a daemon does not change under a running host: never retried
                return self._lose(
                    f"xenstored at {endpoint} is neither C xenstored nor the embedded one (oxenstored?): "
                    "its watch events may lag its replies",
                    for_good=True,
                )
            self.home = store.home().rstrip("/")
            self.root = f"{self.home}/backend"
            kinds = [f"{self.root}/{kind}" for kind in BACKEND_KINDS]
            # the read after the watches is the marker: the watches' own first events come before
            # its reply, and are dropped with everything before the walk, which reads what they name
            store.watch_many(kinds, TOKEN, then_read=[kinds[0]])
            self.link_events()
            self.nodes.clear()
            self.dirty_kinds.clear()
            self.dirty_domains.clear()
            self.dirty_backends.clear()
            for entry, text in read_in_backends(store, self.home, PD):
                if text is not None:
                    self.nodes[entry.path] = (entry, text)
        except Exception as exc:
            if link is not None:
                link.close()
            return self._lose(f"cannot build it on {endpoint}: {type(exc).__name__}: {exc}")
        if self.off is not None:
            self.journal.info(
                f"sharing table built on {endpoint} ({daemon}): {len(self.nodes)} backends publish a device",
                CODE="warm-sharing-on",
            )
        self.off = None
        return None

    # -- events

    def link_events(self) -> list[str]:
        assert self.link is not None
        return [decode_value(path) for path, _token in self.link.poll_events()]

    def take_events(self) -> str | None:
        """Read what has arrived (the poll found the fd readable); None, or why the table is off."""
        if self.link is None:
            return self.off
        try:
            for path in self.link_events():
                self.note(path)
        except Exception as exc:
            return self._lose(f"watch connection lost: {type(exc).__name__}: {exc}")
        return None

    def note(self, path: str) -> None:
        """Mark what an event at `path` may have changed (module docstring)."""
        prefix = self.root + "/"
        if not path.startswith(prefix):
            return  # not ours (the watch paths are the kinds' directories)
        parts = path[len(prefix) :].split("/")
        kind = parts[0]
        if kind not in BACKEND_KINDS:
            return
        if len(parts) == 1 or "" in parts:
            self.dirty_kinds.add(kind)
        elif len(parts) == 2:
            self.dirty_domains.add((kind, parts[1]))
        elif len(parts) == 3 or parts[3] == PD:
            self.dirty_backends.add((kind, parts[1], parts[2]))

    # -- the sync

    def refresh(self) -> None:
        """Re-read what is dirty: kinds and domains re-walked, backends' physical-device re-read."""
        assert self.store is not None
        store, root, nodes = self.store, self.root, self.nodes
        kinds = tuple(k for k in BACKEND_KINDS if k in self.dirty_kinds)
        domains = sorted((k, d) for k, d in self.dirty_domains if k not in kinds)
        walked = self.dirty_domains
        backends = sorted(b for b in self.dirty_backends if b[0] not in kinds and b[:2] not in walked)
        self.dirty_kinds, self.dirty_domains, self.dirty_backends = set(), set(), set()
        gone = [f"{root}/{k}/" for k in kinds] + [f"{root}/{k}/{d}/" for k, d in domains]
        if gone:
            starts = tuple(gone)
            for path in [p for p in nodes if p.startswith(starts)]:
                del nodes[path]
        if kinds:
            for entry, text in read_in_backends(store, self.home, PD, kinds=kinds):
                if text is not None:
                    nodes[entry.path] = (entry, text)
        found: list[BackendEntry] = []
        if domains:
            listed = store.ls_many([f"{root}/{k}/{d}" for k, d in domains])
            for (k, d), devids in zip(domains, listed, strict=True):
                found += [BackendEntry(k, d, n, f"{root}/{k}/{d}/{n}") for n in devids or ()]
        found += [BackendEntry(k, d, n, f"{root}/{k}/{d}/{n}") for k, d, n in backends]
        if found:
            for entry, text in zip(found, store.read_many([f"{e.path}/{PD}" for e in found]), strict=True):
                if text is None:
                    nodes.pop(entry.path, None)
                else:
                    nodes[entry.path] = (entry, text)

    def sync(self) -> str | None:
        """Every change committed before now in the table; None, or why the table is off."""
        if self.store is None:
            return self.off
        try:
            self.store.read_optional(f"{self.root}/{BACKEND_KINDS[0]}")  # the marker
            for path in self.link_events():
                self.note(path)
            self.refresh()
        except Exception as exc:
            return self._lose(f"sync failed: {type(exc).__name__}: {exc}")
        self.syncs += 1
        return None

    def ready(self, endpoint: str, home: str) -> str | None:
        """None when the table serves queries for `endpoint` and `home`, else why not (building it
        first if it is due)."""
        if self.store is None:
            if time.monotonic() < self.retry_at:
                return self.off
            why = self.build(endpoint)
            if why is not None:
                return why
        if home != self.home:
            return f"home {home} is not the table's {self.home}"
        return None

    def publishing(self, pd: str, skip: str) -> list[BackendEntry]:
        """The entries whose physical-device is `pd`, but `skip`, kinds in the walk's order."""
        found = [entry for entry, text in self.nodes.values() if text == pd and entry.path != skip]
        found.sort(key=lambda e: BACKEND_KINDS.index(e.kind))
        return found

    def snapshot(self) -> dict[str, str]:
        """backend path -> physical-device text (tests compare it with a fresh walk)."""
        return {path: text for path, (_entry, text) in self.nodes.items()}


class ShareTables:
    """A table per xenstored a worker's add talked to: one on a dom0, but the endpoint is the
    client's (its XENSTORED_PATH), and a bench or test may run daemons side by side; at most
    MAX_TABLES, the least recently asked dropped first."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.by_endpoint: dict[str, ShareTable] = {}

    def table(self, endpoint: str) -> ShareTable:
        table = self.by_endpoint.pop(endpoint, None)
        if table is None:
            table = ShareTable(self.journal)
            while len(self.by_endpoint) >= MAX_TABLES:
                oldest = next(iter(self.by_endpoint))
                self.journal.info(f"sharing table of {oldest} dropped: {MAX_TABLES} daemons asked since")
                self.by_endpoint.pop(oldest).close()
        self.by_endpoint[endpoint] = table  # (re)inserted last: the most recently asked
        return table

    def fds(self) -> dict[int, ShareTable]:
        found = {table.fileno(): table for table in self.by_endpoint.values()}
        found.pop(-1, None)
        return found

    def close(self) -> None:
        for table in self.by_endpoint.values():
            table.close()

    def answer(self, queries: list[bytes]) -> list[bytes]:
        """One sync per daemon for every query that arrived together, then each one's answer."""
        parsed: list[tuple[str, str, str, str] | str] = []
        for msg in queries:
            try:
                parsed.append(parse_query(msg))
            except QueryError as exc:
                self.journal.warning(f"sharing table: refused a query: {exc}", CODE="warm-sharing-query")
                parsed.append(f"malformed query: {exc}")
        synced: dict[tuple[str, str], str | None] = {}
        out = []
        for item in parsed:
            if isinstance(item, str):
                out.append(encode_walk(item))
                continue
            endpoint, home, skip, pd = item
            table = self.table(endpoint)
            key = (endpoint, home)
            if key not in synced:
                why = table.ready(endpoint, home)
                synced[key] = why if why is not None else table.sync()
            why = synced[key]
            if why is not None:
                out.append(encode_walk(why))
                continue
            reply = encode_answer(table.publishing(pd, skip))
            out.append(reply if len(reply) <= MAX_MESSAGE else encode_walk("too many backends match"))
        return out


# -- the worker's side ----------------------------------------------------------------------------


def worker_query(
    fd: int, trace: Callable[[str], None] | None = None
) -> Callable[[XenStore, str, str, int], list[BackendEntry] | None]:
    """What a worker installs as sharing.TABLE: the entries from the server's table, or None (the
    caller walks). A failed query is logged (the server logs its own reasons to walk, once) and the
    channel is not used again: a late answer would otherwise answer the next query."""
    broken: list[str] = []

    def say(what: str) -> None:
        if trace is not None:
            trace(what)

    def query(store: XenStore, home: str, skip: str, devt: int) -> list[BackendEntry] | None:
        if broken:
            say(f"walk ({broken[0]})")
            return None
        if store.endpoint.kind != "socket" or not store.endpoint.path.startswith("/"):
            say(f"walk ({store.endpoint} is not a socket named by an absolute path)")
            return None
        try:
            answer = ask(fd, store.endpoint, home, skip, devt)
        except QueryError as exc:
            broken.append(str(exc))
            from xenblockctl.journal import Journal

            Journal("xenblockctl-hotplug").warning(
                f"sharing table query failed: {exc}; this add walks every backend", CODE="warm-sharing-query"
            )
            say(f"walk ({exc})")
            return None
        if isinstance(answer, str):
            say(f"walk ({answer})")
            return None
        say(f"table ({len(answer)} publishing)")
        return answer

    return query
