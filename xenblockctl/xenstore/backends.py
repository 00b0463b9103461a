"""Walking every vbd backend a domain serves: `<home>/backend/<kind>/<domid>/<devid>`.

Apart from the vbd layout (xenstore/vbd.py), which every add and remove parses: only a
block-device add's sharing check (blockscript/sharing.py), the udev hook's block events and the
admin commands walk, so a file add and a remove neither unmarshal nor build the walk (its record
and domain classes, ~9 KB of code) at each start (bench/README.md, issue 18, class18)."""

from __future__ import annotations

from xenblockctl.records import NamedTuple
from xenblockctl.xenstore.errors import XenstoreError, XenstoreNoEntry, XenstoreTooBig
from xenblockctl.xenstore.vbd import BACKEND_KINDS
from xenblockctl.xenstore.wire import DIRECTORY, READ

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Protocol

    class _Lister(Protocol):
        def ls(self, path: str) -> list[str]: ...
        def ls_many(self, paths: Sequence[str]) -> list[list[str] | None]: ...

    class _Streamer(_Lister, Protocol):
        def read_many(self, paths: Sequence[str]) -> list[str | None]: ...
        def stream(
            self,
            requests: Sequence[tuple[int, str]],
            follow: Callable[[list[tuple[int, str | list[str] | XenstoreError]]], Sequence[tuple[int, str]]],
        ) -> None: ...


class BackendEntry(NamedTuple):
    """One backend directory found by walk_backends: names as listed (not necessarily canonical
    numbers: callers that need numbers parse them, callers that count claims keep them all)."""

    kind: str
    domid: str
    devid: str
    path: str  # absolute


def walk_backends(
    store: _Lister, home: str, *, kinds: tuple[str, ...] = BACKEND_KINDS
) -> Iterator[BackendEntry]:
    """Every `<home>/backend/<kind>/<domid>/<devid>` directory (vbd, then vbd3), in listing order;
    a directory deleted while we walk is skipped, not an error.

    Two pipelined exchanges for any number of backends up to LS_BATCH frontend domains (every
    block-device add's sharing check walks here; bench/README.md, issue 18): the kinds' directories
    in one (a dom0 without vbd3 backends pays no round trip of its own for that), then every frontend
    domain's directory of every kind, LS_BATCH per send. Listing order and the skipping of a missing
    directory are the one-listing-at-a-time walk's."""
    root = home.rstrip("/")
    kind_dirs = [f"{root}/backend/{kind}" for kind in kinds]
    domain_dirs = [
        (kind, domid, f"{kind_dir}/{domid}")
        for kind, kind_dir, domids in zip(kinds, kind_dirs, store.ls_many(kind_dirs), strict=True)
        for domid in domids or ()
    ]
    for start in range(0, len(domain_dirs), LS_BATCH):
        chunk = domain_dirs[start : start + LS_BATCH]
        listed = store.ls_many([path for _kind, _domid, path in chunk])
        for (kind, domid, path), devids in zip(chunk, listed, strict=True):
            for devid in devids or ():
                yield BackendEntry(kind, domid, devid, f"{path}/{devid}")


class _Domain:
    """A frontend domain's directory of one kind; `backends` None until listed (or if gone)."""

    __slots__ = ("backends", "domid", "kind", "path")

    def __init__(self, kind: str, domid: str, path: str) -> None:
        self.kind, self.domid, self.path = kind, domid, path
        self.backends: list[BackendEntry] | None = None

    def listed(self, devids: list[str], skip: str) -> list[BackendEntry]:
        # Each path built once, and the record without the NamedTuple constructor's Python-level
        # argument handling: this runs for every backend of the walk (issue 18 round 8).
        kind, domid, prefix = self.kind, self.domid, self.path + "/"
        new = tuple.__new__
        self.backends = [
            new(BackendEntry, (kind, domid, devid, path))
            for devid in devids
            if (path := prefix + devid) != skip
        ]
        return self.backends


