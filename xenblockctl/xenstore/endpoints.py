"""Where xenstored lives (libxenstore's order) and how to reach it: one module for both links.

Both ways of talking to the daemon use this: the threaded link (`transport`, pyxs's reader thread,
for the engine and the CLI) and the synchronous one (`synchronous`, for one-shot hotplug scripts).
It imports `_socket`, not `socket`: `socket` costs ~4.6 ms in a fresh process (it builds four
IntEnums from the C module's constants, bench/README.md hotplug_startup) and we need three names.
"""

from __future__ import annotations

import _socket
import _stat
import errno
import posix
import time

from xenblockctl import pathsteps
from xenblockctl.xenstore.errors import XenstoreUnavailable

#: libxenstore's compiled-in rundir on Debian (XEN_RUN_STORED); /var/run is a symlink to /run.
DEFAULT_RUNDIR = "/run/xenstored"
#: The character device a domain without a local daemon talks through (Linux).
XENBUS_DEVICES = ("/dev/xen/xenbus", "/proc/xen/xenbus")

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import TypeVar

    L = TypeVar("L")


class Endpoint:
    """One place to try: a Unix socket of a xenstored (`kind` "socket"), or the xenbus character
    device ("xenbus"). A plain slotted class: a NamedTuple would cost a class build at import on
    the block script's start-up; it still unpacks and compares like the pair it is."""

    __slots__ = ("kind", "path")

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        self.path = path

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.kind, self.path))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Endpoint):
            return (self.kind, self.path) == (other.kind, other.path)
        if isinstance(other, tuple):
            return (self.kind, self.path) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.kind, self.path))

    def __repr__(self) -> str:
        return f"Endpoint({self.kind!r}, {self.path!r})"

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def default_endpoints(env: Mapping[str, str] | None = None) -> list[Endpoint]:
    """The order libxenstore's `xs_open(0)` uses (tools/libs/store/xs.c, xs_lib.c).

    One socket, chosen by precedence: `$XENSTORED_PATH`, else `$XENSTORED_RUNDIR/socket`, else
    `/run/xenstored/socket`; then the xenbus device. Like libxenstore we do not fall through to
    the default socket when `XENSTORED_PATH` names a dead one: a test pointed at its private
    daemon must never silently talk to the host's store.
    """
    if env is None:  # a caller without an environment object; the hotplug path passes its own
        import os  # only here: the hotplug path passes its environment and never imports os

        env = os.environ
    sock = env.get("XENSTORED_PATH") or f"{env.get('XENSTORED_RUNDIR') or DEFAULT_RUNDIR}/socket"
    endpoints = [Endpoint("socket", sock)]
    # /proc/xen/xenbus only on kernels without /dev/xen/xenbus (what pyxs and libxenstore do).
    xenbus = next((d for d in XENBUS_DEVICES if pathsteps.exists(d)), XENBUS_DEVICES[0])
    endpoints.append(Endpoint("xenbus", xenbus))
    return endpoints


def endpoint_for(path: str) -> Endpoint:
    """An explicit path: a character device means xenbus, anything else a Unix socket."""
    try:
        is_chr = _stat.S_ISCHR(posix.stat(path).st_mode)
    except OSError:
        is_chr = False
    return Endpoint("xenbus" if is_chr else "socket", path)


def connect_unix(path: str, timeout: float) -> _socket.socket:
    """connect() bounded by `timeout`; the socket keeps `timeout` for its sends and receives.

    A socket with a timeout is non-blocking underneath, and AF_UNIX connect() on a full listen
    backlog then fails at once with EAGAIN instead of waiting (C xenstored listens with a backlog
    of 1, so parallel hotplug scripts hit this). libxenstore blocks in connect(); we retry with a
    short backoff until the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() + delay > deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT, f"{path}: listen backlog still full after {timeout:g} s"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        except BaseException:
            sock.close()
            raise


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a connect failure: pyxs wraps the OSError in its ConnectionError (raised
    inside the except block, so the OSError is its context) and prints it as a tuple repr."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(exc: BaseException) -> str:
    code = _errno_of(exc)
    if code is None:
        return " ".join(str(exc).split())[:120]
    return f"{errno.errorcode.get(code, str(code))}: {posix.strerror(code)}"


def connect_first(
    endpoints: list[Endpoint], timeout: float, opener: Callable[[Endpoint, float], L]
) -> tuple[L, Endpoint]:
    """`opener(endpoint, timeout)` for each endpoint in order until one works; the error names
    every place tried and why it failed (the errno name and text, once: when every place failed
    alike it is the error's own errno)."""
    failures: list[tuple[Endpoint, BaseException]] = []
    for endpoint in endpoints:
        try:
            return opener(endpoint, timeout), endpoint
        except Exception as exc:
            failures.append((endpoint, exc))
    codes = {_errno_of(exc) for _, exc in failures}
    if len(codes) == 1 and None not in codes:
        places = " nor at ".join(str(endpoint) for endpoint, _ in failures)
        raise XenstoreUnavailable(f"cannot reach xenstored at {places}", errno=codes.pop())
    reasons = "; ".join(f"{endpoint}: {_reason(exc)}" for endpoint, exc in failures)
    raise XenstoreUnavailable(f"cannot reach xenstored ({reasons})")
