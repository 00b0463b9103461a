"""Worker processes that serve rings outside the engine's interpreter, so queues use every CPU.

The engine's threads share one GIL: with many busy rings one process caps them all (issue 20). With
`xenblockctl backend --workers N` the engine starts N worker processes at start-up and keeps
xenstore, the handshake and every device fd itself; each queue it negotiates is handed to the
least loaded live worker, which runs the queue's DataPlane (ring thread, I/O workers, grant cache)
in its own interpreter:

  engine -> worker  `serve`  the ring's refs, event-channel port, protocol, persistent grants, the
                             device's properties and limits, and (SCM_RIGHTS) the device fd — the
                             worker's own copy, closed when its queue ends — plus, on the local
                             transport, the domain's grant tables and the port's eventfds
                             (transport.local.ImportedDomain); on Xen the worker maps through its
                             own gntdev and binds through its own evtchn
  worker -> engine  `serving` | `refused` (reason), later `broken` (the frontend broke the ring)
  engine -> worker  `start`, later `stop`
  worker -> engine  `stopped` (counts) once drained: every request answered, ring and pages released

A queue is drained only when its worker says so or when the worker process is gone and reaped
(then none of its I/O can still be running), so the engine's rule holds across processes: the
device fd is closed and Closed published only after every queue of it drained. A worker that dies
fails the devices it served queues for, with a log line naming it, and no other; the pool starts
a replacement for later queues. Messages are one JSON object per datagram on a socketpair, from
our own processes; a worker that sends anything else is treated as dead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from xenblockctl.backend.blkif import abi_for_protocol
from xenblockctl.backend.cpus import engine_cpus
from xenblockctl.backend.dataplane import DataPlane, QueueStats, RingParams
from xenblockctl.backend.errorlog import ErrorResponses
from xenblockctl.backend.io import DeviceTarget, DiscardMode
from xenblockctl.backend.requests import DeviceLimits
from xenblockctl.backend.ringgroup import RingGroup, RingGroups
from xenblockctl.backend.ringgroup import available as ringgroup_available
from xenblockctl.backend.transport.base import Transport, TransportError
from xenblockctl.journal import Journal

#: largest message (a serve message is well under 2 KiB); fds one message may carry
_MAX_MESSAGE = 65536
_MAX_FDS = 1 + 4096 + 2
#: how long the engine waits for a worker to accept or refuse a queue
SERVE_TIMEOUT = 10.0


class WorkerTimeout(TransportError):
    """A worker did not answer a serve in time; `queue` may still be live there and must be drained."""

    def __init__(self, message: str, queue: RemoteQueue) -> None:
        super().__init__(message)
        self.queue = queue


def default_workers() -> int:
    """One worker per CPU the engine may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def _send(sock: socket.socket, lock: threading.Lock, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(msg).encode()
    with lock:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; (None, []) at EOF. ValueError for anything but a JSON object."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, _MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        msg = json.loads(data)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    if not isinstance(msg, dict):
        for fd in fds:
            os.close(fd)
        raise ValueError("message is not a JSON object")
    return msg, fds


# -- the engine's side ---------------------------------------------------------------------------
class RemoteQueue:
    """A queue served by a worker, seen from the engine: what xenbus needs of a DataPlane."""

    grant_cache = None  # the worker's; its counts are not carried back

    def __init__(
        self,
        worker: _Worker,
        qid: int,
        name: str,
        on_broken: Callable[[str], None] | None,
        errors: ErrorResponses | None = None,
    ) -> None:
        self.worker = worker
        #: the device's error-response counts: the worker logs each one and reports the counts
        self.errors = errors
        self.qid = qid
        self.name = name
        self.on_broken = on_broken
        self.stats = QueueStats()
        self.broken: str | None = None
        self._stop_sent = False
        self._answer = threading.Event()  # serving/refused arrived
        self._refusal: str | None = None
        self._done = threading.Event()  # drained (stopped, or the worker is gone and reaped)
        self._in_flight = 0

    def start(self) -> None:
        self.worker.send({"op": "start", "qid": self.qid})

    def request_stop(self) -> None:
        if not self._stop_sent and not self._done.is_set():
            self._stop_sent = True
            self.worker.send({"op": "stop", "qid": self.qid})

    def stop(self, timeout: float | None = 30.0) -> bool:
        """True once the worker drained the queue (or died and was reaped): see DataPlane.stop."""
        self.request_stop()
        return self._done.wait(timeout)

    @property
    def in_flight(self) -> int:
        """What the worker last reported while draining (0 before it reported, and once done)."""
        return 0 if self._done.is_set() else self._in_flight

    # called on the worker's reader thread
    def _stopped(self, counts: dict[str, Any]) -> None:
        for field in (
            "requests",
            "ok",
            "errors",
            "unsupported",
            "notifies",
            "wakeups",
            "polls",
            "polls_caught",
        ):
            value = counts.get(field)
            if type(value) is int:
                setattr(self.stats, field, value)
        self._done.set()

    def _broken(self, reason: str) -> None:
        self.broken = reason
        if self.on_broken is not None:
            self.on_broken(reason)


class _Worker:
    def __init__(self, index: int, kind: str, journal: Journal, *, ring_groups: bool = False) -> None:
        self.index = index
        self.journal = journal
        self.queues: dict[int, RemoteQueue] = {}
        self._lock = threading.Lock()
        self.alive = True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "xenblockctl.backend.workers",
                    str(theirs.fileno()),
                    kind,
                    str(index),
                    "groups" if ring_groups else "threads",
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self._reader = threading.Thread(target=self._read, name=f"xbc-worker-{index}-rx", daemon=True)
        self._reader.start()

    def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            _send(self.sock, self._lock, msg, fds)
        except OSError as exc:
            # the reader sees the EOF and fails the worker's queues; this message is moot then
            self.journal.warning(f"worker {self.index} (pid {self.proc.pid}): send failed: {exc}")

    def _read(self) -> None:
        why = "closed its socket"
        try:
            while True:
                msg, fds = _recv(self.sock)
                for fd in fds:
                    os.close(fd)  # workers send none
                if msg is None:
                    break
                self._dispatch(msg)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"sent a bad message ({exc})"
        self._died(why)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        queue = self.queues.get(msg["qid"])
        if queue is None:
            return
        op = msg["op"]
        if op == "serving":
            queue._answer.set()
        elif op == "refused":
            queue._refusal = str(msg["reason"])
            queue._answer.set()
        elif op == "broken":
            queue._broken(str(msg["reason"]))
        elif op == "errors":
            if queue.errors is not None:
                queue.errors.add({str(k): int(v) for k, v in dict(msg["counts"]).items()})
        elif op == "draining":
            queue._in_flight = int(msg["in_flight"])
        elif op == "stopped":
            queue._stopped(msg.get("counts") or {})
            self.queues.pop(queue.qid, None)
        else:
            raise ValueError(f"unknown op {op!r}")

    def _died(self, why: str) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        try:
            status = self.proc.wait(30)  # reaped: none of its I/O can still be running
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        queues = list(self.queues.values())
        self.queues.clear()
        if queues:
            self.journal.error(
                f"worker {self.index} (pid {self.proc.pid}) {why}, exit status {status}:"
                f" failing the device(s) of its {len(queues)} queue(s)",
                CODE="worker-died",
            )
        else:
            self.journal.info(f"worker {self.index} (pid {self.proc.pid}) exited, status {status}")
        for queue in queues:
            serving = queue._answer.is_set() and queue._refusal is None
            if not serving:  # serve() is still waiting: it raises this, nothing was connected
                queue._refusal = f"worker {self.index} died ({why}, exit status {status})"
                queue._answer.set()
            queue._done.set()
            if serving:
                queue._broken(f"worker process {self.proc.pid} died ({why}, exit status {status})")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)  # EOF: the worker drains what it still serves, exits
        self._reader.join(60)
        self.sock.close()


