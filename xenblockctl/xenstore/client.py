"""The xenstore client every layer uses: str at the edges, typed errors, a deadline on everything.

    with XenStore.connect() as store:
        store.write("backend/vbd/5/51712/physical-device", "7:0")
        state = store.run_transaction(lambda tx: tx.read("backend/vbd/5/51712/state"))

Requests are built and checked here and travel over a link (link.py): by default pyxs 0.4.1's
connection classes and reply-matching reader thread (transport.py), which lets threads share a
connection; `connect(synchronous=True)` gives a thread-free link on one socket for one-shot,
one-thread callers like the block script (synchronous.py). Not `pyxs.Client`: its request path
waits without a timeout, rejects empty values (0.4.1) and non-ASCII bytes, and returns False
instead of raising on a transaction conflict (xenstore-for-tests.md §4.3).

Relative paths are sent as they are (C xenstored resolves them against /local/domain/0 on a
socket). oxenstored and docs/misc/xenstore.txt disagree about relative paths over a socket, so
code that may meet either daemon should pass them through `store.absolute()` first.

A XenStore on the default (threaded) link may be used from several threads: requests are matched
to replies by id. A synchronous one belongs to one thread.
"""

from __future__ import annotations

import _thread
import errno
import time

from xenblockctl import backoff
from xenblockctl.xenstore import wire
from xenblockctl.xenstore.endpoints import Endpoint, connect_first, default_endpoints, endpoint_for
from xenblockctl.xenstore.errors import (
    TransactionConflict,
    XenstoreDisconnected,
    XenstoreError,
    XenstoreInvalid,
    XenstoreNoEntry,
    XenstoreTimeout,
    XenstoreTooBig,
    errno_from_name,
    error_for,
)
from xenblockctl.xenstore.link import Link, LinkLost, LinkSendFailed, LinkTimeout
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import (
    check_path,
    check_paths,
    check_token,
    check_watch_path,
    decode_value,
    encode_value,
    join,
)
from xenblockctl.xenstore.wire import DIRECTORY_PART, PAYLOAD_MAX, RESET_WATCHES, error_reply_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from types import TracebackType
    from typing import NoReturn, TypeVar

    from xenblockctl.xenstore.perms import Perm

    T = TypeVar("T")

#: Default per-request deadline. libxl kills a hotplug script after 40 s; a healthy daemon
#: answers in well under a millisecond.
DEFAULT_TIMEOUT = 10.0
#: run_transaction's default number of attempts. Conflicts are normal (blkback, libxl and the
#: engine create siblings under the same backend directory); 16 tries with the backoff below
#: give up after well under a second of contention instead of looping forever.
DEFAULT_ATTEMPTS = 16
_BACKOFF_FIRST = 0.001
_BACKOFF_CAP = 0.05

_NUL = b"\0"
#: Restarts of a multi-part listing when the directory changes underneath.
_PART_RESTARTS = 8
#: What XenStore.stream sends, and how its errors name each request.
_STREAM_OPS = {wire.READ: "read", wire.DIRECTORY: "directory"}


class WatchEvent(tuple[str, str]):
    """A fired watch `(path, token)`: the path that changed (or the watched path itself at
    registration). A tuple built without typing.NamedTuple (the class build costs ~0.2-0.4 ms at
    every hotplug start)."""

    __slots__ = ()

    def __new__(cls, path: str, token: str) -> WatchEvent:
        return tuple.__new__(cls, (path, token))

    @property
    def path(self) -> str:
        return self[0]

    @property
    def token(self) -> str:
        return self[1]

    def __repr__(self) -> str:
        return f"WatchEvent(path={self[0]!r}, token={self[1]!r})"


def _request_id(number: int) -> int:
    """The `number`th request's id: 1 .. 2**32 - 1, then 1 again. The header's req_id is 32 bits,
    and a long-lived connection (the engine's) passes 2**32 requests in weeks of busy guests: an
    id past it failed the header's pack, and with it the link. 0 is left out (watch events carry
    it). Ids repeat only after 4 billion requests, never among the few outstanding at once."""
    return number % 0xFFFFFFFF + 1


def _arg(text: str) -> bytes:
    # Paths and tokens were validated to ASCII before we get here.
    return text.encode("ascii") + _NUL


def _ok(payload: bytes, what: str) -> None:
    if payload.rstrip(_NUL) != b"OK":
        raise XenstoreDisconnected(f"{what}: unexpected reply {payload[:40]!r}")


def _write_payload(path: str, value: bytes) -> bytes:
    check_path(path)
    payload = _arg(path) + value
    if len(payload) > PAYLOAD_MAX:
        raise XenstoreTooBig(
            f"write {path}: value of {len(value)} bytes exceeds the {PAYLOAD_MAX}-byte payload limit",
            errno=errno.E2BIG,
        )
    return payload


def _batch_error(reply: bytes | XenstoreError, what: str) -> XenstoreError | None:
    """The error of one batched request that must answer OK (watch, unwatch), else None."""
    if isinstance(reply, XenstoreError):
        return reply
    if reply.rstrip(_NUL) != b"OK":
        return XenstoreDisconnected(f"{what}: unexpected reply {reply[:40]!r}")
    return None


