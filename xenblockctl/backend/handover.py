"""What outlives the engine process: each served device's fd, parked in the service manager's fd
store under its backend's name, and taken back by the next engine (issue 21).

Under systemd (`Type=notify`, `FileDescriptorStoreMax=` > 0, $NOTIFY_SOCKET set) every device the
engine opens is parked (FDSTORE=1, FDNAME=`<kind>-<domid>-<devid>`: the engine serves only its own
domain's backend/<kind>, so kind, domid and devid name the backend directory unambiguously) and
dropped (FDSTOREREMOVE=1) when that backend is torn down. A restarted engine gets them back
(LISTEN_FDS/LISTEN_FDNAMES), and the manager keeps its copies while it restarts the unit: so an
auto-clearing loop device or a deferred-remove dm device that only the store held stays alive across
an engine crash. Taken back, an fd is only a candidate: the state machine re-verifies it against the
published identity (backend/xenbus.py) before serving it.

Delete-on-close still holds: if nothing takes the fds back (the unit is stopped, systemd gives up
restarting it), the manager closes its copies and the devices go as before. An fd nobody claims at
start (no such backend any more) is closed here, with the reason logged.

Without $NOTIFY_SOCKET nothing is parked and nothing changes.

Re-attaching to live rings. The local transport's registry (its "hypervisor": the frontends'
connections, grant tables and event channels) lives in the engine, so a crash there costs the
frontends a reconnect; `--takeover` hands it over with the devices (Transport.export_state), and
the successor re-attaches as on Xen. On Xen only the device fds are handed over, never the gntdev
or evtchn handles: what a successor needs of the ring outlives the process anyway. Xen 4.17's
xen/common/event_channel.c (RELEASE-4.17.7): evtchn_close() of our interdomain port (the kernel
does it when the dead process's /dev/xen/evtchn fd is released) sets the frontend's port back to
ECS_UNBOUND with remote_domid = our domain (lines 756-757), which is exactly what
evtchn_bind_interdomain() requires of the remote port (lines 389ff), so the successor binds the
same `event-channel` again; an event the frontend sends meanwhile is dropped ("silently drop the
notification", evtchn_send, line 830), which is why a re-attached data plane checks the ring and
notifies the frontend once before it waits. The frontend's grant of the ring page stays until the
frontend ends it (only our mapping went with the process), so `ring-ref` maps again. Parking the
handles instead would buy little and cost: the mappings themselves live in the dead process's
address space and go with it (a kept gntdev fd keeps only grant-map bookkeeping the successor
would have to rediscover), an evtchn fd held by a store keeps the port bound to nobody who reads
it, and each would be one more stored fd per ring.
Persistent-grant mappings are not carried over either: the grant cache maps again on first use.

What the successor re-runs, and why that is safe: the requests from the ring's last committed
answer to req_prod (ring.py: answers are published in ring order and journalled, so the shared
page says which). The guest has no answer for any of them: to it they are all still in flight.
- A request the guest saw complete is never run again, so a re-run write can never overwrite data
  the guest wrote after it learned of that completion (the ordering guarantee a block device gives).
- Among requests in flight together there is no order (blkif and the Linux block layer guarantee
  none between concurrent requests): a re-run write lands a second time with the same data, and of
  overlapping writes in flight together any may land last — as could have happened without the
  crash. A read returns what the disk holds now. A discard is idempotent. A flush run again makes
  durable everything completed before it, the dead engine's writes included: they went into the
  kernel through the device fd the store kept open, not into our process.
- Barriers (ordered writes) would need more; the engine does not offer feature-barrier.
- A request the dead engine's thread had in the kernel is finished before the successor runs it
  again: the engine does synchronous preadv/pwritev, which a dying process completes before it is
  reaped, and a successor starts after that (systemd restarts a unit whose main process exited;
  --takeover waits for the old engine to drain).
The cost: a slow request holds back the answers behind it on its ring (in-order publication), and
requests in flight at the crash run twice. Remote (NBD) targets are not covered: a request the
server received from the dead engine may still be executing there when it is sent again."""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

