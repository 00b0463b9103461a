"""The bundled backend engine: serves every backend/<kind>/*/* of our domain.

One xenstore connection, one thread running the xenbus state machines (backend/xenbus.py), one
thread per connected ring (backend/dataplane.py). Watches: the whole `backend/<kind>` subtree of
our domain, plus each served device's frontend directory (written by the untrusted guest; its
events are only triggers, the state machine re-reads and validates everything).

Stopping (SIGTERM, or `stop()`): every device is torn down as for a detach, draining in-flight
I/O first. If the engine is SIGKILLed instead, the kernel closes its fds and delete-on-close
(AUTOCLEAR loop devices, deferred-remove dm devices) still releases every device — unless the
service manager's fd store holds a copy (backend/handover.py): then the next engine takes the
device back, re-verified, and if none comes the manager's close releases it.

Fault isolation: guests are hostile and the engine has bugs. Whatever one device's state machine
raises — a refusal, a resource limit, a bug — fails that device alone (error node, Closing, a log
line with the traceback); the engine and every other device go on."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from collections.abc import Callable

from xenblockctl.backend.grantcache import process_budget
from xenblockctl.backend.xenbus import DRAIN_TIMEOUT, BackendDevice, EngineConfig
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreNoEntry
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import join

ROOT_TOKEN = "xbc-engine-root"
FRONTEND_TOKEN_PREFIX = "xbc-engine-fe:"
#: Level-triggered safety net: every device is reconciled at least this often, events or not.
RESCAN_INTERVAL = 5.0
#: Bounds of the numbers in backend/<kind>/<domid>/<devid> (DOMID_FIRST_RESERVED, a u32 devid).
_MAX_DOMID = 0x7FEF
_MAX_DEVID = 0xFFFFFFFF


def _key(domid: str, devid: str) -> tuple[int, int] | None:
    d, v = uint_or_none(domid, maximum=_MAX_DOMID), uint_or_none(devid, maximum=_MAX_DEVID)
    return None if d is None or v is None else (d, v)


class Engine:
    def __init__(
        self,
        store: XenStore,
        config: EngineConfig,
        *,
        kind: str = "vbd",
        journal: Journal | None = None,
    ) -> None:
        if kind not in ("vbd", "vbd3"):
            raise XenblockError(f"backend kind {kind!r} is not vbd or vbd3", code="bad-setting")
        self.store = store
        self.config = config
        self.kind = kind
        self.journal = journal or Journal("xenblockctl-engine")
        self.home = store.home()
        self.root = join(self.home, "backend", kind)
        self.devices: dict[tuple[int, int], BackendDevice] = {}
        self._frontend_watches: dict[tuple[int, int], str] = {}
        self._stop = threading.Event()
        #: one entry per wake() not yet acted on: list.append and clear are single C calls, atomic
        #: and lock-free, so wake() is safe in a signal handler that interrupted the loop's thread
        #: (a lock the loop held there would deadlock it)
        self._wake_requests: list[None] = []
        #: set by a takeover (backend/handover.py): gets each drained device's fd, by FDNAME, to
        #: pass to the successor before this process exits
        self.handover: Callable[[dict[str, int]], None] | None = None

    # -- public ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self.wake()

    def wake(self) -> None:
        """Ask the loop to reconcile everything soon (safe from any thread, and from a signal
        handler): the request is recorded, then the loop's wait for events is interrupted."""
        self._wake_requests.append(None)
        self.store.interrupt_wait()

    def run(self, ready: threading.Event | None = None) -> None:
        sweep_dm_leftovers(self.journal)
        # Made before the first connect, not on its way to Connected: the grant caches' shared
        # mapping budget reads /proc/sys/vm/max_map_count, and that text read imports the ascii
        # codec (issue 20: in the real-Xen lane the only module imported after "engine ready",
        # on Linux's connect, the first with persistent grants; a file open and an import under
        # TCG). Every other module a connect needs is imported with the engine.
        process_budget()
        self.store.watch(self.root, ROOT_TOKEN)
        self.journal.info(f"engine serving {self.root}")
        self._rescan()
        fd_store = self.config.fd_store
        if fd_store is not None:
            # every backend still in xenstore claimed its fd in that first pass (or refused it)
            fd_store.close_unclaimed()
            fd_store.ready(f"serving {self.root}")
        if ready is not None:
            ready.set()
        next_rescan = time.monotonic() + RESCAN_INTERVAL
        try:
            while not self._stop.is_set():
                # Sleep until the next rescan or device deadline: wake() interrupts the wait, so
                # nothing needs polling (issue 20: a 0.2 s cap woke an idle engine 5 times a
                # second, 2-3 % of a dom0 vCPU under TCG, taken from the guest's)
                timeout = max(0.0, next_rescan - time.monotonic())
                for deadline in (d.pending_deadline for d in self.devices.values()):
                    if deadline is not None:
                        timeout = min(timeout, max(0.0, deadline - time.monotonic()))
                event = self.store.wait_watch(timeout)
                events = [event] if event is not None else []
                events += self.store.drain_watches()
                #: device -> whether its frontend's directory is among the causes
                touched: dict[tuple[int, int], bool] = {}
                rescan = False
                for ev in events:
                    key = self._key_for(ev.path, ev.token)
                    if key is None:
                        rescan = rescan or ev.path == self.root
                    else:
                        touched[key] = touched.get(key, False) or ev.token.startswith(FRONTEND_TOKEN_PREFIX)
                if self._wake_requests:
                    # a wake() after this clear leaves an entry for the next pass; one before it is
                    # served by the rescan below, which reads everything after its cause was set
                    self._wake_requests.clear()
                    rescan = True
                now = time.monotonic()
                if rescan or now >= next_rescan:
                    self._rescan()
                    next_rescan = now + RESCAN_INTERVAL
                else:
                    for key, frontend_changed in touched.items():
                        self._reconcile(key, frontend_changed=frontend_changed)
                    for key, dev in list(self.devices.items()):
                        if dev.pending_deadline is not None and now >= dev.pending_deadline:
                            self._reconcile(key)
        finally:
            self._shutdown()

    # -- internals ------------------------------------------------------------------------------
    def _key_for(self, path: str, token: str) -> tuple[int, int] | None:
        if token.startswith(FRONTEND_TOKEN_PREFIX):
            domid, _, devid = token[len(FRONTEND_TOKEN_PREFIX) :].partition(":")
            return _key(domid, devid)
        if not path.startswith(self.root + "/"):
            return None
        parts = path[len(self.root) + 1 :].split("/")
        return _key(parts[0], parts[1]) if len(parts) >= 2 else None

    def _rescan(self) -> None:
        present: set[tuple[int, int]] = set()
        for domid in self._ls(self.root):
            for devid in self._ls(join(self.root, domid)):
                if (key := _key(domid, devid)) is not None:
                    present.add(key)
        for key in present | set(self.devices):
            self._reconcile(key)

    def _ls(self, path: str) -> list[str]:
        try:
            return self.store.ls(path)
        except XenstoreNoEntry:
            return []

    def _reconcile(self, key: tuple[int, int], *, frontend_changed: bool = False) -> None:
        dev = self.devices.get(key)
        if dev is None:
            if self._stop.is_set():
                return
            dev = BackendDevice(
                self.store,
                home=self.home,
                kind=self.kind,
                domid=key[0],
                devid=key[1],
                config=self.config,
                journal=self.journal,
                wake=self.wake,
            )
            self.devices[key] = dev
        try:
            alive = dev.reconcile(frontend_changed=frontend_changed)
        except XenblockError as exc:
            # a transient xenstore failure, most likely: the next event or rescan tries again
            self.journal.error(f"{dev.relative}: {exc.one_line()}", CODE=exc.code)
            alive = True
        except Exception as exc:  # a bug, or a resource limit, hit while serving this device only
            alive = self._isolate(dev, exc)
        if dev.frontend is not None and key not in self._frontend_watches:
            token = f"{FRONTEND_TOKEN_PREFIX}{key[0]}:{key[1]}"
            with contextlib.suppress(XenblockError):
                self.store.watch(dev.frontend, token)
                self._frontend_watches[key] = dev.frontend
        if not alive:
            self._forget(key)

    def _isolate(self, dev: BackendDevice, exc: Exception) -> bool:
        """Fail `dev` alone for an unexpected exception, and say where it came from."""
        where = "".join(traceback.format_exception(exc)).rstrip()
        self.journal.error(
            f"{dev.relative}: internal error, failing this device only: {exc!r}\n{where}", CODE="internal"
        )
        try:
            dev.fail_internal(f"internal error: {type(exc).__name__}: {exc}")
        except Exception as second:  # cannot even report it: leave the device for libxl's teardown
            self.journal.error(f"{dev.relative}: could not fail the device: {second!r}", CODE="internal")
        return True

    def _forget(self, key: tuple[int, int]) -> None:
        self.devices.pop(key, None)
        frontend = self._frontend_watches.pop(key, None)
        if frontend is not None:
            with contextlib.suppress(XenblockError):
                self.store.unwatch(frontend, f"{FRONTEND_TOKEN_PREFIX}{key[0]}:{key[1]}")

    def _shutdown(self) -> None:
        """Tear every device down, draining its I/O first. A device whose I/O does not end within
        DRAIN_TIMEOUT is left open: the process exit closes it after the I/O ends (the pool's
        threads are joined at exit), never while a request could still use its fd."""
        pending = dict(self.devices)
        handed = (
            {dev.fd_name: os.dup(dev.device.fd) for dev in pending.values() if dev.device is not None}
            if self.handover is not None
            else {}
        )
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while pending:
            for key, dev in list(pending.items()):
                try:
                    # the backend lives on: its fd stays parked for the next engine (or, if
                    # none comes, for the manager to close when the unit stops)
                    done = dev.teardown("engine stopping", keep_parked=True)
                except Exception as exc:
                    self.journal.error(f"{dev.relative}: teardown: {exc!r}", CODE="internal")
                    done = True
                if done:
                    del pending[key]
                    self._forget(key)
            if pending and time.monotonic() >= deadline:
                for dev in pending.values():
                    self.journal.error(
                        f"{dev.relative}: I/O still in flight at engine stop; the device is released"
                        " when it ends and the process exits",
                        CODE="drain-timeout",
                    )
                    # never to a successor while our I/O may still run on it
                    with contextlib.suppress(KeyError, OSError):
                        os.close(handed.pop(dev.fd_name))
                break
        if self.handover is not None:
            self.handover(handed)
        with contextlib.suppress(XenblockError):
            self.store.unwatch(self.root, ROOT_TOKEN)
        self.journal.info("engine stopped")


def sweep_dm_leftovers(journal: Journal) -> list[str]:
    """Remove dm devices of ours that a killed creator leaked inside its create->arm window (open
    count 0, no deferred remove, creator dead). Best effort: a kernel without dm, or a sweep that
    fails, never keeps the engine from serving."""
    from xenblockctl.kernel import dm

    try:
        ctl = dm.DmControl.open()
    except XenblockError as exc:
        journal.info(f"no device-mapper sweep: {exc.one_line()}")
        return []
    try:
        with ctl:
            removed = dm.sweep_owned(ctl)
    except XenblockError as exc:
        journal.warning(f"device-mapper sweep failed: {exc.one_line()}", CODE=exc.code)
        return []
    for name in removed:
        journal.info(f"removed leaked dm device {name} (its creator died before arming deferred remove)")
    return removed