def read_in_backends(
    store: _Streamer, home: str, leaf: str, *, skip: str = "", kinds: tuple[str, ...] = BACKEND_KINDS
) -> list[tuple[BackendEntry, str | None]]:
    """Every backend walk_backends finds but `skip` (an absolute backend path), in its order, with
    the value of its node `leaf` (None where missing); a backend deleted while we walk is left out.

    Streamed (XenStore.stream): a domain's listing is sent as soon as its kind's listing names it,
    and a backend's read as soon as its domain's listing arrives, so the daemon answers the whole
    walk without waiting for a level to end (every block-device add's sharing check,
    bench/README.md issue 18 round 6). A listing too long for one reply (~700 names) is listed
    in parts afterwards (ls), and its backends read then."""
    root = home.rstrip("/")
    kind_dirs = [f"{root}/backend/{kind}" for kind in kinds]
    domains: list[list[_Domain]] = [[] for _ in kinds]
    #: What request number i was: an int (that kind's listing), a _Domain (its listing) or the
    #: BackendEntry whose leaf it read.
    jobs: list[int | _Domain | BackendEntry] = list(range(len(kinds)))
    #: The leaf's value by backend path, as read (a missing leaf is left out): one dict entry per
    #: backend instead of an object per backend that holds it (bench/README.md issue 18, session 15).
    values: dict[str, str] = {}
    long_kinds: list[int] = []
    long_domains: list[_Domain] = []

    def domains_of(k: int, domids: list[str]) -> list[_Domain]:
        return [_Domain(kinds[k], domid, f"{kind_dirs[k]}/{domid}") for domid in domids]

    suffix = "/" + leaf

    def follow(results: list[tuple[int, str | list[str] | XenstoreError]]) -> list[tuple[int, str]]:
        more: list[tuple[int, str]] = []
        for index, result in results:
            job = jobs[index]
            if isinstance(job, BackendEntry):
                if isinstance(result, str):
                    values[job.path] = result
                elif isinstance(result, XenstoreError) and not isinstance(result, XenstoreNoEntry):
                    raise result  # (XenstoreNoEntry: no such node, the value stays None)
                continue
            if isinstance(result, list):
                if isinstance(job, int):
                    found = domains_of(job, result)
                    domains[job] = found
                    jobs.extend(found)
                    more += [(DIRECTORY, domain.path) for domain in found]
                else:
                    backends = job.listed(result, skip)
                    jobs.extend(backends)
                    more += [(READ, backend.path + suffix) for backend in backends]
            elif isinstance(result, XenstoreTooBig):
                if isinstance(job, int):
                    long_kinds.append(job)
                else:
                    long_domains.append(job)
            elif isinstance(result, XenstoreError) and not isinstance(result, XenstoreNoEntry):
                raise result  # (XenstoreNoEntry: a directory deleted while we walk, skipped)
        return more

    store.stream([(DIRECTORY, kind_dir) for kind_dir in kind_dirs], follow)
    for k in long_kinds:
        domains[k] = domains_of(k, _ls(store, kind_dirs[k]))
        long_domains += domains[k]
    if long_domains:
        backends: list[BackendEntry] = []
        for domain, devids in zip(long_domains, store.ls_many([d.path for d in long_domains]), strict=True):
            if devids is not None:
                backends += domain.listed(devids, skip)
        for backend, value in zip(
            backends, store.read_many([backend.path + suffix for backend in backends]), strict=True
        ):
            if value is not None:
                values[backend.path] = value
    get = values.get
    return [
        (backend, get(backend.path))
        for kind_domains in domains
        for domain in kind_domains
        for backend in domain.backends or ()
    ]


def _ls(store: _Lister, path: str) -> list[str]:
    """The children of `path`, none if it is gone (ls_many lists a long one in parts)."""
    return store.ls_many([path])[0] or []


#: Listings per pipelined send. Both daemons read a privileged socket's requests while its replies
#: wait unsent (the C daemon's output list; the embedded one's queue, up to READ_PAUSE_BYTES), so a
#: batch cannot deadlock as long as its requests fit in the socket's send buffer (~208 KiB by
#: default) and sendall() returns: 256 listings of `<home>/backend/vbd/<domid>` are ~15 KiB. On the
#: xenbus device (a driver domain) requests go one at a time anyway (synchronous.py).
LS_BATCH = 256