from xenblockctl.backend import sdnotify
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal


def fd_name(kind: str, domid: int, devid: int) -> str:
    """The FDNAME of backend/<kind>/<domid>/<devid> in the engine's own domain."""
    return sdnotify.fd_name(f"{kind}-{domid}-{devid}")


class FdStore:
    """The engine's side of the fd store: what it inherited at start, and park/unpark."""

    def __init__(self, env: MutableMapping[str, str], journal: Journal, record: str | None = None) -> None:
        self.env = env
        self.journal = journal
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        #: where what the manager holds is written down for `doctor` (see write_record)
        self.record = record if self.enabled else None
        try:
            self.inherited = sdnotify.listen_fds(env)
        except sdnotify.NotifyError as exc:
            # fds we cannot attribute are never served; the manager still holds its copies
            journal.error(f"ignoring the fds passed at start: {exc.one_line()}", CODE=exc.code)
            self.inherited = {}
        #: names the manager holds a copy of (LISTEN_FDS): not parked again when taken back
        self.in_store = set(self.inherited) if self.enabled else set()
        #: every name the manager holds a copy of now
        self.parked = set(self.in_store)
        if self.inherited:
            names = ", ".join(f"{name} ({len(fds)})" for name, fds in sorted(self.inherited.items()))
            journal.info(f"fd store handed back: {names}")

    @classmethod
    def from_environ(cls, journal: Journal, record: str | None = None) -> FdStore:
        return cls(os.environ, journal, record)

    def write_record(self) -> None:
        """Write down what the manager holds for `doctor` (toolstack/doctor.py reads it): JSON
        {"pid": ours, "parked": [FDNAME, ...]}, replaced atomically. Best effort: logged on failure."""
        if self.record is None:
            return
        tmp = f"{self.record}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="ascii") as f:
                json.dump({"pid": os.getpid(), "parked": sorted(self.parked)}, f)
            os.replace(tmp, self.record)
        except OSError as exc:
            self.journal.warning(f"cannot record the parked devices in {self.record}: {exc}")
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def adopt(self, handed_over: dict[str, list[int]]) -> None:
        """Fds from `backend --takeover`: judged exactly like the store's (and parked, being new
        to it). Before the engine's first rescan."""
        for name, fds in handed_over.items():
            self.inherited.setdefault(name, []).extend(fds)

    def holds(self, name: str) -> bool:
        """A previous engine's fd for `name` waits to be taken (and verified)."""
        return name in self.inherited

    def take(self, name: str) -> int | None:
        """The fd parked under `name` by a previous engine, now ours to verify (None if none). Extra
        fds under the same name (cannot happen with one park per open) are closed and logged."""
        fds = self.inherited.pop(name, [])
        for extra in fds[1:]:
            self.journal.warning(f"fd store: closing a second fd parked under {name}")
            with contextlib.suppress(OSError):
                os.close(extra)
        return fds[0] if fds else None

    def park(self, name: str, fd: int) -> bool:
        """Hand a copy of `fd` to the manager. A failure is logged and costs only the takeover."""
        if not self.enabled:
            return False
        try:
            stored = sdnotify.store_fds(self.env, name, [fd])
        except sdnotify.NotifyError as exc:
            self.journal.warning(
                f"{name}: cannot park the device in the fd store ({exc.one_line()}); an engine"
                " restart will lose it",
                CODE=exc.code,
            )
            return False
        if stored:
            self.parked.add(name)
            self.write_record()
        return stored

    def unpark(self, name: str) -> None:
        """The backend is torn down: the manager closes its copy (delete-on-close proceeds)."""
        if not self.enabled:
            return
        try:
            sdnotify.remove_fds(self.env, name)
        except sdnotify.NotifyError as exc:
            self.journal.error(
                f"{name}: cannot remove the device from the fd store ({exc.one_line()}); it stays"
                " held until the unit stops",
                CODE=exc.code,
            )
            return
        self.parked.discard(name)
        self.write_record()

    def close_unclaimed(self) -> list[str]:
        """Close every inherited fd no backend claimed, and tell the manager to drop its copies."""
        names = sorted(self.inherited)
        for name in names:
            for fd in self.inherited.pop(name):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.journal.warning(f"fd store: {name} names no backend waiting for its device; closed it")
            self.unpark(name)
        return names

    def ready(self, status: str) -> None:
        if not self.enabled:
            return
        self.write_record()
        try:
            sdnotify.ready(self.env, status)
        except sdnotify.NotifyError as exc:
            self.journal.error(f"cannot tell the manager we are ready: {exc.one_line()}", CODE=exc.code)


