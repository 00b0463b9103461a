"""A synchronous link to xenstored: one socket (or the xenbus device), no thread.

For one-shot, one-thread callers: the block script (`XenStore.connect(synchronous=True)`). The
calling thread writes a whole batch with one send() (header and payload of every request in one
buffer) and reads the replies itself, as many per read as the kernel holds (it waits until at
least a header per outstanding reply is there, SO_RCVLOWAT); a watch event that arrives in between
is set aside for `next_event`. A large batch of reads or listings outside a transaction goes over
up to SPREAD_LANES connections, one share each (the C daemon serves one message per connection per
poll turn, so it answers such a batch ~1.5x faster; bench/README.md, issue 18 round 5).
Compared with the threaded link (pyxs's reader thread) an add makes ~5× fewer syscalls and imports
neither `socket` nor `threading`, `queue` or pyxs's `platform` (bench/README.md, blockscript_add).
It must not be shared between threads.

Failure behaviour is the threaded link's: every wait is bounded by the caller's deadline, a peer
that closes, sends a reply nobody asked for or an oversize header makes the link `LOST` for good
(the client then raises XenstoreDisconnected), and close() never blocks.
"""

from __future__ import annotations

import _socket
import _struct as struct  # what struct.py re-exports, without its file: tests/lint/test_hotplug_imports.py
import errno
import posix
import select
import time

from xenblockctl.xenstore.endpoints import Endpoint, connect_unix
from xenblockctl.xenstore.link import Link, LinkLost, LinkSendFailed, LinkTimeout, Request
from xenblockctl.xenstore.wire import (
    DIRECTORY,
    GET_PERMS,
    HEADER_SIZE,
    NUL,
    READ,
    WATCH_EVENT,
    Frame,
    FrameDecoder,
    OversizeFrame,
    encode,
    encode_many,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: Bytes asked for per read: a batch's replies usually arrive together (256 replies are ~6 KiB).
_READ_SIZE = 65536
#: A batch of at least SPREAD_MIN reads or listings outside a transaction is spread over up to
#: SPREAD_LANES connections: the C xenstored serves one message per connection per turn of its
#: poll loop, so K connections share one poll and its per-message overhead among K messages (the
#: 128-backend walk's 259 requests cost it 2.1 -> 1.4 ms of CPU with 4, bench/README.md issue 18
#: round 5). Only requests whose order among each other cannot matter go: reads and listings.
SPREAD_MIN = 64
SPREAD_LANES = 4
_SPREADABLE = frozenset((READ, DIRECTORY, GET_PERMS))
#: While a stream (exchange_stream) waits, it wakes once this many replies are in on a connection
#: (or all it waits for there, if fewer): the daemon gets each reply's follow-ups soon, without a
#: wake-up for every reply (the C daemon writes a reply's header and payload separately).
STREAM_WAKE_REPLIES = 16
#: Longest single wait in the kernel for the rest of a batch before the bytes so far are checked.
CHECK_INTERVAL = 0.05
#: Waits shorter than this go through select() first: SO_RCVTIMEO rounds up to whole jiffies
#: (measured: 0.5 ms asked, 6-8 ms waited at HZ=250), select's timeout is exact.
EXACT_WAIT = 0.02
#: struct timeval (time_t, suseconds_t: two native longs on Linux), for SO_RCVTIMEO/SO_SNDTIMEO.
_TIMEVAL = struct.Struct("@ll")


def _timeval(seconds: float) -> bytes:
    # Rounded up to a whole microsecond: an all-zero timeval would mean "wait forever".
    micros = max(1, int(seconds * 1_000_000) + 1)
    return _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)