def _split_list(payload: bytes) -> list[str]:
    """DIRECTORY / GET_PERMS replies: NUL-terminated strings; an empty list is an empty payload."""
    if not payload:
        return []
    # One decode for the whole listing: NUL is one byte in UTF-8 and ends any unfinished
    # sequence, so this equals decoding each name (tests/xenstore/test_walk_codec.py).
    return decode_value(payload.rstrip(_NUL)).split("\0")


class _Operations:
    """Node operations shared by the store (tx 0) and a transaction (its id)."""

    _tx_id: int

    def _request(self, op: int, payload: bytes, what: str) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _request_many(
        self, requests: Sequence[tuple[int, bytes, str]]
    ) -> list[bytes | XenstoreError]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- reads ------------------------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        check_path(path)
        return self._request(wire.READ, _arg(path), f"read {path}")

    def read(self, path: str) -> str:
        """The node's value; XenstoreNoEntry (errno ENOENT) when it does not exist."""
        return decode_value(self.read_bytes(path))

    def read_optional(self, path: str) -> str | None:
        try:
            return self.read(path)
        except XenstoreNoEntry:
            return None

    def exists(self, path: str) -> bool:
        return self.read_optional(path) is not None

    def read_many(self, paths: Sequence[str]) -> list[str | None]:
        """The values of several nodes, None where a node does not exist. Every request is sent
        before the first reply is awaited, so on a socket N reads cost one round trip instead of
        N. Like single reads, they are a consistent snapshot only inside a transaction."""
        for path in paths:
            check_path(path)
        return _read_values(self._request_many([(wire.READ, _arg(path), f"read {path}") for path in paths]))

    def ls(self, path: str) -> list[str]:
        """Names (not paths) of the node's children, in the daemon's (creation) order. Lists
        longer than one 4096-byte reply are fetched in parts (DIRECTORY_PART)."""
        check_path(path)
        try:
            return _split_list(self._request(wire.DIRECTORY, _arg(path), f"directory {path}"))
        except XenstoreTooBig:
            return self._ls_parts(path)

    def ls_many(self, paths: Sequence[str]) -> list[list[str] | None]:
        """The children of several nodes, None where a node does not exist: every request sent
        before the first reply is awaited, as read_many, so N listings cost one round trip. A list
        too long for one reply is fetched in parts afterwards, as ls does."""
        for path in paths:
            check_path(path)
        replies = self._request_many([(wire.DIRECTORY, _arg(path), f"directory {path}") for path in paths])
        lists: list[list[str] | None] = []
        for path, reply in zip(paths, replies, strict=True):
            if isinstance(reply, XenstoreNoEntry):
                lists.append(None)
            elif isinstance(reply, XenstoreTooBig):
                try:
                    lists.append(self._ls_parts(path))
                except XenstoreNoEntry:
                    lists.append(None)
            elif isinstance(reply, XenstoreError):
                raise reply
            else:
                lists.append(_split_list(reply))
        return lists

    def _ls_parts(self, path: str) -> list[str]:
        what = f"directory-part {path}"
        for _ in range(_PART_RESTARTS):
            names: list[str] = []
            offset = 0
            generation: bytes | None = None
            while True:
                payload = self._request(DIRECTORY_PART, _arg(path) + _arg(str(offset)), what)
                gen, sep, rest = payload.partition(_NUL)
                if not sep or uint_or_none(gen.decode("latin-1"), maximum=(1 << 64) - 1) is None:
                    raise XenstoreDisconnected(f"{what}: malformed reply {payload[:40]!r}")
                if generation is not None and gen != generation:
                    break  # the directory changed between parts: start over
                generation = gen
                # Each part is a run of NUL-terminated names; the last one ends with an extra NUL.
                final = rest == _NUL or rest.endswith(_NUL + _NUL)
                names += _split_list(rest[:-1] if final else rest)
                if final:
                    return names
                if not rest:
                    raise XenstoreDisconnected(f"{what}: empty part before the end of the list")
                offset += len(rest)
        raise TransactionConflict(f"{what}: directory kept changing while being listed", errno=errno.EAGAIN)

    def get_perms(self, path: str) -> list[Perm]:
        from xenblockctl.xenstore.perms import Perm  # not at import: the block script never asks

        check_path(path)
        return [
            Perm.parse(p) for p in _split_list(self._request(wire.GET_PERMS, _arg(path), f"get-perms {path}"))
        ]

    # -- writes -----------------------------------------------------------------------------------

    def write_bytes(self, path: str, value: bytes) -> None:
        _ok(self._request(wire.WRITE, _write_payload(path, value), f"write {path}"), f"write {path}")

    def write(self, path: str, value: str) -> None:
        """Create or overwrite; missing parents are created with empty values. `""` is valid."""
        self.write_bytes(path, encode_value(value))

    def mkdir(self, path: str) -> None:
        """Create the node (and parents) with an empty value; no-op when it exists."""
        check_path(path)
        _ok(self._request(wire.MKDIR, _arg(path), f"mkdir {path}"), f"mkdir {path}")

    def rm(self, path: str, *, missing_ok: bool = True) -> None:
        """Remove the node and everything below it. A missing node is fine unless missing_ok is
        False; the daemon itself answers ENOENT only when the *parent* is missing too."""
        check_path(path)
        if not missing_ok and not self.exists(path):
            raise XenstoreNoEntry(f"rm {path}", errno=errno.ENOENT)
        try:
            _ok(self._request(wire.RM, _arg(path), f"rm {path}"), f"rm {path}")
        except XenstoreNoEntry:
            if not missing_ok:
                raise

    def rm_many(self, paths: Iterable[str]) -> None:
        """rm(missing_ok=True) of every path, as one batch (see write_many)."""
        self.write_many({}, remove=paths)

    def set_perms(self, path: str, perms: Sequence[Perm | str]) -> None:
        """Replace the ACL. The first entry is the owner and the default for unlisted domains."""
        from xenblockctl.xenstore.perms import coerce_perm  # not at import: the block script never sets

        check_path(path)
        parsed = [coerce_perm(p) for p in perms]
        if not parsed:
            raise XenstoreInvalid(f"set-perms {path}: the list needs at least the owner entry")
        payload = _arg(path) + b"".join(_arg(str(p)) for p in parsed)
        _ok(self._request(wire.SET_PERMS, payload, f"set-perms {path}"), f"set-perms {path}")

    def read_dir(self, path: str) -> dict[str, str]:
        """One level of children: name -> value. Consistent only inside a transaction; the store
        version runs it in one. The children are read in one batch (read_many)."""
        names = self.ls(path)
        values = self.read_many([join(path, name) for name in names])
        return {name: value for name, value in zip(names, values, strict=True) if value is not None}

    def write_many(self, items: Mapping[str, str], *, remove: Iterable[str] = ()) -> None:
        """Write every item, then remove every path in `remove` (a missing node is fine), sent as
        one batch (one round trip on a socket). All requests are sent even when one fails; the
        first failure is raised afterwards, so use it inside a transaction (the store version
        runs it in one) where a failure aborts all of them."""
        requests, first_rm = _write_requests(items, remove)
        if not requests:
            return
        failure = _first_write_failure(requests, self._request_many(requests), first_rm)
        if failure is not None:
            raise failure