# --- hand-over without a service manager: `xenblockctl backend --takeover` ------------------------
#: where an engine on the Xen transport listens for its successor (root only)
HANDOVER_DIR = "/run/xenblockctl"
#: the running engine's answer to a takeover: its device fds by FDNAME, its transport's state
Send = Callable[[dict[str, int], "tuple[dict[str, object], list[int]] | None"], None]
#: one request, and the answer in chunks: SCM_MAX_FD is 253 fds per message
_CHUNK = 200
_REQUEST = b"takeover"
#: the name a transport fd travels under (`transport:<index>`; ':' is never in an FDNAME)
_TRANSPORT_FD = "transport:"
_MAX_MESSAGE = 65536


class HandoverError(XenblockError):
    code = "handover"


def default_handover_path(kind: str) -> str:
    return os.path.join(HANDOVER_DIR, f"engine-{kind}.handover")


def parked_record_path(handover_socket: str) -> str:
    """Where an engine writes down what it parked: next to its hand-over socket
    (/run/xenblockctl/engine-KIND.parked), where `doctor` looks."""
    return handover_socket.removesuffix(".handover") + ".parked"


@dataclass
class HandedOver:
    """What `take_over` got: device fds by FDNAME, and the transport's state (local: its registry)."""

    devices: dict[str, list[int]] = field(default_factory=dict)
    transport: dict[str, object] | None = None
    transport_fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in [*self.transport_fds, *(fd for fds in self.devices.values() for fd in fds)]:
            with contextlib.suppress(OSError):
                os.close(fd)