class WorkerPool:
    """N worker processes for the engine's queues (see the module docstring)."""

    def __init__(
        self, count: int, transport: Transport, journal: Journal, *, ring_groups: bool = False
    ) -> None:
        """`ring_groups`: each worker serves its rings in one ring group (ringgroup.py; the engine's
        --ring-groups), else each ring on its own thread."""
        from xenblockctl.backend.transport.local import LocalTransport

        self.transport = transport
        self.kind = "local" if isinstance(transport, LocalTransport) else "xen"
        self.journal = journal
        self.ring_groups = ring_groups
        self._lock = threading.Lock()
        self._next_qid = 1
        self.workers: list[_Worker] = []
        try:
            for i in range(count):
                self.workers.append(_Worker(i, self.kind, journal, ring_groups=ring_groups))
        except BaseException:
            self.close()
            raise
        journal.info(f"{count} worker process(es) serve the queues: {[w.proc.pid for w in self.workers]}")

    def _pick(self) -> _Worker:
        with self._lock:
            for i, worker in enumerate(self.workers):
                if not worker.alive and worker.proc.poll() is not None:
                    self.workers[i] = _Worker(
                        worker.index, self.kind, self.journal, ring_groups=self.ring_groups
                    )
                    self.journal.info(f"worker {worker.index} replaced by pid {self.workers[i].proc.pid}")
            return min(self.workers, key=lambda w: (not w.alive, len(w.queues)))

    def serve(
        self,
        *,
        domid: int,
        params: RingParams,
        target: DeviceTarget,
        limits: DeviceLimits,
        name: str,
        io_workers: int,
        max_persistent_grants: int,
        on_broken: Callable[[str], None] | None,
        errors: ErrorResponses | None = None,
        native: bool = True,
        blocking_wakeup: bool = True,
        native_loop: bool = True,
    ) -> RemoteQueue:
        """Hand one queue to a worker; it is mapped and bound there but takes no request before
        `start()`. TransportError if the worker refuses it or does not answer."""
        worker = self._pick()
        with self._lock:
            qid = self._next_qid
            self._next_qid += 1
        queue = RemoteQueue(worker, qid, name, on_broken, errors)
        fds = [target.fd]
        pieces: list[int] = []
        if self.kind == "local":
            from xenblockctl.backend.transport.local import LocalTransport

            assert isinstance(self.transport, LocalTransport)
            exported, evtchn = self.transport.export(domid, params.event_channel)
            pieces = [base for base, _fd in exported]
            fds += [fd for _base, fd in exported] + list(evtchn)
        msg = {
            "op": "serve",
            "qid": qid,
            "domid": domid,
            "name": name,
            "refs": list(params.ring_refs),
            "port": params.event_channel,
            "protocol": params.abi.protocol,
            "persistent": params.persistent,
            "target": {f.name: getattr(target, f.name) for f in dataclasses.fields(target) if f.name != "fd"}
            | {"discard": target.discard.value},
            "limits": dataclasses.asdict(limits),
            "io_workers": io_workers,
            "max_persistent_grants": max_persistent_grants,
            "native": native,
            "blocking_wakeup": blocking_wakeup,
            "native_loop": native_loop,
            "pieces": pieces,
        }
        worker.queues[qid] = queue
        worker.send(msg, fds)
        if not queue._answer.wait(SERVE_TIMEOUT):
            # it may still map the ring and serve: ask it to let go; the caller keeps the queue and
            # drains it like any other before it releases the device
            queue.request_stop()
            raise WorkerTimeout(f"worker {worker.index} did not answer in {SERVE_TIMEOUT:.0f} s", queue)
        if queue._refusal is not None:
            worker.queues.pop(qid, None)
            queue._done.set()  # refused: nothing of it is left in the worker
            raise TransportError(f"worker {worker.index}: {queue._refusal}")
        return queue

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []


