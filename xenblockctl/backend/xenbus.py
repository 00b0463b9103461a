"""One backend device's xenbus state machine: the engine's side of the blkif handshake.

Level-triggered: every watch event for the device leads to `reconcile()`, which reads the current
backend and frontend nodes and does whatever is due, so lost, merged or reordered events cannot
wedge it. Lifecycle (xen-block-protocol.md §3-§4, Linux blkback's behaviour where it is sane):

  backend appears (libxl, state 1)   -> publish features + `opened`=0, state InitWait (2)
  `physical-device` written          -> read it with the luid and `diskseq` in one batch,
                                        open by major:minor, refuse unless BLKGETDISKSEQ equals
                                        every one of them that is present, then `opened`=1 (the
                                        block script's sign to let go)
  `xenblockctl-owner` kind=nbd written   -> an NBD export we serve ourselves (no physical-device):
     (no physical-device)                 our own handshake must match the record (URI, size,
                                        flags, socket dev/inode: nbdio.open_published), else the
                                        coded refusal `nbd-export-mismatch`; then `opened`=1
  `hotplug-status` written, opened   -> the device's properties (sectors/info/features) and
                                        error counts, guarded: the block script is done writing
  frontend Initialised/Connected     -> map the ring(s), bind the event channel(s), publish
                                        what is not yet, state Connected (4); persistent
                                        grants iff we offer them and the frontend's
                                        `feature-persistent` is exactly "1"; one DataPlane per
                                        queue (`multi-queue-num-queues`, 1..what we offered)
  frontend Closing/Closed            -> drain in-flight I/O, unmap (persistent grants too: a
                                        reconnect starts with an empty cache); state Closing/Closed; the
                                        device stays open: a reconnecting frontend (guest reboot)
                                        gets the same device, never a re-open by number
  `online`=0 (libxl detach/destroy)  -> drain, unmap, close the device (the loop auto-clears),
                                        state Closed (6)

Frontend nodes are written by the guest: every one is parsed and bounded before use."""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from xenblockctl.backend import blkif
from xenblockctl.backend.cpus import engine_cpus
from xenblockctl.backend.dataplane import DataPlane, RingParams
from xenblockctl.backend.errorlog import ErrorResponses
from xenblockctl.backend.grantcache import DEFAULT_MAX_PERSISTENT_GRANTS
from xenblockctl.backend.handover import FdStore, fd_name
from xenblockctl.backend.io import DeviceTarget, DiscardMode
from xenblockctl.backend.loopfile import NotServed, is_loop, on_backing_file
from xenblockctl.backend.nbdio import NbdTarget, open_published
from xenblockctl.backend.requests import DeviceLimits
from xenblockctl.backend.ringgroup import RingGroups
from xenblockctl.backend.transport.base import Transport
from xenblockctl.backend.workers import RemoteQueue, WorkerPool, WorkerTimeout
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.kernel import blockdev
from xenblockctl.kernel.blockdev import BlockDevice
from xenblockctl.nbd import proto as nbd_proto
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.identity import (
    IdentityError,
    Liveness,
    NbdOwnerRecord,
    OwnerRecordError,
    PublishedIdentity,
)
from xenblockctl.xenstore.numbers import NodeValueError, parse_uint, uint_or_none
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import ERROR_RESPONSES_NODE, XenbusState, format_error_responses

_FRONTEND = re.compile(r"/local/domain/(0|[1-9][0-9]{0,4})/device/(vbd|vbd3)/([1-9][0-9]{0,9})")

#: How long a detach waits for a connected frontend to close before tearing down anyway. libxl
#: waits 10 s for Closed, then deletes the frontend itself.
FRONTEND_CLOSE_GRACE = 5.0
#: How long in-flight I/O may take to drain before the device is reported stuck. It is still not
#: closed then: closing the fd (or unmapping the guest's pages) under a running request could send
#: the guest's write into whatever file reuses the fd number next, another guest's disk included.
#: The device, its ring and its pages stay held until the last request ends.
DRAIN_TIMEOUT = 30.0
#: The longest one reconcile waits for a drain: one xenbus thread serves every device, so a stuck
#: device is polled (pending_deadline) rather than waited for.
DRAIN_STEP = 0.2


#: The backend nodes reconcile() decides on: the rest of the directory is read where it is used.
RECONCILE_NODES = ("online", "state", identity.PHYSICAL_DEVICE, identity.OWNER)
#: What _open_device() reads of the backend: the published identity and what it is checked with.
OPEN_NODES = (*identity.IDENTITY_NODES, "mode", "frontend", identity.OWNER, "params")
#: The block script's last write of the hand-off (blockscript/add.py _mark_connected, nbdexport.py):
#: until it is there the script may still be writing beside us in the backend directory.
SCRIPT_DONE_NODE = "hotplug-status"
#: The frontend's top-level ring nodes (blkif.h "Frontend XenBus Nodes"): what names the rest.
RING_NODES = (
    "ring-ref",
    "ring-page-order",
    "event-channel",
    "protocol",
    "multi-queue-num-queues",
    "feature-persistent",
)


def default_max_queues() -> int:
    """Queues offered by default: one per CPU the engine may run on (Linux blkback offers one per
    online CPU), at most MAX_QUEUES (cpus.py)."""
    return len(engine_cpus())


class Phase(enum.Enum):
    NEW = "new"
    INIT_WAIT = "init-wait"  # features published, waiting for physical-device
    OPENED = "opened"  # device verified and held, waiting for the frontend
    CONNECTED = "connected"  # data plane running
    DISCONNECTED = "disconnected"  # frontend went away; device still held for a reconnect
    FAILED = "failed"  # refused (error node written); waits for libxl to tear down
    CLOSED = "closed"  # device released, state 6


class EngineRefusal(XenblockError):
    """The engine will not serve this backend; the text goes into the xenbus error node."""

    code = "engine-refused"