def take_over(path: str, journal: Journal, timeout: float = 120.0) -> HandedOver:
    """Ask the engine listening on `path` to hand over: it stops serving, drains every ring, and
    sends its device fds by FDNAME (and its transport's state); it exits once we have them. The
    device fds are ours to re-verify, like ones from the fd store (FdStore.adopt)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    got = HandedOver()
    transport_fds: dict[int, int] = {}
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(_REQUEST)
        except OSError as exc:
            raise HandoverError(f"no engine to take over at {path}", errno=exc.errno) from exc
        while True:
            try:
                data, anc, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(_CHUNK * 4))
            except OSError as exc:
                got.close()
                raise HandoverError(
                    "the engine stopped answering during the hand-over", errno=exc.errno
                ) from exc
            fds = _fds_of(anc)
            try:
                message = json.loads(data.decode()) if data else None
                names = message.get("names") if isinstance(message, dict) else None
                if not isinstance(message, dict) or not isinstance(names, list) or len(names) != len(fds):
                    raise ValueError("not a hand-over message")
                for name, fd in zip(names, fds, strict=True):
                    if str(name).startswith(_TRANSPORT_FD):
                        transport_fds[int(str(name).removeprefix(_TRANSPORT_FD))] = fd
                    else:
                        got.devices.setdefault(sdnotify.fd_name(str(name)), []).append(fd)
                fds = []
                if message.get("done"):
                    state = message.get("transport")
                    if state is not None and not isinstance(state, dict):
                        raise ValueError("the transport's state is not an object")
                    got.transport = state
                    got.transport_fds = [transport_fds.pop(i) for i in range(len(transport_fds))]
            except (ValueError, KeyError, UnicodeDecodeError, sdnotify.NotifyError) as exc:
                for fd in [*fds, *transport_fds.values()]:
                    os.close(fd)
                got.close()
                raise HandoverError(f"bad hand-over message from the old engine: {exc}") from None
            if message.get("done"):
                break
    finally:
        sock.close()
    journal.info(f"took over from the engine at {path}: {sum(map(len, got.devices.values()))} device(s)")
    return got


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % 4])
            fds += got.tolist()
    for fd in fds:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    return fds


class HandoverServer:
    """The running engine's side: a root-only unix socket its successor connects to. On a request
    `on_request(send)` is called (on this thread): the engine stops, drains, and calls `send` with
    its device fds by FDNAME and its transport's state (Transport.export_state), which go to the
    successor before the engine exits."""

    def __init__(self, path: str, journal: Journal, on_request: Callable[[Send], None]) -> None:
        self.path = path
        self.journal = journal
        self.on_request = on_request
        self._stop = threading.Event()
        self.sock = self._listen(path)
        self._thread = threading.Thread(target=self._serve, name="xbc-handover", daemon=True)
        self._thread.start()

    @staticmethod
    def _listen(path: str) -> socket.socket:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except FileNotFoundError:
            pass
        except ConnectionRefusedError:
            os.unlink(path)  # a dead engine's socket
        except OSError as exc:
            raise HandoverError(f"cannot check {path}", errno=exc.errno) from exc
        else:
            raise HandoverError(f"another engine listens on {path}: take it over (--takeover) or stop it")
        finally:
            probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # root only from the first instant
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise HandoverError(f"cannot listen on {path}", errno=exc.errno) from exc
        finally:
            os.umask(old)
        sock.listen(4)
        sock.settimeout(0.5)
        return sock

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            if self._handle(conn):
                return  # the connection is the hand-over's now: `send` closes it
            conn.close()

    def _handle(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        conn.settimeout(5)
        try:
            request = conn.recv(64)
        except OSError as exc:
            self.journal.warning(f"hand-over: pid {pid} sent no request ({exc})")
            return False
        if uid != os.geteuid() or request != _REQUEST:
            self.journal.warning(f"hand-over: refused pid {pid} (uid {uid}, request {request[:20]!r})")
            return False
        self.journal.info(f"hand-over requested by pid {pid}: stopping, draining, handing the devices over")
        self.close()  # the successor listens next

        def send(held: dict[str, int], transport: tuple[dict[str, object], list[int]] | None = None) -> None:
            meta, transport_fds = transport if transport is not None else (None, [])
            items = sorted(held.items()) + [(f"{_TRANSPORT_FD}{i}", fd) for i, fd in enumerate(transport_fds)]
            try:
                conn.settimeout(60)
                for i in range(0, len(items), _CHUNK):
                    chunk = items[i : i + _CHUNK]
                    names = [name for name, _ in chunk]
                    fds = array.array("i", [fd for _, fd in chunk])
                    conn.sendmsg(
                        [json.dumps({"names": names}).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                    )
                conn.sendall(json.dumps({"names": [], "done": True, "transport": meta}).encode())
                self.journal.info(f"handed {len(held)} device(s) over to pid {pid}")
            except OSError as exc:
                self.journal.error(
                    f"hand-over to pid {pid} failed ({exc}): the devices go with this engine", CODE="handover"
                )
            finally:
                conn.close()
                for _, fd in items:
                    with contextlib.suppress(OSError):
                        os.close(fd)

        self.on_request(send)
        return True

    def close(self, *, unlink: bool = True) -> None:
        """Stop listening and remove the socket. Only the first call acts: after a hand-over the
        path may already be the successor's."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)  # an accept() under way holds the socket open until it returns
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