def _write_requests(
    items: Mapping[str, str], remove: Iterable[str]
) -> tuple[list[tuple[int, bytes, str]], int]:
    """The WRITE requests of `items`, then the RM requests of `remove`; and where the RMs start."""
    requests = [
        (wire.WRITE, _write_payload(path, encode_value(value)), f"write {path}")
        for path, value in items.items()
    ]
    first_rm = len(requests)
    for path in remove:
        check_path(path)
        requests.append((wire.RM, _arg(path), f"rm {path}"))
    return requests, first_rm


def _error_reply(payload: bytes, what: str) -> XenstoreError:
    """The XenstoreError an ERROR reply reports."""
    name = error_reply_name(payload)
    num = errno_from_name(name)
    return error_for(num, what if num is not None else f"{what}: xenstored error {name!r}")


def _cause(exc: LinkTimeout | LinkLost | LinkSendFailed) -> BaseException | None:
    """What a link failure's XenstoreError is chained to: a failed send's OSError, else nothing."""
    return exc if isinstance(exc, LinkSendFailed) else None


def _read_values(replies: Sequence[bytes | XenstoreError]) -> list[str | None]:
    """READ replies as values: None for a missing node, any other error raised."""
    values: list[str | None] = []
    for reply in replies:
        if isinstance(reply, XenstoreNoEntry):
            values.append(None)
        elif isinstance(reply, XenstoreError):
            raise reply
        else:
            values.append(decode_value(reply))
    return values


def _first_write_failure(
    requests: list[tuple[int, bytes, str]], replies: Sequence[bytes | XenstoreError], first_rm: int
) -> XenstoreError | None:
    for i, reply in enumerate(replies):
        if isinstance(reply, XenstoreNoEntry) and i >= first_rm:
            continue  # rm of a node that is already gone: what rm(missing_ok=True) accepts
        if isinstance(reply, XenstoreError):
            return reply
        try:
            _ok(reply, requests[i][2])
        except XenstoreError as exc:
            return exc
    return None