@dataclass(frozen=True)
class EngineConfig:
    transport: Transport
    #: Refuse `physical-device` with neither `physical-device-luid` nor `diskseq` (the stock block
    #: script). The engine exists to verify, so it is stricter here than the kernel patch, which
    #: skips its check when `diskseq` is absent.
    require_luid: bool = True
    max_ring_page_order: int = blkif.MAX_RING_PAGE_ORDER
    max_indirect_segments: int = blkif.DEFAULT_MAX_INDIRECT_SEGMENTS
    workers: int = 4
    #: `multi-queue-max-queues` we publish: a frontend may ask for 1..this many queues (rings), each
    #: served by its own DataPlane. In this process they share one GIL (threads), so more queues buy
    #: parallel I/O waits, not parallel Python.
    max_queues: int = field(default_factory=default_max_queues)
    #: Worker processes that serve the queues (backend/workers.py), each with its own GIL; None:
    #: every queue on a thread of this process.
    worker_pool: WorkerPool | None = None
    #: Without workers: this process's ring groups (backend/ringgroup.py), each ring given the one
    #: serving the fewest when it connects, and served there whenever they serve (by default past
    #: as many rings as the engine has CPUs; `backend --ring-groups`: always); None: each ring's
    #: loop on its own ring thread (`--no-ring-groups`). With workers a worker process is one
    #: group itself (WorkerPool's ring_groups).
    ring_groups: RingGroups | None = None
    #: Offer `feature-persistent` (used only when the frontend writes feature-persistent = 1 too).
    persistent_grants: bool = True
    #: Persistent grant mappings kept per ring before the least recently used idle one is unmapped.
    max_persistent_grants: int = DEFAULT_MAX_PERSISTENT_GRANTS
    #: Serve simple cached READs/WRITEs with the native fast path where it is built and applies
    #: (backend/fastpath.py); False: every request on the pure-Python path.
    native: bool = True
    #: The ring thread sleeps in one blocking read of its event channel where the channel allows it
    #: (DataPlane: EventChannel.start_blocking); False: poll() and a late read.
    blocking_wakeup: bool = True
    #: With the blocking wake-up and a native pass (grant copy, or persistent grants), the ring
    #: thread waits, serves and answers in one native loop (DataPlane._loop_natively); False: a
    #: Python turn per wake-up.
    native_loop: bool = True
    #: Guest WRITEs to block devices with O_DIRECT on a second fd (io.DirectWriter); False (the
    #: default): buffered on the verified fd. Off by default: on the real-Xen lane the engine's
    #: O_DIRECT writes from grant-mapped pages lost to buffered ones in 2 of 3 boots (bench/README).
    direct_writes: bool = False
    #: Direct WRITEs on the I/O pool unless alone on their ring, instead of on the ring thread.
    direct_writes_on_pool: bool = False
    #: With direct_writes: READs through the O_DIRECT fd too (io.DirectWriter, "Reads").
    direct_reads: bool = False
    #: Serve a loop device's I/O on its verified backing file (backend/loopfile.py: the page cache
    #: kernel blkback's loop worker uses); False: on the loop device (`backend --no-loop-file`).
    loop_file: bool = True
    #: The service manager's fd store (backend/handover.py): each opened device is parked there and
    #: a restarted engine takes it back. None: nothing outlives the process (as before issue 21).
    fd_store: FdStore | None = None