class DirectLink(Link):
    def __init__(self, endpoint: Endpoint, timeout: float, *, connect_timeout: float | None = None) -> None:
        self.endpoint = endpoint
        self._timeout = timeout
        self._sock: _socket.socket | None = None
        self._fd = -1
        #: The other connections a large read-only batch is spread over (SPREAD_LANES), opened on
        #: first use; None once closed.
        self._lanes: list[DirectLink] | None = []
        if endpoint.kind == "socket":
            sock = connect_unix(endpoint.path, timeout if connect_timeout is None else connect_timeout)
            # Blocking from here on, each wait bounded by the kernel (SO_SNDTIMEO here,
            # SO_RCVTIMEO per read): a socket with a Python timeout polls before every send and
            # every recv, one more syscall each (bench/README.md, issue 18 round 5).
            try:
                sock.settimeout(None)
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _timeval(timeout))
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._fd = sock.fileno()
        else:
            self._fd = posix.open(endpoint.path, posix.O_RDWR | posix.O_CLOEXEC)
        self._pipeline = endpoint.kind == "socket"
        #: The socket's SO_RCVLOWAT, so that it is set only when it changes.
        self._lowat = 1
        #: The socket's SO_RCVTIMEO as last set: most reads ask for CHECK_INTERVAL again, and the
        #: setsockopt is then skipped (a syscall per read, ~50 in the 128-backend walk).
        self._rcvtimeo = b""
        self._decoder = FrameDecoder()
        self._tokens: set[bytes] = set()
        self._events: list[tuple[bytes, bytes]] = []
        self._failure: str | None = None

    # -- the Link contract ----------------------------------------------------------------------

    def exchange(self, requests: Sequence[Request], deadline: float) -> list[Frame]:
        self._check_alive(0)
        if not requests:
            return []  # (sharing's read_many of no matches: no empty send)
        replies: list[Frame | None] = [None] * len(requests)
        if self._pipeline:
            lanes = self._spread(requests)
            if len(lanes) > 1:
                self._exchange_spread(lanes, requests, replies, deadline)
                return replies  # type: ignore[return-value]  # _collect filled every slot
            self._send(encode_many(requests), 0)
            self._collect({request[1]: index for index, request in enumerate(requests)}, replies, deadline)
        else:
            for index, request in enumerate(requests):
                self._send(encode(*request), index)
                self._collect({request[1]: index}, replies, deadline)
        return replies  # type: ignore[return-value]  # _collect filled every slot

    def exchange_stream(
        self,
        requests: Sequence[Request],
        follow: Callable[[list[tuple[int, Frame]]], Sequence[Request]],
        deadline: float,
    ) -> None:
        """Link.exchange_stream with follow-ups sent as soon as their replies are read, so the
        daemon never waits for a whole level (the 128-backend walk: bench/README.md, issue 18
        round 6). Only reads and listings outside a transaction stream (their order among each
        other cannot matter, as for a spread batch); anything else, and the xenbus device, goes
        level by level. A burst of SPREAD_MIN or more is spread over up to SPREAD_LANES
        connections; a smaller one goes on the connection whose replies asked for it.
        `follow` gets what one read brought from one connection."""
        self._check_alive(0)
        if not self._pipeline or self._lanes is None or not _spreadable(requests):
            super().exchange_stream(requests, follow, deadline)
            return
        stream = _Stream(self, follow)
        stream.place(requests, 0)
        try:
            stream.run(deadline)
        except (LinkLost, LinkSendFailed) as exc:
            self._fail(exc.reason)
            raise
        if stream.error is not None:
            raise stream.error

    def next_event(self, timeout: float) -> tuple[bytes, bytes] | None:
        if self._events:
            return self._events.pop(0)
        self._check_alive(0)
        deadline = time.monotonic() + timeout
        while not self._events:
            for frame in self._frames(0):
                if frame.type != WATCH_EVENT:
                    self._lose(0, f"unexpected reply {frame!r} while waiting for a watch event")
                self._event(frame)
            if not self._events and not self._receive(1, 0, deadline):
                return None
        return self._events.pop(0)

    def fileno(self) -> int:
        """The connection's fd, for a caller that polls it (the warm server's sharing table)."""
        self._check_alive(0)
        return self._fd

    def poll_events(self) -> list[tuple[bytes, bytes]]:
        """Every watch event set aside or already readable, without waiting (MSG_DONTWAIT), for a
        caller with no request outstanding (its poll found the fd readable): a reply then answers
        nothing of ours and loses the link, as does the peer's close (LinkLost either way)."""
        self._check_alive(0)
        sock = self._sock
        if sock is not None:
            while True:
                try:
                    data = sock.recv(_READ_SIZE, _socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._lose(0, f"{type(exc).__name__}: {exc}")
                if not data:
                    self._lose(0, "ConnectionError: xenstored closed the connection")
                self._decoder.push(data)
                if len(data) < _READ_SIZE:
                    break
        for frame in self._frames(0):
            if frame.type != WATCH_EVENT:
                self._lose(0, f"unexpected reply {frame!r} while no request was outstanding")
            self._event(frame)
        events, self._events = self._events, []
        return events

    def subscribe(self, token: str) -> None:
        self._tokens.add(token.encode("ascii"))

    def unsubscribe(self, token: str) -> None:
        raw = token.encode("ascii")
        self._tokens.discard(raw)
        self._events = [event for event in self._events if event[1] != raw]

    @property
    def closed(self) -> bool:
        return self._fd < 0 or self._failure is not None

    def describe_failure(self) -> str:
        return self._failure or "connection closed"

    def close(self, timeout: float = 0.0) -> None:
        for lane in self._lanes or ():
            lane.close()
        self._lanes = None
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        if self._sock is not None:
            self._sock.close()
        else:
            posix.close(fd)

    # -- reading and writing ----------------------------------------------------------------------

    def _check_alive(self, index: int) -> None:
        if self._failure is not None:
            raise LinkLost(index, self._failure)
        if self._fd < 0:
            raise LinkLost(index, "connection closed")

    def _fail(self, reason: str) -> str:
        self._failure = " ".join(reason.split())[:200]
        return self._failure

    def _lose(self, index: int, reason: str) -> None:
        raise LinkLost(index, self._fail(reason))

    def _send(self, data: bytes, index: int) -> None:
        try:
            if self._sock is not None:
                self._sock.sendall(data)
            else:
                # xenbus takes one whole message per write (Linux collects partial writes too).
                view = memoryview(data)
                while view:
                    view = view[posix.write(self._fd, view) :]
        except OSError as exc:
            self._fail(f"send failed: {type(exc).__name__}: {exc}")
            raise LinkSendFailed(index, f"{type(exc).__name__}: {exc}") from exc

    def _spread(self, requests: Sequence[Request]) -> list[DirectLink]:
        """The connections to send `requests` over: this one, and for a large read-only batch
        outside a transaction up to SPREAD_LANES - 1 more (opened now if need be)."""
        if len(requests) < SPREAD_MIN or self._lanes is None:
            return [self]
        if not _spreadable(requests):
            return [self]
        return self._open_lanes()

    def _open_lanes(self) -> list[DirectLink]:
        """This connection and the others opened so far, up to SPREAD_LANES in all."""
        if self._lanes is None:
            return [self]
        while len(self._lanes) < SPREAD_LANES - 1:
            try:
                lane = DirectLink(self.endpoint, self._timeout, connect_timeout=0.0)
            except OSError:
                # Not an error: the batch goes over the connections there are. C xenstored listens
                # with a backlog of 1, so a third connect in a row usually finds it full until
                # its next poll; the next large batch tries again instead of sleeping here.
                break
            self._lanes.append(lane)
        return [self, *self._lanes]

    def _exchange_spread(
        self,
        lanes: list[DirectLink],
        requests: Sequence[Request],
        replies: list[Frame | None],
        deadline: float,
    ) -> None:
        """Contiguous shares of the batch, one per connection, all sent before any reply is
        awaited. A failure on any of them is this link's: the client sees one connection."""
        count = len(requests)
        bounds = [count * k // len(lanes) for k in range(len(lanes) + 1)]
        try:
            for lane, start, end in zip(lanes, bounds, bounds[1:], strict=False):
                lane._send(encode_many(requests[start:end]), start)
            for lane, start, end in zip(lanes, bounds, bounds[1:], strict=False):
                waiting = {requests[index][1]: index for index in range(start, end)}
                lane._collect(waiting, replies, deadline)
        except (LinkLost, LinkSendFailed) as exc:
            self._fail(exc.reason)
            raise

    def _collect(self, waiting: dict[int, int], replies: list[Frame | None], deadline: float) -> None:
        """Fill `replies[index]` for every `waiting` {req_id: index}, from as many frames per read
        as have arrived. xenstored answers a connection in order, but replies are matched by id
        like the threaded link; a reply that answers nothing we sent (or answers twice) makes the
        stream untrustworthy, as pyxs's router's UnexpectedPacket does."""
        while True:
            for frame in self._frames(min(waiting.values()) if waiting else 0):
                if frame.type == WATCH_EVENT:
                    self._event(frame)
                    continue
                index = waiting.pop(frame.req_id, None)
                if index is not None:
                    replies[index] = frame
                    continue
                reason = f"UnexpectedPacket: reply {frame!r} answers no request of ours"
                if waiting:
                    self._lose(min(waiting.values()), reason)
                # After this batch's last reply: the batch stands, the next request fails.
                self._fail(reason)
            if not waiting:
                return
            if not self._receive(len(waiting), min(waiting.values()), deadline):
                raise LinkTimeout(min(waiting.values()))

    def _frames(self, index: int) -> list[Frame]:
        try:
            return self._decoder.frames()
        except OversizeFrame as exc:
            self._lose(index, f"OversizeFrame: {exc}")
            raise  # unreachable: _lose raises

    def _event(self, frame: Frame) -> None:
        parts = frame.payload.split(NUL)
        if len(parts) < 3:
            self._lose(0, f"malformed watch event {frame.payload[:60]!r}")
        if parts[1] in self._tokens:
            self._events.append((parts[0], parts[1]))

    def _receive(self, replies: int, index: int, deadline: float) -> bool:
        """Read what has arrived into the decoder; False once `deadline` has passed.

        On the socket, one read waits in the kernel until at least the smallest possible rest of
        `replies` replies is here (SO_RCVLOWAT: every reply is at least a header), so a batch of
        256 replies costs a few reads instead of a wake-up per reply or two (the C daemon writes a
        reply's header and payload separately). SO_RCVTIMEO ends such a wait after CHECK_INTERVAL
        (any wait at the deadline) and hands over whatever arrived: a peer that sent garbage (an
        oversize header) and then stalls short of the low-water mark is still caught within
        CHECK_INTERVAL, as it was when every arriving byte woke us. A signal whose handler
        returns restarts the read with the same timeout (PEP 475)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock = self._sock
        try:
            if sock is None:
                if not select.select([self._fd], [], [], remaining)[0]:
                    return True  # the loop finds the deadline passed
                data = posix.read(self._fd, _READ_SIZE)
            else:
                lowat = max(1, min(replies * HEADER_SIZE - self._decoder.pending, _READ_SIZE))
                if lowat != self._lowat:
                    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVLOWAT, lowat)
                    self._lowat = lowat
                wait = remaining if lowat == 1 else min(remaining, CHECK_INTERVAL)
                if wait < EXACT_WAIT:
                    # A short wait (the hand-off's sysfs polls ask for 0.5-5 ms) is kept exact by
                    # select's high-resolution timer: SO_RCVTIMEO counts whole jiffies and made a
                    # 0.5 ms wait 8 ms here. On a Unix socket select says readable at the first
                    # byte, whatever the low-water mark (measured): the read below then waits for
                    # the rest of the mark, at most CHECK_INTERVAL.
                    if not select.select([self._fd], [], [], wait)[0]:
                        return True  # the caller finds its deadline passed
                    wait = CHECK_INTERVAL
                timeval = _timeval(wait)
                if timeval != self._rcvtimeo:
                    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, timeval)
                    self._rcvtimeo = timeval
                data = sock.recv(_READ_SIZE)
        except BlockingIOError:
            return True  # SO_RCVTIMEO expired with nothing: the next call checks the deadline
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return True
            self._lose(index, f"{type(exc).__name__}: {exc}")
        if not data:
            self._lose(index, "ConnectionError: xenstored closed the connection")
        self._decoder.push(data)
        return True


def _spreadable(requests: Sequence[Request]) -> bool:
    """Reads and listings outside a transaction: their order among each other cannot matter."""
    return all(not tx_id and op in _SPREADABLE for op, _req_id, tx_id, _payload in requests)


class _Stream:
    """One exchange_stream in flight: which request each connection still owes a reply to, and
    the follow-ups not sent yet."""

    def __init__(
        self, link: DirectLink, follow: Callable[[list[tuple[int, Frame]]], Sequence[Request]]
    ) -> None:
        self.link = link
        self.lanes = [link]
        self.follow = follow
        #: Per connection: {req_id: index} of the requests sent on it and not answered yet.
        self.waiting: list[dict[int, int]] = [{}]
        #: Per connection: encoded requests placed but not sent yet.
        self.outgoing: list[list[bytes]] = [[]]
        self.count = 0
        #: What `follow` raised; no reply is handed to it after that.
        self.error: BaseException | None = None

    def place(self, requests: Sequence[Request], lane: int) -> None:
        """Number `requests` on and queue them: a burst spread over the connections, else on `lane`."""
        if not requests:
            return
        if not _spreadable(requests):
            raise ValueError("exchange_stream: only reads and listings outside a transaction stream")
        if len(requests) >= SPREAD_MIN and len(self.lanes) < SPREAD_LANES:
            self.lanes = self.link._open_lanes()
            while len(self.waiting) < len(self.lanes):
                self.waiting.append({})
                self.outgoing.append([])
        lanes = range(len(self.lanes)) if len(requests) >= SPREAD_MIN else range(lane, lane + 1)
        count = len(requests)
        bounds = [count * k // len(lanes) for k in range(len(lanes) + 1)]
        for k, start, end in zip(lanes, bounds, bounds[1:], strict=False):
            share = requests[start:end]
            waiting = self.waiting[k]
            for number, request in enumerate(share, self.count):
                waiting[request[1]] = number
            self.count += len(share)
            self.outgoing[k].append(encode_many(share))

    def run(self, deadline: float) -> None:
        """Send what is queued; then, connection by connection, wait (in the kernel, SO_RCVLOWAT)
        until STREAM_WAKE_REPLIES replies or all it still owes are in, hand them on, and send
        their follow-ups before the next wait. (Not select() over the connections: on a Unix
        socket it reports readable at the first byte, whatever the low-water mark, which made
        a wake-up per reply.)"""
        waiting = self.waiting
        while True:
            busy = False
            for k in range(len(self.lanes)):
                self._flush()
                if not waiting[k]:
                    continue
                busy = True
                lane, index = self.lanes[k], min(waiting[k].values())
                if not lane._receive(min(len(waiting[k]), STREAM_WAKE_REPLIES), index, deadline):
                    raise LinkTimeout(index)
                self._take(k, index)
            if not busy:
                return

    def _flush(self) -> None:
        for k, outgoing in enumerate(self.outgoing):
            if outgoing:
                self.lanes[k]._send(b"".join(outgoing), min(self.waiting[k].values()))
                outgoing.clear()

    def _take(self, k: int, index: int) -> None:
        """Hand on the replies lane `k` has read, and queue their follow-ups."""
        lane = self.lanes[k]
        waiting = self.waiting[k]
        arrived: list[tuple[int, Frame]] = []
        for frame in lane._frames(index):
            if frame.type == WATCH_EVENT and lane is self.link:
                lane._event(frame)
                continue
            got = waiting.pop(frame.req_id, None)
            if got is None:
                lane._lose(
                    min(waiting.values()) if waiting else index,
                    f"UnexpectedPacket: reply {frame!r} answers no request of ours",
                )
            arrived.append((got, frame))  # type: ignore[arg-type]  # _lose raised if None
        if arrived and self.error is None:
            try:
                self.place(self.follow(arrived), k)
            except Exception as exc:  # the caller's; raised once the stream is drained
                self.error = exc


def open_link(endpoint: Endpoint, timeout: float) -> DirectLink:
    return DirectLink(endpoint, timeout)
