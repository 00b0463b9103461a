"""Every error response a device gives its guest: counted by cause, logged with its reason.

Never failing silently means the log must say why each RSP_ERROR/RSP_EOPNOTSUPP went out (issue
13: mkfs saw EIO while the engine's log said nothing, the reasons were at debug level). A guest
can also make every one of its requests fail on purpose, so the log is rate-limited per device: a
burst of `burst` lines, then one line per `interval` seconds that also says how many were not
logged meanwhile. The counts are exact and cumulative for the device (across reconnects); the
xenbus state machine publishes them (xenstore/vbd.py ERROR_RESPONSES_NODE) at a bounded rate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from xenblockctl.xenstore.vbd import ERROR_CAUSES, format_error_responses

log = logging.getLogger(__name__)

#: lines logged at once before the rate limit applies, and then one line per this many seconds
BURST = 10
INTERVAL = 10.0
#: the published node is rewritten at most this often
PUBLISH_INTERVAL = 1.0


class ErrorResponses:
    """Thread-safe: ring threads and I/O workers `record()`, the xenbus thread publishes."""

    def __init__(
        self,
        name: str,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(ERROR_CAUSES, 0)
        self._tokens = float(burst)
        self._refilled = clock()
        self._suppressed = 0
        self._published: str | None = None
        self._published_at = float("-inf")

    def record(self, cause: str, rid: int, reason: str) -> None:
        """One error response: `cause` is one of ERROR_CAUSES, `reason` says why."""
        with self._lock:
            self._counts[cause] += 1
            now = self._clock()
            self._tokens = min(float(self._burst), self._tokens + (now - self._refilled) / self._interval)
            self._refilled = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
        more = f" ({suppressed} more error responses not logged before this one)" if suppressed else ""
        log.warning("%s: error response to id %d: %s: %s%s", self.name, rid, cause, reason, more)

    def add(self, counts: dict[str, int]) -> None:
        """Error responses recorded (and logged) elsewhere: a worker process serving one of the
        device's queues (backend/workers.py) reports its counts here. Unknown causes are ignored."""
        with self._lock:
            for cause, n in counts.items():
                if cause in self._counts and n > 0:
                    self._counts[cause] += n

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def due(self, *, force: bool = False) -> str | None:
        """The node value to publish now, or None: unchanged since the last publication, or the
        last one was less than PUBLISH_INTERVAL ago (unless `force`). Call `published()` after
        writing it."""
        with self._lock:
            value = format_error_responses(self._counts)
            if value == self._published:
                return None
            if not force and self._clock() - self._published_at < PUBLISH_INTERVAL:
                return None
            return value

    def published(self, value: str) -> None:
        with self._lock:
            self._published = value
            self._published_at = self._clock()


__all__ = ["ErrorResponses"]