class BackendDevice:
    """State machine for backend/<kind>/<domid>/<devid> in our domain."""

    def __init__(
        self,
        store: XenStore,
        *,
        home: str,
        kind: str,
        domid: int,
        devid: int,
        config: EngineConfig,
        journal: Journal,
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.home = home
        self.kind = kind
        self.domid = domid
        self.devid = devid
        self.config = config
        self.journal = journal
        self._wake = wake
        self.path = join(home, "backend", kind, str(domid), str(devid))
        self.relative = f"backend/{kind}/{domid}/{devid}"
        self.phase = Phase.NEW
        self.device: BlockDevice | None = None
        #: the loop device's backing file the target's I/O goes to (loopfile.py), or None: on `device`
        self._backing_fd: int | None = None
        self.target: DeviceTarget | NbdTarget | None = None
        self.writable = False
        #: one per queue while connected (empty otherwise); queue i serves queue-i/ (or the top level)
        self.dataplanes: list[DataPlane | RemoteQueue] = []
        #: queues of the current drain already stopped and released, for its one log line
        self._drained: list[DataPlane | RemoteQueue] = []
        self.frontend: str | None = None
        self.broken: str | None = None  # set from the data plane thread
        self._closing_since: float | None = None
        self._close_grace_logged = False
        #: a failure waiting for the data plane to drain before it is published
        self._failure: str | None = None
        #: the state a frontend-initiated disconnect publishes once drained (5 or 6)
        self._disconnect_state: int | None = None
        self._drain_since: float | None = None
        self._drain_reported = False
        self._lock = threading.Lock()
        self.errors = ErrorResponses(f"xbc-{domid}-{devid}")  # every ring's, across reconnects
        self.fd_name = fd_name(kind, domid, devid)
        #: the device fd is in the manager's fd store (parked by us or by the engine before us)
        self._parked = False
        #: taken over while the frontend was connected to the previous engine: its ring's grants
        #: lived in that process (local transport), so wait for the frontend to reconnect
        self._stale_ring = False
        #: the device came from a previous engine: the next connect is a re-attach (logged as one)
        self._taken_over = False
        #: the frontend's RING_NODES as this pass's snapshot read them, None if it did not
        self._ring_nodes: dict[str, str | None] | None = None
        #: this pass's snapshot reads them (reconcile's frontend_changed)
        self._read_ring_nodes = False
        #: the backend's OPEN_NODES as this pass's snapshot read them, None if it did not
        self._open_nodes: dict[str, str | None] | None = None
        #: the last `state` we wrote is InitWait: the frontend's next step is its ring and Initialised
        self._awaiting_initialised = False
        #: the device's properties (_device_nodes) as we last wrote them for the device held now:
        #: Connected's batch writes only what differs (issue 20)
        self._device_published: dict[str, str] = {}
        #: a snapshot saw SCRIPT_DONE_NODE: the block script is done writing in the backend directory
        self._script_done = False

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def dataplane(self) -> DataPlane | RemoteQueue | None:
        """Queue 0's data plane (the only one unless the frontend asked for several), or None."""
        return self.dataplanes[0] if self.dataplanes else None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.domid, self.devid)

    def error_path(self) -> str:
        return join(self.home, "error", self.relative, "error")

    def _log(self, message: str) -> None:
        self.journal.info(f"{self.relative}: {message}", DOMID=self.domid, DEVID=self.devid)

    def _set_state(self, state: int) -> None:
        self._write_if_present({join(self.path, "state"): str(state)})

    def _write_if_present(self, items: dict[str, str]) -> bool:
        """Write `items` (absolute paths) in one transaction unless libxl deleted the backend (its
        `state` is gone): never re-create one. The guard's read and the writes go in one batch, one
        round trip inside the transaction instead of one per node (issue 20: under TCG each costs
        dom0 a trip to oxenstored and back); when the guard says no, the abort discards the writes
        unseen. True if written."""
        state = join(self.path, "state")

        def body(tx: Transaction) -> bool:
            (present,), failure = tx.read_many_then_write([state], items)
            if present is None:
                tx.abort()
                return False
            if failure is not None:
                raise failure
            return True

        written = self.store.run_transaction(body)
        if written and state in items:
            self._awaiting_initialised = items[state] == str(XenbusState.InitWait)
        return written

    def _fail(self, reason: str, *, code: str = EngineRefusal.code) -> None:
        """Like xenbus_dev_fatal(): error node, state Closing, release what we hold — once no
        request is in flight; until then the failure waits (reconcile() comes back to it)."""
        if self._failure is None:
            self._failure = reason
            self.journal.error(f"{self.relative}: {reason}", DOMID=self.domid, DEVID=self.devid, CODE=code)
        if not self._quiesce():
            return
        self._failure = None
        self._close_device()

        self._write_if_present(
            {self.error_path(): reason[:400], join(self.path, "state"): str(XenbusState.Closing)}
        )
        self.phase = Phase.FAILED

    def fail_internal(self, reason: str) -> None:
        """The engine caught an unexpected exception from this device: fail it (error node,
        Closing), after its I/O drained like any failure. Never a reason to stop other devices."""
        if self.phase in (Phase.FAILED, Phase.CLOSED):
            return
        self._fail(reason)

    # -- the state machine ------------------------------------------------------------------------
    def reconcile(self, *, frontend_changed: bool = False) -> bool:
        """Act on the current nodes. Returns False once the backend directory is gone and the device
        released (forget me). `frontend_changed`: an event of the frontend's directory is among
        this pass's causes (its ring nodes are then read with the snapshot, a connect may be due)."""
        frontend_read = self.frontend is not None  # its state comes with the snapshot
        self._read_ring_nodes = frontend_changed
        snapshot = self._snapshot_and_init_wait() if self._init_wait_direct() else self._snapshot()
        if snapshot is None:
            return not self.teardown("backend directory removed")
        nodes, fe_text = snapshot
        self._publish_errors()
        online = nodes.get("online", "1") != "0"
        if self.broken is not None and self.phase is Phase.CONNECTED:
            reason, self.broken = self.broken, None
            self._fail(f"frontend broke the ring: {reason}")
            return True
        if self._failure is not None and online:
            self._fail(self._failure)  # still draining
            return True
        if self._disconnect_state is not None and online:
            self._disconnect(self._disconnect_state)  # still draining
            return True
        if self.phase is Phase.NEW:
            self._publish_features(nodes)
        if not online:
            self._detach(nodes)
            return True
        if self.phase in (Phase.FAILED, Phase.CLOSED):
            return True
        if self.phase is Phase.INIT_WAIT and (identity.PHYSICAL_DEVICE in nodes or identity.OWNER in nodes):
            try:
                self._open_device()
            except XenblockError as exc:
                # A refusal with its own code (an NBD export that is not the published one) says
                # so in the error node too: the block script shows that text as hotplug-error.
                coded = exc.code != EngineRefusal.code
                self._fail(exc.one_line() if coded else exc.message, code=exc.code)
                return True
        if self.target is None:
            return True
        try:
            # read with the backend's nodes unless the device was opened in this pass
            fe_state = self._parse_frontend_state(fe_text) if frontend_read else self._frontend_state()
        except EngineRefusal as exc:
            self._fail(exc.message)
            return True
        if self._stale_ring and fe_state not in (3, 4):
            self._stale_ring = False
            self._log("frontend left the previous engine's ring: serving it again when it connects")
        if (
            self.phase in (Phase.OPENED, Phase.DISCONNECTED)
            and fe_state in (1,)
            and XenbusState.of(nodes.get("state")) is XenbusState.Closed
        ):
            self._log("frontend re-initialising: prepare for reconnect")
            self._set_state(2)
        elif self._stale_ring and fe_state in (3, 4):
            pass  # still on the dead engine's ring: nothing to connect until it reconnects
        elif self.phase in (Phase.OPENED, Phase.DISCONNECTED) and fe_state in (3, 4):
            try:
                self._connect()
            except XenblockError as exc:
                self._fail(f"cannot connect: {exc.message}")
        elif self.phase is Phase.CONNECTED and fe_state in (5, 6, None):
            self._disconnect(6 if fe_state in (6, None) else 5)
        elif (
            self.phase is Phase.DISCONNECTED
            and fe_state == 6
            and XenbusState.of(nodes.get("state")) is XenbusState.Closing
        ):
            self._set_state(6)
        if self.phase is Phase.OPENED and self._script_done and not self._device_published:
            # after the branches above: a connect in this pass writes them with Connected instead
            self._publish_device()
        return True

    def _snapshot(self) -> tuple[dict[str, str], str | None] | None:
        """The backend nodes reconcile() decides on (those of RECONCILE_NODES present) and, once we
        know the frontend, its `state` text, read as one batch: one round trip; None once the
        backend directory is gone. A read_dir of the whole directory (~30 nodes: libxl's, the
        script's, ours) was 4 round trips inside its transaction, and the frontend's state one
        more, on every watch event of the device, our own writes' included (issue 20).

        No transaction: the batch is a trigger, not a record. Every action it leads to reads what
        it acts on in its own transaction (_publish_features), checks it against the kernel's
        answer (_open_device) or parses and bounds it as the guest's (_read_ring_params), or
        writes only if the backend still exists (_write_if_present); `online`=0 is final; and any
        write landing between two of these reads fires a watch event, so a torn view is followed
        by a fresh one, as with merged or reordered events (the module docstring)."""
        paths = self._snapshot_paths()
        return self._parse_snapshot(paths, self.store.read_many(paths))

    def _snapshot_paths(self) -> list[str]:
        """The snapshot's paths: the backend's, the frontend's state once we know it, and after
        them what the action this pass may take reads (issue 20: each was a round trip, or a
        transaction, of its own on the way to the answer the other side waits for):
        - waiting for physical-device (INIT_WAIT): the nodes _open_device() checks, so the block
          script's wait for `opened`=1 is this batch, the open and that write;
        - a connect may be due (OPENED, DISCONNECTED, our last state written InitWait) and the
          frontend's directory changed: its ring nodes (our own writes' and a rescan's passes,
          and a frontend's Initialising after our Closed, do not read them);
        - opened, until a snapshot has seen it: SCRIPT_DONE_NODE, what the device's properties
          wait for (_publish_device). Not while waiting for physical-device: that batch is on the
          script's wait, and our own `opened`=1 brings a pass that reads it (an engine that took
          a device over finds it there).
        Later in the same batch than what they follow: xenstored answers a batch in order, so
        what the script published with physical-device (one transaction: identity.PUBLISHED), or
        the frontend wrote before its Initialised, is seen with it."""
        paths = [self.path, *(join(self.path, name) for name in RECONCILE_NODES)]
        if not self._script_done and self.phase is Phase.OPENED:
            paths.append(join(self.path, SCRIPT_DONE_NODE))
        if self.frontend is not None:
            paths.append(join(self.frontend, "state"))
            if (
                self._read_ring_nodes
                and self._awaiting_initialised
                and self.phase in (Phase.OPENED, Phase.DISCONNECTED)
            ):
                paths += [join(self.frontend, name) for name in RING_NODES]
        elif self.phase is Phase.INIT_WAIT:
            paths += [join(self.path, name) for name in OPEN_NODES]
        return paths

    def _parse_snapshot(
        self, paths: list[str], values: list[str | None]
    ) -> tuple[dict[str, str], str | None] | None:
        """_snapshot()'s answer from the values of `paths` (_snapshot_paths()); the nodes read with
        it for this pass's action are kept for it (_open_device, _read_ring_params)."""
        if values[0] is None:
            return None
        n = len(RECONCILE_NODES) + 1
        present = zip(RECONCILE_NODES, values[1:n], strict=True)
        nodes = {name: value for name, value in present if value is not None}
        if n < len(paths) and paths[n] == join(self.path, SCRIPT_DONE_NODE):
            self._script_done = self._script_done or values[n] is not None
            n += 1
        fe_text = None
        if self.frontend is not None:
            fe_text, n = values[n], n + 1
        extra = values[n:]
        if self.frontend is not None:
            self._ring_nodes = dict(zip(RING_NODES, extra, strict=True)) if extra else None
            self._open_nodes = None
        else:
            self._ring_nodes = None
            self._open_nodes = dict(zip(OPEN_NODES, extra, strict=True)) if extra else None
        return nodes, fe_text

    def _init_wait_direct(self) -> bool:
        """A new backend whose InitWait does not depend on anything but its own nodes: not one a
        previous engine left in the fd store (_publish_features decides from the frontend then)."""
        store = self.config.fd_store
        return self.phase is Phase.NEW and (store is None or not store.holds(self.fd_name))

    def _snapshot_and_init_wait(self) -> tuple[dict[str, str], str | None] | None:
        """A new backend's snapshot, its features and InitWait in one transaction: the reads and
        the writes go in one batch, and the transaction commits only if what was read allows
        what was written (the backend exists with a `state`, and is not being detached); else it
        aborts unseen and reconcile() goes on from the snapshot as for any backend
        (_publish_features). Kernel blkback writes InitWait from its probe; here libxl's
        transaction to InitWait was the snapshot's round trip and 4 of the features' (start,
        reads, writes, commit), now 3 in all (issue 20)."""
        items = {join(self.path, name): value for name, value in self._feature_nodes(init_wait=True).items()}

        def body(tx: Transaction) -> tuple[tuple[dict[str, str], str | None] | None, bool]:
            paths = self._snapshot_paths()
            values, failure = tx.read_many_then_write(paths, items)
            snapshot = self._parse_snapshot(paths, values)
            if snapshot is None or "state" not in snapshot[0] or snapshot[0].get("online") == "0":
                tx.abort()
                return snapshot, False
            if failure is not None:
                raise failure
            return snapshot, True

        snapshot, written = self.store.run_transaction(body)
        if written:
            self._awaiting_initialised = True
            self._entered_init_wait()
        return snapshot

    def _feature_nodes(self, *, init_wait: bool) -> dict[str, str]:
        """What InitWait publishes (relative names): our limits, `opened`=0 and, unless a live
        frontend or a detach says otherwise, the state itself."""
        items = {
            "feature-max-indirect-segments": str(self.config.max_indirect_segments),
            "max-ring-page-order": str(self.config.max_ring_page_order),
            "multi-queue-max-queues": str(self.config.max_queues),
            "opened": "0",
        }
        if init_wait:
            items["state"] = str(XenbusState.InitWait)
        return items

    def _entered_init_wait(self) -> None:
        self.phase = Phase.INIT_WAIT
        self._log("InitWait: waiting for physical-device")

    def _publish_features(self, nodes: dict[str, str]) -> None:
        def body(tx: Transaction) -> bool:
            # the nodes this decides on in one batch, the writes in another (issue 20: a round
            # trip each was ~10 inside this transaction)
            state, frontend, online = tx.read_many(
                [join(self.path, n) for n in ("state", "frontend", "online")]
            )
            if state is None:
                return False  # never re-create a backend libxl deleted
            # taking over a live backend (issue 21) whose frontend is still on its ring: it is not
            # shown InitWait in between; `opened` goes back to 1 once the device is re-verified. A
            # frontend that left meanwhile is handled as a fresh backend's (InitWait).
            live = (
                state == str(XenbusState.Connected)
                and self.config.fd_store is not None
                and self.config.fd_store.holds(self.fd_name)
                and frontend is not None
                and _frontend_matches(frontend, self.domid, self.devid)
                and tx.read_optional(join(frontend, "state")) in ("3", "4")
            )
            items = self._feature_nodes(init_wait=online != "0" and not live)
            tx.write_many({join(self.path, name): value for name, value in items.items()})
            return "state" in items

        if self.store.run_transaction(body):
            self._awaiting_initialised = True
        self._entered_init_wait()

    def _open_device(self) -> None:
        """Open what physical-device names and prove it is the published device: every identity
        node present (physical-device-luid, diskseq) must parse and name the diskseq the opened
        device has; any disagreement, among them or with the device, fails it (as the kernel patch
        does). Their grammar and what we accept from other writers: xenstore/identity.py.

        The nodes come with the pass's snapshot (one batch, after physical-device), not in a
        transaction of their own (3 round trips on the script's wait, issue 20). A transaction
        added nothing to the check: the script publishes and withdraws them in one transaction,
        so a batch that sees physical-device sees what came with it; a read torn by a later
        rewrite can only disagree (a refusal), never pass, since the luid's diskseq names one
        incarnation of one device and must be what the opened fd has; and the nodes can change
        after any read, a transaction's too, which is why the check is on the fd."""

        def body(tx: Transaction) -> dict[str, str | None]:
            return dict(zip(OPEN_NODES, tx.read_many([join(self.path, n) for n in OPEN_NODES]), strict=True))

        nodes, self._open_nodes = self._open_nodes, None  # read with this pass's snapshot
        if nodes is None:
            nodes = self.store.run_transaction(body)
        mode, frontend = nodes["mode"], nodes["frontend"]
        if nodes[identity.PHYSICAL_DEVICE] is None:
            self._open_export(nodes[identity.OWNER], nodes["params"], mode, frontend)
            return
        try:
            published = PublishedIdentity.from_nodes(nodes)
        except IdentityError as exc:
            raise EngineRefusal(exc.message) from exc
        if published is None:
            raise EngineRefusal("physical-device was withdrawn before the engine read it")
        if published.diskseq is None and self.config.require_luid:
            raise EngineRefusal(
                "neither physical-device-luid nor diskseq is published: refusing an unverifiable device"
            )
        if mode not in ("r", "w"):
            raise EngineRefusal(f"mode {mode!r} is not r or w")
        if frontend is None or not _frontend_matches(frontend, self.domid, self.devid):
            raise EngineRefusal(f"frontend path {frontend!r} does not belong to domain {self.domid}")
        major, minor, devt = published.major, published.minor, published.devt
        inherited = self.config.fd_store.take(self.fd_name) if self.config.fd_store is not None else None
        if inherited is not None:
            # the manager kept its copy (a restart): a refusal below must drop it too
            self._parked = self.config.fd_store is not None and self.fd_name in self.config.fd_store.in_store
            device = self._adopt(inherited, devt, writable=mode == "w")
        else:
            # One open, judged below through its own fd (issue 20: a look through a first,
            # read-only fd before it was a second open and close on the script's wait for
            # `opened`=1, a third of this pass's CPU, and the close could wait for udev's probe)
            present = blockdev.open_present(devt, writable=mode == "w")
            if present is None:
                raise EngineRefusal(f"no block device {major}:{minor} (stale physical-device?)")
            device = present
        verdict = identity.judge(published.diskseq, device.identity)
        if verdict not in (Liveness.LIVE, Liveness.UNVERIFIED):
            seen = device.identity.diskseq
            device.close()
            self._unpark()
            # An empty device is the common case after an engine restart: the loop device the luid
            # named auto-cleared when the old engine died. Say so; an admin reads "replaced" as an attack.
            why = (
                "the device it named is gone and the number now names an empty device (a loop device"
                " that auto-cleared while no backend held it?); nothing to serve"
                if verdict is Liveness.EMPTY
                else "the device was replaced; refusing to give the guest the wrong disk"
            )
            raise EngineRefusal(
                f"diskseq mismatch on {major}:{minor}: device has {seen:x}, published diskseq is"
                f" {published.diskseq:x} ({why})"
            )
        self.device = device
        self.writable = mode == "w"
        self.frontend = frontend
        self.target = self._on_backing_file(
            replace(
                DeviceTarget.from_block_device(device),
                direct_writes=self.config.direct_writes,
                direct_writes_on_pool=self.config.direct_writes_on_pool,
                direct_reads=self.config.direct_reads,
            )
        )
        if not self._parked and self.config.fd_store is not None:
            # before `opened`=1: from then on the block script lets go, and an engine dying
            # between the two would leave the store nothing to hand the next one (a device handed
            # over by --takeover is new to the store too)
            self._parked = self.config.fd_store.park(self.fd_name, device.fd)
        self.store.write(join(self.path, "opened"), "1")
        self.phase = Phase.OPENED
        self._taken_over = inherited is not None and self.config.transport.rings_outlive_engine
        how = "took over" if inherited is not None else "opened"
        access = "rw" if self.writable else "ro"
        on = ", I/O on its backing file" if self._backing_fd is not None else ""
        self._log(f"{how} {major}:{minor} diskseq {device.identity.diskseq:x} ({access}{on})")
        # A frontend still Initialised/Connected to the previous engine: on Xen its ring, grant and
        # event channel live on, and _connect() re-attaches to them (ring.py rebuilds our side from
        # the shared indices). On the local transport they died with that engine's registry: the
        # frontend must reconnect, and Closed tells it to.
        if (
            inherited is not None
            and not self.config.transport.rings_outlive_engine
            and self._frontend_state(strict=False) in (3, 4)
        ):
            self._stale_ring = True
            self.phase = Phase.DISCONNECTED
            self._set_state(6)
            self._log("the frontend was connected to the previous engine: asked it to reconnect (Closed)")

    def _on_backing_file(self, target: DeviceTarget) -> DeviceTarget:
        """`target` with its I/O on the loop device's backing file where loopfile.py verifies it
        (the same contract as kernel blkback's bios: neither reads nor fills the loop device's
        page cache; see its docstring), else `target` unchanged, logged why. Only the fd the I/O
        goes to changes: the size stays the loop's (never the file's length), and `self.device`
        stays what is verified, parked, handed over and closed for delete-on-close. Called after
        the identity check, on every open and takeover: a successor re-derives the file."""
        device = self.device
        if not self.config.loop_file or device is None or not is_loop(device):
            return target
        if target.direct_writes and not target.read_only:
            # asked for explicitly: O_DIRECT bios to the loop device (io.DirectWriter) stay what
            # `--direct-writes` measures (scenario 12's engine_direct rows)
            self._log("serving the loop device itself, not its backing file: --direct-writes")
            return target
        try:
            served = on_backing_file(device, target)
        except NotServed as exc:
            self._log(f"serving the loop device itself, not its backing file: {exc}")
            return target
        self._backing_fd = served.fd
        return served

    def _open_export(
        self, owner: str | None, params: str | None, mode: str | None, frontend: str | None
    ) -> None:
        """An NBD export the block script published for us (kind=nbd owner record, nothing
        kernel-side): connect, compare our handshake with the record (nbdio.open_published),
        then `opened`=1. Nothing is parked in the fd store: a restarted engine re-verifies."""
        if owner is None:
            raise EngineRefusal("the owner record was withdrawn before the engine read it")
        try:
            record = identity.parse_owner(owner)
        except OwnerRecordError as exc:
            raise EngineRefusal(f"owner record without physical-device is malformed: {exc.message}") from exc
        if not isinstance(record, NbdOwnerRecord):
            raise EngineRefusal(f"owner record kind={record.kind} without physical-device: nothing to open")
        if mode not in ("r", "w"):
            raise EngineRefusal(f"mode {mode!r} is not r or w")
        if frontend is None or not _frontend_matches(frontend, self.domid, self.devid):
            raise EngineRefusal(f"frontend path {frontend!r} does not belong to domain {self.domid}")
        self.target = open_published(record, params, writable=mode == "w")
        self.writable = mode == "w"
        self.frontend = frontend
        self.store.write(join(self.path, "opened"), "1")
        self.phase = Phase.OPENED
        access = "rw" if self.writable else "ro"
        self._log(f"opened NBD export {record.uri} size {record.size} flags {record.flags:#x} ({access})")

    def _adopt(self, fd: int, devt: int, *, writable: bool) -> BlockDevice:
        """The fd a previous engine parked, re-verified before use: a block device, the one
        physical-device names (dev_t), open for what `mode` needs. Its diskseq is judged by the
        caller like a fresh open's. Refused: the fd is closed and the manager's copy dropped."""

        def refuse(why: str) -> EngineRefusal:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._unpark()
            return EngineRefusal(f"the device taken back from the fd store {why}; refusing it")

        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            raise refuse(f"is not an open file ({exc.strerror})") from None
        if not stat.S_ISBLK(st.st_mode):
            raise refuse("is not a block device")
        if st.st_rdev != devt:
            raise refuse(
                f"is {os.major(st.st_rdev):x}:{os.minor(st.st_rdev):x}, physical-device names"
                f" {os.major(devt):x}:{os.minor(devt):x} (the published device changed while no engine ran)"
            )
        if (flags & os.O_ACCMODE) != (os.O_RDWR if writable else os.O_RDONLY):
            raise refuse("is not open for the backend's mode")
        try:
            return blockdev.BlockDevice(fd, blockdev.identify(fd))
        except XenblockError as exc:
            raise refuse(f"cannot be identified: {exc.one_line()}") from None

    def _unpark(self) -> None:
        if self._parked and self.config.fd_store is not None:
            self._parked = False
            self.config.fd_store.unpark(self.fd_name)

    def _frontend_state(self, *, strict: bool = True) -> int | None:
        """The frontend's `state` (0-8), None while it has none. A value that is not a xenbus state
        raises EngineRefusal (the device fails, nothing else does); with `strict=False` (detach, where
        we release whatever the guest says) it reads as None."""
        if self.frontend is None:
            return None
        text = self.store.read_optional(join(self.frontend, "state"))
        return self._parse_frontend_state(text, strict=strict)

    def _parse_frontend_state(self, text: str | None, *, strict: bool = True) -> int | None:
        """_frontend_state() of a `state` text already read."""
        if text is None:
            return None
        try:
            return parse_uint(text, "frontend state", maximum=8)
        except NodeValueError as exc:
            if not strict:
                return None
            raise EngineRefusal(exc.message) from exc

    def _read_ring_params(self) -> list[RingParams]:
        """Every queue's ring parameters, read and parsed (blkif.h "Frontend XenBus Nodes"):
        `multi-queue-num-queues` absent or 1 means the top-level `ring-ref*` and `event-channel`;
        N >= 2 means `queue-0..N-1/ring-ref*` and `queue-i/event-channel`. `ring-page-order`,
        `protocol` and `feature-persistent` are top-level for every queue.

        Two batches, no transaction (issue 20: this was a round trip per node inside one, 8+ on
        the connect's critical path): the top-level nodes, normally read with the pass's snapshot
        (_snapshot_paths), then, with a ring-page-order or several queues, what their two numbers
        name. The values are the guest's own; a transaction made them a snapshot, but the guest
        can write any mix of them anyway, so a torn read gives it nothing, and each is parsed and
        bounded below whatever it is. Linux blkfront writes them all before it switches to
        Initialised, which is what we act on."""
        assert self.frontend is not None
        fe = self.frontend
        max_queues = self.config.max_queues
        values, self._ring_nodes = self._ring_nodes, None  # read with this pass's snapshot
        if values is None:
            values = dict(
                zip(RING_NODES, self.store.read_many([join(fe, n) for n in RING_NODES]), strict=True)
            )
        first_order = uint_or_none(values["ring-page-order"], maximum=self.config.max_ring_page_order)
        first_queues = uint_or_none(values["multi-queue-num-queues"], maximum=max_queues) or 1
        # only what the two numbers name is read: a bad one is refused below, from these values
        names: list[str] = []
        for q in range(first_queues):
            prefix = "" if first_queues == 1 else f"queue-{q}/"
            if first_queues > 1:
                names += [f"{prefix}ring-ref", f"{prefix}event-channel"]
            if first_order is not None:
                names += [f"{prefix}ring-ref{i}" for i in range(1 << first_order)]
        if names:
            values.update(zip(names, self.store.read_many([join(fe, name) for name in names]), strict=True))
        queues_text = values.get("multi-queue-num-queues")
        queues = 1
        if queues_text is not None:
            queues = uint_or_none(queues_text, maximum=max_queues) or 0
            if queues == 0:
                raise EngineRefusal(
                    f"multi-queue-num-queues {queues_text[:24]!a} is not a decimal number"
                    f" 1..{max_queues} (our multi-queue-max-queues)"
                )
        order_text = values.get("ring-page-order")
        order = None
        if order_text is not None:
            try:
                order = parse_uint(order_text, "ring-page-order", maximum=self.config.max_ring_page_order)
            except NodeValueError as exc:
                raise EngineRefusal(f"{exc.message} (the most we advertised)") from exc
        out = []
        for q in range(queues):
            prefix = "" if queues == 1 else f"queue-{q}/"
            if order is None:
                refs = [values.get(f"{prefix}ring-ref") or ""]
            else:
                refs = [values.get(f"{prefix}ring-ref{i}") or "" for i in range(1 << order)]
            try:
                out.append(
                    RingParams.parse(
                        ring_refs=refs,
                        event_channel=values.get(f"{prefix}event-channel") or "",
                        protocol=values.get("protocol"),
                        ring_page_order=order_text,
                        max_ring_page_order=self.config.max_ring_page_order,
                        # never on unless we offer it (the node we publish at connect says the same)
                        feature_persistent=values.get("feature-persistent")
                        if self.config.persistent_grants
                        else None,
                    )
                )
            except XenblockError as exc:
                where = f" (queue {q})" if queues > 1 else ""
                raise EngineRefusal(f"{exc.message}{where}") from exc
        return out

    def _connect(self) -> None:
        assert self.target is not None
        queues = self._read_ring_params()
        params = queues[0]
        target = self.target
        limits, properties = self._device_nodes()
        self._set_up_queues(queues, target, limits)
        self._log_reattach(queues)

        # Normally written once the device was handed over (_publish_device): then this batch is
        # the state alone. What is missing or differs (that write failed, a frontend quicker than
        # the block script, a device taken over from a previous engine) goes with it: the frontend
        # reads them all once it sees Connected.
        nodes = {
            name: value for name, value in properties.items() if self._device_published.get(name) != value
        }
        counts = self.errors.due(force=True)  # the error counts, if they changed since published
        if counts is not None:
            nodes[ERROR_RESPONSES_NODE] = counts
        nodes["state"] = str(XenbusState.Connected)
        if self._write_if_present({join(self.path, name): value for name, value in nodes.items()}):
            self._device_published.update(properties)
            if counts:
                self.errors.published(counts)
        # The ring threads start only now (issue 20): Thread.start() waits for the new thread to
        # run, a scheduling round trip that was on the way to Connected and now overlaps the
        # frontend's own reaction to it. Nothing is lost meanwhile: the ring is mapped and the
        # channel bound, so a request pushed before a thread runs waits in the ring with its event
        # pending, and each thread serves the ring before its first sleep.
        for dp in self.dataplanes:
            dp.start()
        self.phase = Phase.CONNECTED
        grants = "persistent grants" if params.persistent else "grants mapped per request"
        if not params.persistent and self.config.transport.copies_grants:
            grants = "grants copied per ring pass"  # backend/grantcopy.py
        self._log(
            f"connected: {params.abi.protocol}, {len(queues)} queue(s) of {len(params.ring_refs)}"
            f" ring page(s), {grants}"
        )

    def _device_nodes(self) -> tuple[DeviceLimits, dict[str, str]]:
        """The held device's limits, and the backend nodes that describe it to the frontend
        (blkif.h "Backend Device Properties"; `feature-persistent` is what we offer, in use only
        if the frontend's node says 1 as well)."""
        target = self.target
        assert target is not None
        discard = target.discard is not DiscardMode.NONE and self.writable
        # An NBD export can flush only if its server sent SEND_FLUSH: never advertise a no-op.
        flush = not isinstance(target, NbdTarget) or target.info.has(nbd_proto.TFLAG_SEND_FLUSH)
        limits = DeviceLimits(
            sectors=target.sectors,
            logical_block_size=target.logical_block_size,
            read_only=not self.writable or target.read_only,
            flush=flush,
            discard=discard,
            discard_secure=discard and target.discard_secure,
            max_indirect_segments=self.config.max_indirect_segments,
        )
        nodes = {
            "sectors": str(target.sectors),
            "info": str(blkif.info_bits(read_only=limits.read_only)),
            "sector-size": str(target.logical_block_size),
            "physical-sector-size": str(target.physical_block_size),
            "feature-flush-cache": "1" if flush else "0",
            "feature-barrier": "0",
            "feature-persistent": "1" if self.config.persistent_grants else "0",
            "feature-discard": "1" if discard else "0",
        }
        if discard:
            nodes["discard-granularity"] = str(target.discard_granularity)
            nodes["discard-alignment"] = "0"
            nodes["discard-secure"] = "1" if limits.discard_secure else "0"
        return limits, nodes

    def _publish_device(self) -> None:
        """Once the device is open and the block script is done (SCRIPT_DONE_NODE seen): the
        device's properties and the first error counts, in one guarded transaction, while libxl
        unpauses the domain and the frontend sets up its ring. With Connected they were 12 more
        writes on the connect's critical chain, and 12 more watch events ahead of its commit's
        reply to every watcher (issue 20: GRUB's Initialised -> Connected was 0.05-0.21 s longer
        than kernel blkback's in the lane). Not right after `opened`=1 (session 12): the script
        then writes hotplug-status in its own transaction beside them, and two transactions
        creating nodes in one directory conflict (C xenstored: creating a child writes its parent;
        oxenstored: their paths' common prefix is that directory): EAGAIN and the body again for
        whichever commits second, or, in oxenstored, a replay in the daemon, on the hand-off the
        script and libxl wait for (issue 20). Not on the script's wait either (with `opened`=1,
        a transaction of 3 round trips and 13 writes instead of one write). The frontend reads
        them only once it sees Connected, and QEMU's xen-block writes them at realize, before any
        frontend, too; a frontend quicker than the script gets them with Connected (_connect).
        `show` tells an engine's backend by the counts node, so it is there from the hand-off on."""
        if self.target is None:
            return  # _open_device sets it or raises: nothing is held
        _limits, nodes = self._device_nodes()
        counts = self.errors.due(force=True)
        items = dict(nodes)
        if counts is not None:
            items[ERROR_RESPONSES_NODE] = counts
        if self._write_if_present({join(self.path, name): value for name, value in items.items()}):
            self._device_published = nodes
            if counts is not None:
                self.errors.published(counts)

    def _log_reattach(self, queues: list[RingParams]) -> None:
        """Say so when a queue's ring was live when we attached (issue 21: a previous engine served
        it): what that engine finished and we published, and what we took again."""
        for q, (params, dp) in enumerate(zip(queues, self.dataplanes, strict=False)):
            if not isinstance(dp, DataPlane):
                continue  # a worker process attached this queue's ring
            ring = dp.ring
            if self._taken_over or ring.recovered or ring.outstanding_at_attach:
                where = f"queue {q}: " if len(queues) > 1 else ""
                self._log(
                    f"{where}re-attached to a live ring (ring-ref {','.join(map(str, params.ring_refs))},"
                    f" event channel {params.event_channel}): {ring.recovered} answer(s) a previous"
                    f" engine finished published, {ring.outstanding_at_attach} request(s) taken again"
                )
        self._taken_over = False

    def _set_up_queues(
        self, queues: list[RingParams], target: DeviceTarget | NbdTarget, limits: DeviceLimits
    ) -> None:
        """One data plane per queue, each mapping its own ring and binding its own channel, with its
        own grant cache and I/O workers: on a worker process if the engine has them, else on a
        thread here (an NBD export always: its queues share one connection, nbdio.py). Each goes
        into self.dataplanes as soon as it exists, and none is started here: _connect() starts
        them all once every queue is set up and Connected is written, so if one fails, the
        failure path's drain stops the others (none took a request)."""
        base = f"xbc-{self.domid}-{self.devid}"
        pool = self.config.worker_pool
        for q, params in enumerate(queues):
            name = base if len(queues) == 1 else f"{base}-q{q}"
            on_broken = self._broken_callback(q if len(queues) > 1 else None)
            if pool is not None and isinstance(target, DeviceTarget):
                try:
                    queue = pool.serve(
                        domid=self.domid,
                        params=params,
                        target=target,
                        limits=limits,
                        name=name,
                        io_workers=self.config.workers,
                        max_persistent_grants=self.config.max_persistent_grants,
                        native=self.config.native,
                        blocking_wakeup=self.config.blocking_wakeup,
                        native_loop=self.config.native_loop,
                        on_broken=on_broken,
                        errors=self.errors,
                    )
                except WorkerTimeout as exc:
                    self.dataplanes.append(exc.queue)  # maybe live in the worker: drained like the rest
                    raise
                self.dataplanes.append(queue)
                continue
            self.dataplanes.append(
                DataPlane(
                    self.config.transport,
                    self.domid,
                    params,
                    target,
                    limits,
                    workers=self.config.workers,
                    on_broken=on_broken,
                    name=name,
                    max_persistent_grants=self.config.max_persistent_grants,
                    errors=self.errors,
                    native=self.config.native,
                    blocking_wakeup=self.config.blocking_wakeup,
                    native_loop=self.config.native_loop,
                    groups=self.config.ring_groups,
                )
            )

    def _publish_errors(self, *, force: bool = False) -> None:
        """The error-response counts for `xenblockctl show`, at most once a second (the rescan
        every few seconds brings them out without an event). The first ones go with Connected
        (_connect): until a ring is served there is nothing to count."""
        value = self.errors.due(force=force) if self.phase is Phase.CONNECTED or self.errors.total else None
        if value is not None:
            try:
                self._write_node(ERROR_RESPONSES_NODE, value)
            except XenblockError as exc:  # a count not shown must never stop a teardown
                self.journal.warning(f"{self.relative}: cannot publish error counts: {exc.one_line()}")
                return
            self.errors.published(value)

    def _write_node(self, name: str, value: str) -> None:
        self._write_if_present({join(self.path, name): value})

    def _broken_callback(self, queue: int | None) -> Callable[[str], None]:
        def on_broken(reason: str) -> None:
            # Called on the data plane thread: hand over to the xenbus thread. One broken queue
            # fails the device (every queue of it), never another device.
            self.broken = reason if queue is None else f"queue {queue}: {reason}"
            self._wake()

        return on_broken

    def _quiesce(self) -> bool:
        """Stop every queue's data plane and wait (at most DRAIN_STEP in all) for their in-flight
        I/O. True once none is left on any queue: only then may the device be closed, the rings
        unmapped, Closing/Closed published. A queue that drained is released at once (its ring,
        its grants); the others stay ours and a later reconcile() tries again (pending_deadline).
        I/O still running after DRAIN_TIMEOUT is reported, once, and waited for all the same."""
        if not self.dataplanes:
            return True
        now = time.monotonic()
        if self._drain_since is None:
            self._drain_since = now
        for dp in self.dataplanes:
            dp.request_stop()  # every queue stops taking requests before any is waited for
        step_end = now + DRAIN_STEP
        left: list[DataPlane | RemoteQueue] = []
        for dp in self.dataplanes:
            if dp.stop(max(0.0, step_end - time.monotonic())):
                self._drained.append(dp)
            else:
                left.append(dp)
        self.dataplanes = left
        if left:
            waited = now - self._drain_since
            if waited >= DRAIN_TIMEOUT and not self._drain_reported:
                self._drain_reported = True
                in_flight = sum(dp.in_flight for dp in left)
                self.journal.error(
                    f"{self.relative}: {in_flight} request(s) still in flight on {len(left)} queue(s) after"
                    f" {waited:.0f} s; holding the device, the ring and the guest's pages until they end",
                    DOMID=self.domid,
                    DEVID=self.devid,
                    CODE="drain-timeout",
                )
            return False
        if self._drain_reported:
            self._log(f"stuck I/O ended after {now - self._drain_since:.0f} s")
        self._drain_since = None
        self._drain_reported = False
        drained, self._drained = self._drained, []
        self._log_ring_stats(drained)
        return True

    def _log_ring_stats(self, dataplanes: list[DataPlane | RemoteQueue]) -> None:
        """One line per device however many queues it had (log readers count ring stops per
        connection), with the queues' counts summed."""
        requests = sum(dp.stats.requests for dp in dataplanes)
        errors = sum(dp.stats.errors for dp in dataplanes)
        caches = [dp.grant_cache for dp in dataplanes if dp.grant_cache is not None]
        grants = ""
        if caches:

            def total(name: str) -> int:
                return sum(getattr(c.stats, name) for c in caches)

            grants = (
                f", persistent grants: {total('maps')} mapped, {total('unmaps')} unmapped,"
                f" {sum(c.mapped for c in caches)} still mapped, {total('hits')} hits,"
                f" {total('evictions')} evictions, {total('transient')} transient,"
                f" {total('resource_failures')} out of resources ({total('shed')} given back,"
                f" {total('whole')} mapped whole), {total('map_calls')} map calls in"
                f" {sum(c.stats.map_seconds for c in caches):.3f} s ({total('prefetches')} ahead of"
                f" their requests)"
            )
        queues = f" ({len(dataplanes)} queues)" if len(dataplanes) > 1 else ""
        # how often the frontend had to wake the ring thread, and we it (issue 20's wake-up path)
        wakeups = sum(dp.stats.wakeups for dp in dataplanes)
        notifies = sum(dp.stats.notifies for dp in dataplanes)
        self._log(
            f"ring stopped{queues}: {requests} requests, {errors} errors, {wakeups} wake-ups,"
            f" {notifies} notifies{grants};"
            f" error responses of the device so far: {format_error_responses(self.errors.counts)}"
        )
        self._publish_errors(force=True)

    def _disconnect(self, state: int) -> None:
        """Frontend left (reboot, driver unload): drain and unmap, keep the device for a reconnect.
        The new state is published only once nothing is in flight."""
        self._disconnect_state = state
        if not self._quiesce():
            return
        self._disconnect_state = None
        self.phase = Phase.DISCONNECTED
        self._set_state(state)

    def _close_device(self, *, keep_parked: bool = False) -> None:
        if self.dataplanes:
            # every caller drains first; closing here could let a request write to a reused fd
            raise XenblockError(f"{self.relative}: device close with a live data plane", code="internal")
        device, self.device = self.device, None
        self.target = None
        backing, self._backing_fd = self._backing_fd, None
        if backing is not None:
            os.close(backing)  # before the device: nothing may write through it once that is gone
        self._device_published = {}
        self._script_done = False  # a device opened again waits for its script's hand-off again
        if not keep_parked:
            self._unpark()
        if device is not None:
            device.close()  # delete-on-close: an auto-clearing loop device goes away here

    def _detach(self, nodes: dict[str, str]) -> None:
        """libxl set online=0: wait (briefly) for a connected frontend to close, then release."""
        if self.phase is Phase.CLOSED:
            return
        fe_state = self._frontend_state(strict=False)
        if self.phase is Phase.CONNECTED and fe_state in (3, 4) and self._drain_since is None:
            now = time.monotonic()
            if self._closing_since is None:
                self._closing_since = now
                self._set_state(5)  # ask the frontend to close
                return
            if now - self._closing_since < FRONTEND_CLOSE_GRACE:
                return
            if not self._close_grace_logged:
                self._close_grace_logged = True
                self._log("frontend did not close in time: tearing down anyway")
        if self.teardown("online=0"):
            self._set_state(6)

    def teardown(self, why: str, *, keep_parked: bool = False) -> bool:
        """Stop taking requests, drain, unmap, close the device. Idempotent. False while requests
        are still in flight: nothing is closed or unmapped then; call again (reconcile() does).
        `keep_parked` (the engine stopping, not the backend): the fd store's copy stays, for the
        next engine, or for the manager to close when the unit stops."""
        if self.phase is Phase.CLOSED:
            return True
        if not self._quiesce():
            return False
        had_device = self.target is not None
        self._close_device(keep_parked=keep_parked)
        self.phase = Phase.CLOSED
        if had_device:
            self._log(f"released the device ({why})")
        return True

    @property
    def pending_deadline(self) -> float | None:
        """When reconcile() must run again without an event: now while a drain is under way, else
        the end of the detach grace period."""
        if self.phase is Phase.CLOSED:
            return None
        if self._drain_since is not None:
            return time.monotonic()
        if self._closing_since is None:
            return None
        return self._closing_since + FRONTEND_CLOSE_GRACE


def _frontend_matches(frontend: str, domid: int, devid: int) -> bool:
    match = _FRONTEND.fullmatch(frontend)
    return match is not None and int(match.group(1)) == domid and int(match.group(3)) == devid
