"""A mutex whose uncontended acquire reads no clock (issue 20: the data plane's per-request locks).

CPython's `threading.Lock` reads CLOCK_MONOTONIC on every acquire, even an uncontended one: where
`sem_clockwait` exists it computes the deadline before it tries `sem_trywait`
(Python/thread_pthread.h, PyThread_acquire_lock_timed). Where the clock has no vDSO fast path the
read is a system call: in the Xen lane's PV dom0 (clocksource `xen`) one clock read cost 31 µs and
one `with lock:` 39 µs under QEMU/TCG, against 0.05 and 0.5 µs on the host, and the data plane
took five locks per request (its response lock, two memory fences, the event channel's lock for
the ack and for the notify). multiprocessing's semaphore lock tries `sem_trywait` first and reads
the clock only for an acquire with a timeout. Both are glibc `sem_t` operations, i.e. LOCK-prefixed
atomics, so this lock is also the full memory barrier ring.full_fence needs.

The "fork" context: its locks are unlinked at once (the "spawn" and "forkserver" ones register
with a resource-tracker process). Where POSIX semaphores cannot be made (no /dev/shm), a
threading.Lock it is.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from types import TracebackType
from typing import Protocol

log = logging.getLogger(__name__)


class Mutex(Protocol):
    """What the data plane uses of a lock."""

    def acquire(self) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None, /
    ) -> None: ...


def fast_lock() -> Mutex:
    """A new non-recursive mutex for threads of this process (see the module docstring)."""
    try:
        return multiprocessing.get_context("fork").Lock()
    except (OSError, ValueError, ImportError) as exc:  # no /dev/shm, no fork context
        log.debug("no POSIX semaphore lock (%s): using threading.Lock", exc)
        return threading.Lock()


__all__ = ["Mutex", "fast_lock"]