class Transaction(_Operations):
    """One xenstore transaction. Reads see its own writes; nothing is visible to others (and no
    watch fires) until commit. Use as a context manager: commit on clean exit, abort on error."""

    def __init__(self, store: XenStore, tx_id: int) -> None:
        self._store = store
        self._tx_id = tx_id
        self._open = True

    @property
    def id(self) -> int:
        return self._tx_id

    @property
    def is_open(self) -> bool:
        return self._open

    def _request(self, op: int, payload: bytes, what: str) -> bytes:
        if not self._open:
            raise XenstoreInvalid(f"{what}: transaction {self._tx_id} already ended")
        return self._store._send(op, payload, self._tx_id, what)

    def _request_many(self, requests: Sequence[tuple[int, bytes, str]]) -> list[bytes | XenstoreError]:
        if not self._open:
            raise XenstoreInvalid(f"{requests[0][2] if requests else 'batch'}: transaction already ended")
        return self._store._send_many(requests, self._tx_id)

    def read_many_then_write(
        self, paths: Sequence[str], items: Mapping[str, str], *, remove: Iterable[str] = ()
    ) -> tuple[list[str | None], XenstoreError | None]:
        """read_many(paths), then write_many(items, remove=remove), in one batch (one round trip):
        a guarded write whose guard is read in the same transaction. Nothing written is visible
        before commit, so a caller whose reads refuse the writes raises, and the transaction's
        abort discards them, as if they had never been sent. Returns the values (as read_many)
        and the first write failure, not raised, so the caller's refusal takes precedence."""
        for path in paths:
            check_path(path)
        requests, first_rm = _write_requests(items, remove)
        reads = [(wire.READ, _arg(path), f"read {path}") for path in paths]
        replies = self._request_many(reads + requests)
        values = _read_values(replies[: len(reads)])
        return values, _first_write_failure(requests, replies[len(reads) :], first_rm)

    def commit(self) -> None:
        """Raises TransactionConflict (EAGAIN) when another writer got in between; the
        transaction is over either way."""
        self._end(b"T")

    def abort(self) -> None:
        self._end(b"F")

    def _end(self, flag: bytes) -> None:
        if not self._open:
            raise XenstoreInvalid(f"transaction {self._tx_id} already ended")
        what = f"transaction-end {flag.decode()} {self._tx_id}"
        # Whatever the outcome, the daemon no longer knows this id (or the connection is gone).
        self._open = False
        _ok(self._store._send(wire.TRANSACTION_END, flag + _NUL, self._tx_id, what), what)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._open:
            return
        if exc_type is None:
            self.commit()
            return
        # Best effort: the original exception matters more than a failed abort, and a lost
        # connection ends the transaction on the daemon's side anyway.
        try:  # noqa: SIM105 (contextlib is kept off the hotplug path's imports)
            self.abort()
        except XenstoreError:
            pass