# -- the worker process --------------------------------------------------------------------------
class _Served:
    def __init__(self, dp: DataPlane, device_fd: int, transport: Transport | None) -> None:
        self.dp = dp
        self.device_fd = device_fd
        self.transport = transport  # ImportedDomain (local); None: the worker's shared XenTransport
        self.reported: dict[str, int] = {}
        self._lock = threading.Lock()  # the reporter and a stop may ask at once: count each once

    def error_delta(self) -> dict[str, int]:
        """Error responses since the last call (each already logged here with its reason)."""
        with self._lock:
            counts = self.dp.errors.counts
            delta = {
                k: v - self.reported.get(k, 0) for k, v in counts.items() if v != self.reported.get(k, 0)
            }
            self.reported = counts
            return delta

    def release(self) -> None:
        if self.transport is not None:
            self.transport.close()
        os.close(self.device_fd)


def _worker_main(sock: socket.socket, kind: str, index: int, *, ring_groups: bool) -> int:
    journal = Journal(f"xenblockctl-worker-{index}")
    lock = threading.Lock()  # guards `served`
    send_lock = threading.Lock()
    served: dict[int, _Served] = {}
    stoppers: list[threading.Thread] = []
    # The engine decides when we stop: a service manager's SIGTERM to the whole group, or ^C in a
    # terminal, must not end a queue with I/O in flight. EOF on the socket (the engine stopped or
    # died) drains every queue, then we exit.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    xen: Transport | None = None
    # with --ring-groups, one native loop for all of this worker's rings (issue 20, many busy
    # disks: ringgroup.py)
    group = groups = None
    if ring_groups and ringgroup_available():
        cpus = engine_cpus()  # each worker's group on a CPU of its own while there are CPUs enough
        group = RingGroup(f"xbc-worker{index}-rings", cpu=cpus[index % len(cpus)])
        groups = RingGroups([group])  # every ring of this worker in it, however few
    if kind == "xen":
        from xenblockctl.backend.transport.xen import XenTransport

        xen = XenTransport()

    def send(msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the engine is gone: we drain and exit anyway
            _send(sock, send_lock, msg)

    def stop(qid: int) -> None:
        with lock:
            entry = served.pop(qid, None)
        if entry is None:
            return
        while not entry.dp.stop(1.0):
            # stuck I/O: the engine holds the device until we say it drained
            send({"op": "draining", "qid": qid, "in_flight": entry.dp.in_flight})
        delta = entry.error_delta()
        if delta:
            send({"op": "errors", "qid": qid, "counts": delta})
        s = entry.dp.stats
        entry.release()
        send(
            {
                "op": "stopped",
                "qid": qid,
                "counts": {
                    "requests": s.requests,
                    "ok": s.ok,
                    "errors": s.errors,
                    "unsupported": s.unsupported,
                    "notifies": s.notifies,
                    "wakeups": s.wakeups,
                    "polls": s.polls,
                    "polls_caught": s.polls_caught,
                },
            }
        )

    def serve(msg: dict[str, Any], fds: list[int]) -> None:
        qid = int(msg["qid"])
        device_fd, rest = fds[0], fds[1:]
        transport: Transport | None = None
        try:
            if kind == "local":
                from xenblockctl.backend.transport.local import ImportedDomain

                pieces = [int(b) for b in msg["pieces"]]
                tables = list(zip(pieces, rest[: len(pieces)], strict=True))
                transport = ImportedDomain(int(msg["domid"]), tables, int(msg["port"]), (rest[-2], rest[-1]))
            t = dict(msg["target"])
            target = DeviceTarget(fd=device_fd, **(t | {"discard": DiscardMode(t["discard"])}))
            params = RingParams(
                tuple(int(r) for r in msg["refs"]),
                int(msg["port"]),
                abi_for_protocol(str(msg["protocol"])),
                bool(msg["persistent"]),
            )
            dp = DataPlane(
                transport or xen,  # type: ignore[arg-type]
                int(msg["domid"]),
                params,
                target,
                DeviceLimits(**msg["limits"]),
                workers=int(msg["io_workers"]),
                on_broken=lambda reason: send({"op": "broken", "qid": qid, "reason": reason}),
                name=str(msg["name"]),
                max_persistent_grants=int(msg["max_persistent_grants"]),
                native=bool(msg.get("native", True)),
                blocking_wakeup=bool(msg.get("blocking_wakeup", True)),
                native_loop=bool(msg.get("native_loop", True)),
                groups=groups,
            )
        except Exception as exc:
            if transport is not None:
                transport.close()
            os.close(device_fd)
            journal.error(f"{msg.get('name')}: cannot serve the queue: {exc}", CODE="worker-refused")
            send({"op": "refused", "qid": qid, "reason": str(exc)})
            return
        finally:
            for fd in rest:
                os.close(fd)
        with lock:
            served[qid] = _Served(dp, device_fd, transport)
        send({"op": "serving", "qid": qid})

    done = threading.Event()

    def report_errors() -> None:
        # the engine publishes each device's counts (xenblockctl show): send ours about once a second
        while not done.wait(1.0):
            with lock:
                entries = list(served.items())
            for qid, entry in entries:
                delta = entry.error_delta()
                if delta:
                    send({"op": "errors", "qid": qid, "counts": delta})

    reporter = threading.Thread(target=report_errors, name="xbc-worker-errors", daemon=True)
    reporter.start()
    try:
        while True:
            msg, fds = _recv(sock)
            if msg is None:
                break  # the engine stopped or died: drain everything, then exit
            op = msg.get("op")
            if op == "serve":
                serve(msg, fds)
            elif op == "start":
                with lock:
                    entry = served.get(int(msg["qid"]))
                if entry is not None:
                    entry.dp.start()
            elif op == "stop":
                # on a thread: a queue with stuck I/O must not keep the others from being served
                stopper = threading.Thread(target=stop, args=(int(msg["qid"]),), daemon=True)
                stopper.start()
                stoppers.append(stopper)
            else:
                for fd in fds:
                    os.close(fd)
    finally:
        with lock:
            left = list(served)
        for qid in left:
            stop(qid)
        for stopper in stoppers:
            stopper.join()
        done.set()
        reporter.join()
        if group is not None:
            group.close()  # every queue stopped: none left in it
        if xen is not None:
            xen.close()
    return 0


def main(argv: list[str]) -> int:
    fd, kind, index, shape = int(argv[0]), argv[1], int(argv[2]), argv[3]
    return _worker_main(socket.socket(fileno=fd), kind, index, ring_groups=shape == "groups")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