class XenStore(_Operations):
    """A connection to xenstored. Create with `XenStore.connect()`; close (or use `with`)."""

    def __init__(self, link: Link, endpoint: Endpoint, timeout: float, domid: int | None) -> None:
        self._link: Link | None = link
        self.endpoint = endpoint
        self.timeout = timeout
        self._tx_id = 0
        # Request numbers from a range's iterator, whose next() is as atomic under the GIL as
        # itertools.count's (a store may be shared by threads), without importing itertools,
        # ~0.06 ms of every hotplug start for this one counter (bench/README.md, issue 18 rm18).
        # Each becomes a request id through _request_id: the header's field is 32 bits.
        self._ids = iter(range(1 << 62))  # never exhausted
        self._watch_tokens: dict[str, int] = {}
        #: `_thread`'s lock: `threading` is not needed for it (and not imported on the hotplug path).
        self._watch_lock = _thread.allocate_lock()
        self._domid = domid
        self._home: str | None = None
        #: Requests outside any transaction that nothing waits for (unwatch_many(later=True)): sent
        #: at the head of this connection's next batch, so they cost no round trip of their own.
        self._later: list[tuple[int, bytes, str]] = []
        #: Optional absolute time.monotonic() after which every request fails with
        #: XenstoreTimeout: a whole-script budget on top of the per-request `timeout` (libxl
        #: SIGKILLs a hotplug script at 40 s; leave time to report the error).
        self.deadline: float | None = None

    @classmethod
    def connect(
        cls,
        path: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        domid: int | None = None,
        deadline: float | None = None,
        env: Mapping[str, str] | None = None,
        synchronous: bool = False,
    ) -> XenStore:
        """Connect like libxenstore: `path` if given (socket, or a xenbus character device), else
        `$XENSTORED_PATH`, else `$XENSTORED_RUNDIR/socket`, else `/run/xenstored/socket`, then
        `/dev/xen/xenbus`. `timeout` bounds each request (and the connect); `deadline` (absolute
        `time.monotonic()`) bounds everything, see `XenStore.deadline`. `domid` is our own domain
        id if the caller knows it (see `absolute`). `env`: the variables the default endpoints
        come from (the caller's environment object; os.environ when not given).
        `synchronous=True`: no reader thread, for one-shot, one-thread callers (link.py); the
        store must then stay on the calling thread.
        """
        if timeout <= 0:
            raise XenstoreInvalid(f"timeout must be positive, not {timeout}")
        budget = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if budget <= 0:
            raise XenstoreTimeout("connect: overall deadline already passed", errno=errno.ETIMEDOUT)
        endpoints = [endpoint_for(path)] if path is not None else default_endpoints(env)
        if synchronous:
            from xenblockctl.xenstore.synchronous import open_link
        else:
            from xenblockctl.xenstore.transport import open_link  # type: ignore[assignment]
        link, endpoint = connect_first(endpoints, budget, open_link)
        store = cls(link, endpoint, timeout, domid)
        store.deadline = deadline
        return store

    def _request_deadline(self, what: str) -> tuple[float, bool]:
        """When the reply must have arrived, and whether that is the overall deadline (True) or
        the per-request timeout. A flag, not the limit's description: that is formatted only for
        a timeout (_link_failure), as every batch of an add asks for a deadline and the first
        float formatting of a process costs ~8 us of CPU (work18, bench/README.md issue 18)."""
        now = time.monotonic()
        if self.deadline is None or self.deadline > now + self.timeout:
            return now + self.timeout, False
        if self.deadline <= now:
            raise XenstoreTimeout(f"{what}: overall deadline passed", errno=errno.ETIMEDOUT)
        return self.deadline, True

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._link is None or self._link.closed

    def close(self) -> None:
        self._later.clear()  # the daemon drops a closed connection's watches itself
        link, self._link = self._link, None
        if link is not None:
            link.close(min(self.timeout, 2.0))

    def __enter__(self) -> XenStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"XenStore({self.endpoint}, {'closed' if self.closed else 'open'})"

    # -- the one request path ---------------------------------------------------------------------

    def _request(self, op: int, payload: bytes, what: str) -> bytes:
        return self._send(op, payload, 0, what)

    def _send(self, op: int, payload: bytes, tx_id: int, what: str) -> bytes:
        reply = self._send_many([(op, payload, what)], tx_id)[0]
        if isinstance(reply, XenstoreError):
            raise reply
        return reply

    def _request_many(self, requests: Sequence[tuple[int, bytes, str]]) -> list[bytes | XenstoreError]:
        return self._send_many(requests, 0)

    def _send_many(
        self, requests: Sequence[tuple[int, bytes, str]], tx_id: int
    ) -> list[bytes | XenstoreError]:
        """Send every request, then collect the replies in order: on a socket a pipeline, so a
        batch costs one round trip (the link matches replies by id). An error reply comes back as
        its XenstoreError, not raised, so the caller decides (rm of a missing node, a read that may
        fail); a timeout, a lost connection or a mismatched reply raises, since nothing on the
        connection can be trusted after those."""
        link = self._link
        first = requests[0][2] if requests else "batch"
        if link is None:
            raise XenstoreDisconnected(f"{first}: connection already closed")
        for _op, payload, what in requests:
            if len(payload) > PAYLOAD_MAX:
                raise XenstoreTooBig(
                    f"{what}: request of {len(payload)} bytes exceeds {PAYLOAD_MAX}", errno=errno.E2BIG
                )
        deadline, overall = self._request_deadline(first)
        later, self._later = self._later, []
        sent = [*later, *requests]
        try:
            frames = link.exchange(
                [(op, _request_id(next(self._ids)), 0, payload) for op, payload, _what in later]
                + [(op, _request_id(next(self._ids)), tx_id, payload) for op, payload, _what in requests],
                deadline,
            )
        except (LinkTimeout, LinkLost, LinkSendFailed) as exc:
            raise self._link_failure(exc, sent[exc.index][2], overall) from _cause(exc)
        for (op, _payload, what), reply in zip(later, frames, strict=False):
            self._result(op, what, 0, reply)  # a refusal is dropped (unwatch_many); a mismatch raises
        return [
            self._result(op, what, tx_id, reply)
            for (op, _payload, what), reply in zip(requests, frames[len(later) :], strict=True)
        ]

    def stream(
        self,
        requests: Sequence[tuple[int, str]],
        follow: Callable[[list[tuple[int, str | list[str] | XenstoreError]]], Sequence[tuple[int, str]]],
    ) -> None:
        """Reads and listings (`(wire.READ | wire.DIRECTORY, path)`, outside a transaction) whose
        next requests depend on the replies: results go to `follow([(index, result), ...])` as they
        arrive (a READ's value, a DIRECTORY's names, or the XenstoreError the daemon answered,
        e.g. XenstoreNoEntry; XenstoreTooBig for a listing longer than one reply, which the caller
        lists with ls), `index` counting every request in the order made (`requests` first, then
        what `follow` returned, in the order it returned them); the requests `follow` returns
        are sent at once. On a socket the daemon gets a listing's reads while it still answers
        the other listings (Link.exchange_stream). Results come in each connection's order, not
        in `index` order. What `follow` raises is raised once every request sent is answered."""
        if self._later:
            self._send_many([], 0)  # a stream sends only reads and listings: the queued go first
        link = self._link
        first = f"{_STREAM_OPS.get(requests[0][0], 'request')} {requests[0][1]}" if requests else "stream"
        if link is None:
            raise XenstoreDisconnected(f"{first}: connection already closed")
        made: list[tuple[int, str]] = []
        ids = self._ids

        def numbered(batch: Sequence[tuple[int, str]]) -> list[tuple[int, int, int, bytes]]:
            # The paths are checked in one pass when all are valid (paths.check_paths), and the
            # ops as a set: both run for every request of a 128-backend walk (issue 18 round 8).
            if not _STREAM_OPS.keys() >= {op for op, _path in batch}:
                for op, path in batch:  # the first bad request raises, as one by one
                    if op not in _STREAM_OPS:
                        raise XenstoreInvalid(f"stream: request type {op} is not a read or a listing")
                    check_path(path)
            check_paths([path for _op, path in batch])
            made.extend(batch)
            return [(op, _request_id(next(ids)), 0, _arg(path)) for op, path in batch]

        def on_replies(arrived: list[tuple[int, wire.Frame]]) -> list[tuple[int, int, int, bytes]]:
            results: list[tuple[int, str | list[str] | XenstoreError]] = []
            for index, reply in arrived:
                op, path = made[index]
                if reply.type == op and not reply.tx_id:  # the usual case first
                    value = decode_value(reply.payload) if op == wire.READ else _split_list(reply.payload)
                    results.append((index, value))
                elif reply.type == wire.ERROR:
                    results.append((index, _error_reply(reply.payload, f"{_STREAM_OPS[op]} {path}")))
                else:
                    self._mismatch(f"{_STREAM_OPS[op]} {path}", reply)
            return numbered(follow(results))

        deadline, overall = self._request_deadline(first)
        try:
            link.exchange_stream(numbered(requests), on_replies, deadline)
        except (LinkTimeout, LinkLost, LinkSendFailed) as exc:
            op, path = made[exc.index]
            raise self._link_failure(exc, f"{_STREAM_OPS[op]} {path}", overall) from _cause(exc)

    def _result(self, op: int, what: str, tx_id: int, reply: wire.Frame) -> bytes | XenstoreError:
        """A reply's payload, or the XenstoreError it reports."""
        if reply.type == wire.ERROR:
            return _error_reply(reply.payload, what)
        if reply.type != op or reply.tx_id != tx_id:
            self._mismatch(what, reply)
        return reply.payload

    def _mismatch(self, what: str, reply: wire.Frame) -> NoReturn:
        """A reply of another type or transaction: the connection's stream position is unknown,
        so it is dropped."""
        self._abandon()
        raise XenstoreDisconnected(f"{what}: reply of type {reply.type} tx {reply.tx_id} does not match")

    def _link_failure(
        self, exc: LinkTimeout | LinkLost | LinkSendFailed, what: str, overall: bool
    ) -> XenstoreError:
        """The XenstoreError for a failed exchange; after a timeout or a failed send the stream
        position is unknown (the request may still be applied later), so the connection goes."""
        if isinstance(exc, LinkTimeout):
            self._abandon()
            limit = "the overall deadline" if overall else f"{self.timeout:g} s"
            return XenstoreTimeout(f"{what}: no reply within {limit}", errno=errno.ETIMEDOUT)
        if isinstance(exc, LinkLost):
            return XenstoreDisconnected(f"{what}: {exc.reason}", errno=errno.ECONNRESET)
        self._abandon()
        return XenstoreDisconnected(f"{what}: send failed: {exc.reason}")

    def _abandon(self) -> None:
        """After a timeout or protocol confusion the stream position is unknown: drop it."""
        link, self._link = self._link, None
        if link is not None:
            link.close(0.5)

    # -- transactions -----------------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """Start a transaction (one attempt). `with store.transaction() as tx:` commits on clean
        exit, aborts on exception, and raises TransactionConflict when the commit hits EAGAIN."""
        payload = self._send(wire.TRANSACTION_START, _NUL, 0, "transaction-start")
        text = payload.rstrip(_NUL)
        tx_id = uint_or_none(text.decode("latin-1"), maximum=0xFFFFFFFF)
        if not tx_id:
            raise XenstoreDisconnected(f"transaction-start: bad transaction id {text[:20]!r}")
        return Transaction(self, tx_id)

    def run_transaction(self, fn: Callable[[Transaction], T], *, attempts: int = DEFAULT_ATTEMPTS) -> T:
        """Run `fn(tx)` in a transaction and commit; on EAGAIN (at commit or from any request)
        re-run the whole of `fn` (at once the first time, then after a short jittered backoff), at
        most `attempts` times. `fn` must therefore only read and write through `tx` and decide from
        what it read. The transaction is always ended: committed, or aborted when `fn` raises."""
        if attempts < 1:
            raise XenstoreInvalid(f"attempts must be >= 1, not {attempts}")
        for attempt in range(attempts):
            try:
                with self.transaction() as tx:
                    result = fn(tx)
            except TransactionConflict:
                if attempt + 1 == attempts:
                    raise TransactionConflict(
                        f"transaction still conflicting after {attempts} attempts", errno=errno.EAGAIN
                    ) from None
                if attempt == 0:
                    # A conflict is another transaction's commit (progress): the first retry goes at
                    # once, as the floor script's do (bench/README.md, issue 18's parallel adds).
                    continue
                pause = backoff.fraction() * min(_BACKOFF_CAP, _BACKOFF_FIRST * 2.0**attempt)
                if self.deadline is not None:
                    pause = min(pause, max(0.0, self.deadline - time.monotonic()))
                time.sleep(pause)
                continue
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def read_dir(self, path: str) -> dict[str, str]:
        """One level of children (name -> value), read consistently in one transaction."""
        return self.run_transaction(lambda tx: tx.read_dir(path))

    def write_many(self, items: Mapping[str, str], *, remove: Iterable[str] = ()) -> None:
        """All writes (and removals) in one transaction (what `xenstore-write a 1 b 2` does)."""
        removals = list(remove)
        self.run_transaction(lambda tx: tx.write_many(items, remove=removals))

    # -- domains and paths ------------------------------------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        return decode_value(
            self._request(wire.GET_DOMAIN_PATH, _arg(str(_domid(domid))), f"get-domain-path {domid}").rstrip(
                _NUL
            )
        )

    def own_domid(self) -> int:
        """Our domain id: as given to connect(); 0 over a socket (every xenstored treats socket
        connections as dom0); over xenbus the `domid` node the toolstack writes in our home."""
        if self._domid is None:
            if self.endpoint.kind == "socket":
                self._domid = 0
            else:
                text = self.read("domid")
                value = uint_or_none(text, maximum=0xFFFF)
                if value is None:
                    raise XenstoreInvalid(f"own domid node holds {text[:20]!r}")
                self._domid = _domid(value)
        return self._domid

    def home(self) -> str:
        """`/local/domain/<own domid>`, as the daemon reports it."""
        if self._home is None:
            self._home = self.get_domain_path(self.own_domid())
        return self._home

    def home_and_read_many(self, paths: Sequence[str]) -> tuple[str, list[str | None]]:
        """home() and read_many(paths), in one batch (one round trip) while home is not known yet.
        Relative `paths` name the nodes absolute() would: the daemon resolves them against our
        home, the domain path of this connection's domain."""
        if self._home is not None:
            return self._home, self.read_many(paths)
        domid = _domid(self.own_domid())
        for path in paths:
            check_path(path)
        replies = self._request_many(
            [(wire.GET_DOMAIN_PATH, _arg(str(domid)), f"get-domain-path {domid}")]
            + [(wire.READ, _arg(path), f"read {path}") for path in paths]
        )
        if isinstance(replies[0], XenstoreError):
            raise replies[0]
        self._home = decode_value(replies[0].rstrip(_NUL))
        return self._home, _read_values(replies[1:])

    def absolute(self, path: str) -> str:
        """`path` made absolute against our home, e.g. XENBUS_PATH `backend/vbd/5/51712` ->
        `/local/domain/0/backend/vbd/5/51712`. Absolute paths are returned unchanged."""
        check_path(path)
        return path if path.startswith("/") else join(self.home(), path)

    def control(self, *words: str) -> str:
        """XS_CONTROL (privileged): the daemon's answer as text, trailing NULs stripped. `help`
        lists a C xenstored's commands (the warm server's sharing table tells daemons apart by it)."""
        for word in words:
            if not word.isascii() or "\0" in word:
                raise XenstoreInvalid(f"control word {word[:40]!r} is not ASCII without NUL")
        what = f"control {' '.join(words)}"
        return decode_value(self._request(wire.CONTROL, b"".join(_arg(w) for w in words), what).rstrip(_NUL))

    def introduce_domain(self, domid: int, gfn: int, evtchn: int) -> None:
        what = f"introduce {domid}"
        payload = b"".join(_arg(str(v)) for v in (_domid(domid), gfn, evtchn))
        _ok(self._request(wire.INTRODUCE, payload, what), what)

    def release_domain(self, domid: int) -> None:
        what = f"release {domid}"
        _ok(self._request(wire.RELEASE, _arg(str(_domid(domid))), what), what)

    def is_domain_introduced(self, domid: int) -> bool:
        what = f"is-domain-introduced {domid}"
        answer = self._request(wire.IS_DOMAIN_INTRODUCED, _arg(str(_domid(domid))), what).rstrip(_NUL)
        if answer not in (b"T", b"F"):
            raise XenstoreDisconnected(f"{what}: unexpected reply {answer[:20]!r}")
        return answer == b"T"

    # -- watches ----------------------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        """Watch `path` and everything below it. xenstored fires one event for `path` right away
        (whether or not it exists); later events name the node that changed.

        Events are hints to re-read, not a change log: C xenstored drops an event identical
        (path and token) to one still queued for the connection, so N changes may arrive as
        fewer events. React by reading the current state."""
        check_watch_path(path)
        check_token(token)
        self._subscribe(token)
        try:
            what = f"watch {path} {token}"
            _ok(self._request(wire.WATCH, _arg(path) + _arg(token), what), what)
        except BaseException:
            self._unsubscribe(token)
            raise

    def unwatch(self, path: str, token: str) -> None:
        check_watch_path(path)
        check_token(token)
        what = f"unwatch {path} {token}"
        _ok(self._request(wire.UNWATCH, _arg(path) + _arg(token), what), what)
        self._unsubscribe(token)

    def watch_many(
        self, paths: Sequence[str], token: str, *, then_read: Sequence[str] = ()
    ) -> list[str | None]:
        """watch() of several paths under one token, sent as one batch (one round trip). If any
        is refused, the ones that were set are removed again before the first error is raised.

        `then_read`: nodes read in the same batch, after the watches are set (the daemon handles a
        connection's requests in order), so any later change to them fires an event: what a
        wait for a change reads first, without a round trip of its own. Their values (None where
        missing) are returned; a read's error is raised once the watches stand."""
        for path in paths:
            check_watch_path(path)
        check_token(token)
        for path in then_read:
            check_path(path)
        for _ in paths:
            self._subscribe(token)
        try:
            replies = self._send_many(
                [(wire.WATCH, _arg(path) + _arg(token), f"watch {path} {token}") for path in paths]
                + [(wire.READ, _arg(path), f"read {path}") for path in then_read],
                0,
            )
        except BaseException:
            for _ in paths:
                self._unsubscribe(token)
            raise
        errors = [
            _batch_error(reply, f"watch {path} {token}") for path, reply in zip(paths, replies, strict=False)
        ]
        if not any(errors):
            return _read_values(replies[len(paths) :])
        for _ in (error for error in errors if error is not None):
            self._unsubscribe(token)
        try:  # noqa: SIM105 (contextlib is kept off the hotplug path's imports)
            self.unwatch_many(
                [path for path, error in zip(paths, errors, strict=True) if error is None], token
            )
        except XenstoreError:
            pass
        raise next(error for error in errors if error is not None)

    def unwatch_many(self, paths: Sequence[str], token: str, *, later: bool = False) -> None:
        """unwatch() of several paths under one token, sent as one batch; every one is tried, then
        the first failure is raised.

        `later`: for a caller that would ignore a failure anyway, and whose connection goes on to
        another request or ends (which drops its watches): the unwatches are queued and sent at
        the head of the connection's next batch, one round trip fewer (the hand-off's, before add
        marks the backend connected: bench/README.md, issue 18, session 14). The token is
        unsubscribed now, so no event of it is delivered from here on; a refusal is dropped."""
        for path in paths:
            check_watch_path(path)
        check_token(token)
        if not paths:
            return
        requests = [(wire.UNWATCH, _arg(path) + _arg(token), f"unwatch {path} {token}") for path in paths]
        if later:
            for _ in paths:
                self._unsubscribe(token)
            self._later.extend(requests)
            return
        replies = self._send_many(requests, 0)
        errors = [
            _batch_error(reply, f"unwatch {path} {token}") for path, reply in zip(paths, replies, strict=True)
        ]
        for _ in (error for error in errors if error is None):
            self._unsubscribe(token)
        for error in errors:
            if error is not None:
                raise error

    def wait_watch(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event of any watch of this connection, or None after `timeout` seconds
        (`None` = the store's timeout). Raises XenstoreDisconnected if the connection is gone."""
        wait = self.timeout if timeout is None else max(timeout, 0.0)
        if self.deadline is not None:
            wait = min(wait, max(0.0, self.deadline - time.monotonic()))
        link = self._link
        if link is None:
            raise XenstoreDisconnected("wait-watch: connection closed", errno=errno.ECONNRESET)
        try:
            item = link.next_event(wait)
        except LinkLost as exc:
            raise XenstoreDisconnected(f"wait-watch: {exc.reason}", errno=errno.ECONNRESET) from None
        if item is None:
            return None
        path, token = item
        return WatchEvent(decode_value(path), decode_value(token))

    def interrupt_wait(self) -> None:
        """Make a wait_watch() blocked now (in any thread), or else the next one, return None at
        once, as if its timeout had passed: a loop that waits for events can then sleep until its
        next timer instead of polling for requests from other threads. Safe from a signal
        handler. The threaded link (XenStore.connect) only."""
        link = self._link
        if link is not None:
            link.interrupt()

    def reset_watches(self) -> None:
        """Drop every watch of this connection on the daemon's side (RESET_WATCHES)."""
        _ok(self._request(RESET_WATCHES, _NUL, "reset-watches"), "reset-watches")
        link = self._link
        with self._watch_lock:
            if link is not None:
                for token in self._watch_tokens:
                    link.unsubscribe(token)
            self._watch_tokens.clear()

    def drain_watches(self) -> list[WatchEvent]:
        """Every event already queued, without waiting."""
        events: list[WatchEvent] = []
        while True:
            event = self.wait_watch(0)
            if event is None:
                return events
            events.append(event)

    def _subscribe(self, token: str) -> None:
        link = self._link
        if link is None:
            raise XenstoreDisconnected(f"watch {token}: connection already closed")
        with self._watch_lock:
            count = self._watch_tokens.get(token, 0)
            if count == 0:
                link.subscribe(token)
            self._watch_tokens[token] = count + 1

    def _unsubscribe(self, token: str) -> None:
        link = self._link
        with self._watch_lock:
            count = self._watch_tokens.get(token, 0)
            if count <= 1:
                self._watch_tokens.pop(token, None)
                if count == 1 and link is not None:
                    link.unsubscribe(token)
            else:
                self._watch_tokens[token] = count - 1


def _domid(domid: int) -> int:
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 <= domid <= 0xFFFF:
        raise XenstoreInvalid(f"domid {domid!r} out of range 0..65535")
    return domid


def all_paths(store: _Operations, top: str) -> Iterable[str]:
    """Every node under `top` (depth first, `top` included); for tests and debugging dumps."""
    yield top
    for name in store.ls(top):
        yield from all_paths(store, join(top, name))
