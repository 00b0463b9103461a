"""attach and detach the way libxl does them, with the block script flows run in-process.

attach:  write both directories (one transaction) -> wait for a backend to take the device
         directory (InitWait, libxl waits 10 s) -> run `add` -> wait for Connected, watching
         the error node, `hotplug-status` and both states so a failure is named, not timed out.
         Anything failing before the add succeeded is rolled back: no stale directories.
detach:  online=0 + state Closing (one transaction) -> wait for Closed -> run `remove` -> delete
         the directories -> confirm the device really went away. --force removes the frontend
         first (libxl's force), for a guest that never answers.

Progress is reported through a callback (the CLI draws it when stdout is a terminal)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xenblockctl.blockscript import handoff
from xenblockctl.blockscript.add import AddResult, run_add
from xenblockctl.blockscript.remove import run_remove
from xenblockctl.blockscript.settings import Settings
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.kernel import blockdev
from xenblockctl.toolstack import diagnosis, host
from xenblockctl.toolstack.vbd_dirs import DiskSpec, VbdLocation, delete_vbd, write_vbd
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.identity import Liveness, NbdOwnerRecord, OwnerRecord, OwnerRecordError, parse_owner
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, XenbusState

#: libxl's LIBXL_INIT_TIMEOUT: how long a backend gets to reach InitWait before the script runs.
INIT_TIMEOUT = 10.0
#: Grace for rolling back a failed attach (the backend closing its side before we delete).
ROLLBACK_WAIT = 2.0
#: libxl's LIBXL_DESTROY_TIMEOUT: how long the toolstack waits for a driver domain's `xl devd` to run
#: `remove` and delete the backend directory itself (device_hotplug, device_destroy_be_watch_cb).
DESTROY_TIMEOUT = 10.0

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


class NoBackend(XenblockError):
    code = "no-backend"
    hint = "modprobe xen-blkback, or start the engine: systemctl start xenblockctl-engine"


class AttachFailed(XenblockError):
    code = "attach-failed"


class WaitTimeout(XenblockError):
    code = "wait-timeout"


class DetachStuck(XenblockError):
    code = "detach-stuck"
    hint = "check `xenblockctl show` for the holder; --force removes the frontend first"


class VbdMissing(XenblockError):
    code = "vbd-missing"
    hint = "see `xenblockctl list` for the attached devices"


def _state_in(text: str | None, *states: XenbusState | None) -> bool:
    """Whether a `state` node's text is one of `states` (None: the node is absent). Text that is no
    state at all is none of them (it was compared as a string before, with the same result)."""
    if text is None:
        return None in states
    state = XenbusState.of(text)
    return state is not None and state in states


def _state_name(value: str | None) -> str:
    if value is None:
        return "absent"
    try:
        return f"{value} ({XenbusState.parse(value).name})"
    except XenblockError:
        return repr(value[:10])


@dataclass
class Snapshot:
    """The nodes the waits look at, read in one transaction."""

    backend_state: str | None
    frontend_state: str | None
    online: str | None
    hotplug_status: str | None
    hotplug_error: str | None
    error: str | None

    @classmethod
    def read(cls, store: XenStore, loc: VbdLocation) -> Snapshot:
        def body(tx: Transaction) -> Snapshot:
            return cls(
                tx.read_optional(join(loc.backend, "state")),
                tx.read_optional(join(loc.frontend, "state")),
                tx.read_optional(join(loc.backend, "online")),
                tx.read_optional(join(loc.backend, "hotplug-status")),
                tx.read_optional(join(loc.backend, "hotplug-error")),
                tx.read_optional(loc.error_node),
            )

        return store.run_transaction(body)

    def describe(self) -> str:
        return f"backend {_state_name(self.backend_state)}, frontend {_state_name(self.frontend_state)}"


def _wait_for(
    store: XenStore,
    loc: VbdLocation,
    done: Callable[[Snapshot], bool],
    timeout: float,
    progress: Progress,
    *,
    what: str,
) -> tuple[bool, Snapshot]:
    """Wait (watch-driven, polled as a safety net) until `done(snapshot)`; (reached?, last seen)."""
    token = f"xenblockctl-wait-{os.getpid()}"
    watched = [loc.backend, loc.frontend, loc.error_node]
    for path in watched:
        store.watch(path, token)
    deadline = time.monotonic() + timeout
    try:
        while True:
            snap = Snapshot.read(store, loc)
            if done(snap):
                return True, snap
            left = deadline - time.monotonic()
            if left <= 0:
                return False, snap
            progress(f"{what}: {snap.describe()} ({left:.0f} s left)")
            store.wait_watch(min(left, 0.5))
            store.drain_watches()
    finally:
        for path in watched:
            with contextlib.suppress(XenblockError):
                store.unwatch(path, token)


# --- attach ---------------------------------------------------------------------------------------


@dataclass
class AttachResult:
    spec: DiskSpec
    add: AddResult | None
    connected: bool
    snapshot: Snapshot | None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """`attach --json`'s record: where the vbd is, the device the add published and how far
        the attach got."""
        spec = self.spec
        add = self.add
        # an NBD export the engine serves has no device: nothing to name (device_path is its URI)
        device = add if add is not None and add.physical_device else None
        numbers = None if device is None else identity.parse_physical_device(device.physical_device)
        snap = self.snapshot
        return {
            **spec.location.to_json(spec.vdev.name),
            "target": spec.params,
            "mode": spec.mode,
            # as published in xenstore (hex), and the same numbers as lsblk and sysfs print them
            "physical_device": None if device is None else device.physical_device,
            "luid": None if device is None else device.luid,
            "major": None if numbers is None else numbers[0],
            "minor": None if numbers is None else numbers[1],
            "diskseq": None if device is None else identity.parse_luid(device.luid),
            "device_path": None if add is None else add.device_path,
            "consumer": None if add is None else add.consumer,
            "connected": self.connected,
            "backend_state": None if snap is None or snap.backend_state is None else int(snap.backend_state),
            "frontend_state": None
            if snap is None or snap.frontend_state is None
            else int(snap.frontend_state),
            "message": self.message,
        }


def choose_kind(
    backend: str, *, remote: bool = False, store: XenStore | None = None, backend_domid: int | None = None
) -> str:
    """Which backend directory kind reaches the wanted consumer (xen-block-protocol.md §1.1):
    kernel blkback serves `vbd`; the engine serves `vbd` where blkback is absent, else `vbd3`.

    `remote`: the backend domain is another one, whose modules this domain cannot see, so nothing
    local decides. What its other vbds show in xenstore does (diagnosis.DomainBackends): for the
    engine, the kind our engine already serves there; else `vbd3` if something other than our
    engine serves `vbd` there (kernel blkback takes every `vbd`); else `vbd`, where an engine in a
    driver domain without blkback is expected. The kernel consumer is always `vbd`."""
    if remote:
        if backend != "engine" or store is None or backend_domid is None:
            return "vbd"
        seen = diagnosis.domain_backends(store, backend_domid)
        engine_kinds = seen.engine_kinds()
        if len(engine_kinds) == 1:
            return engine_kinds.pop()
        if not engine_kinds and seen.working[("vbd", "other")]:
            return "vbd3"
        return "vbd"
    loaded = host.blkback_loaded()
    if backend == "kernel":
        if not loaded:
            raise NoBackend("kernel blkback is not loaded (no /sys/bus/xen-backend/drivers/vbd)")
        return "vbd"
    if backend == "engine":
        return "vbd3" if loaded else "vbd"
    return "vbd"


def attach(
    store: XenStore,
    spec: DiskSpec,
    *,
    auto_vdev: bool,
    settings: Settings,
    env: Environment,
    wait: float,
    own_domid: int,
    progress: Progress = _quiet,
    journal: Journal | None = None,
) -> AttachResult:
    journal = journal or Journal("xenblockctl", stderr=False)
    spec = write_vbd(store, spec, auto=auto_vdev)
    loc = spec.location
    progress(f"wrote {loc.backend} and {loc.frontend}")
    try:
        init_timeout = min(INIT_TIMEOUT, wait) if wait > 0 else INIT_TIMEOUT
        reached, snap = _wait_for(
            store,
            loc,
            lambda s: not _state_in(s.backend_state, None, XenbusState.Initialising) or bool(s.error),
            init_timeout,
            progress,
            what="waiting for a backend",
        )
        if snap.error:
            raise AttachFailed(f"backend reported: {snap.error[:200]}")
        if not reached:
            raise _nobody_took_it(store, loc, init_timeout, own_domid)
        add_result: AddResult | None = None
        if spec.backend_domid == own_domid:
            progress("running the block script (add)")
            path = BackendPath(loc.kind, loc.domid, loc.devid, loc.backend_domid)
            add_result = run_add(store, path, settings, journal, env=env)
        else:
            # A driver domain's `xl devd` runs the script there; we can only watch for its verdict.
            reached, snap = _wait_for(
                store,
                loc,
                lambda s: s.hotplug_status is not None or bool(s.error),
                max(wait, INIT_TIMEOUT),
                progress,
                what="waiting for the driver domain's block script",
            )
            if snap.hotplug_status is None and not snap.error:
                raise AttachFailed(
                    f"driver domain {spec.backend_domid} took {loc.relative} but its block script "
                    f"published no hotplug-status within {max(wait, INIT_TIMEOUT):g} s; whether "
                    "`xl devd` runs there cannot be seen from this domain: "
                    + diagnosis.driver_domain_scripts(store, loc)
                )
            if snap.hotplug_status != "connected":
                raise AttachFailed(
                    f"driver domain {spec.backend_domid}: hotplug-status {snap.hotplug_status!r}, "
                    f"error {snap.hotplug_error or snap.error or 'none'}"
                )
            add_result = _published_by_driver_domain(store, loc)
    except BaseException:
        _rollback(store, loc, env, local=spec.backend_domid == own_domid)
        raise
    if wait <= 0:
        return AttachResult(spec, add_result, False, None, "not waiting for the frontend (--wait 0)")

    def settled(s: Snapshot) -> bool:
        failed = bool(s.error) or s.hotplug_status in ("error", "busy")
        return failed or _state_in(
            s.backend_state, None, XenbusState.Connected, XenbusState.Closing, XenbusState.Closed
        )

    reached, snap = _wait_for(store, loc, settled, wait, progress, what="waiting for Connected")
    if _state_in(snap.backend_state, XenbusState.Connected):
        return AttachResult(spec, add_result, True, snap, "connected")
    if snap.error or snap.hotplug_status in ("error", "busy"):
        raise AttachFailed(
            f"{loc.relative}: backend failed after the hand-off: "
            f"{(snap.error or snap.hotplug_error or snap.hotplug_status or '')[:200]} ({snap.describe()})"
        )
    if reached:
        raise AttachFailed(f"{loc.relative} closed before connecting ({snap.describe()})")
    why = (
        diagnosis.frontend_stall(store, loc, snap.frontend_state)
        if _state_in(snap.frontend_state, None, XenbusState.Initialising, XenbusState.InitWait)
        else "the handshake stalled"
    )
    return AttachResult(spec, add_result, False, snap, f"not Connected within {wait:g} s: {why}")


def _published_by_driver_domain(store: XenStore, loc: VbdLocation) -> AddResult | None:
    """What the driver domain's block script published, and which consumer took the directory
    there: our engine writes `opened` at InitWait (before any script runs), kernel blkback never."""
    published, luid, device_path, opened, owner = store.read_many(
        [
            join(loc.backend, name)
            for name in (
                identity.PHYSICAL_DEVICE,
                identity.LUID,
                identity.DEVICE_PATH,
                "opened",
                identity.OWNER,
            )
        ]
    )
    if published is None:
        # an NBD export the engine serves there publishes its owner record alone (kind=nbd)
        try:
            record = parse_owner(owner) if owner is not None else None
        except OwnerRecordError:
            record = None
        if isinstance(record, NbdOwnerRecord):
            return AddResult("", "", record.uri, handoff.Consumer.ENGINE.value)
        return None
    consumer = handoff.Consumer.ENGINE if opened is not None else handoff.Consumer.KERNEL
    return AddResult(published, luid or "", device_path or "", consumer.value)


def _nobody_took_it(store: XenStore, loc: VbdLocation, waited: float, own_domid: int) -> NoBackend:
    """The backend directory stayed at Initialising: say who was expected to take it and what is
    known about them. Our own domain's consumers we can see; another domain's we cannot."""
    head = f"no backend took {loc.relative} within {waited:g} s (state still 1): "
    if loc.backend_domid != own_domid:
        error = NoBackend(head + diagnosis.backend_domain_silent(store, loc))
        error.hint = (
            f"in domain {loc.backend_domid}: load xen-blkback (or start the engine with --kind "
            f"{loc.kind}) and run `xl devd`"
        )
        return error
    socket_path = store.endpoint.path if store.endpoint.kind == "socket" else None
    engines = host.engine_pids(xenstore_socket=socket_path)
    return NoBackend(
        head + f"kernel blkback is {'loaded' if host.blkback_loaded() else 'not loaded'} and "
        f"{'an' if engines else 'no'} engine uses this xenstored"
    )


def _rollback(store: XenStore, loc: VbdLocation, env: Environment, *, local: bool) -> None:
    """Undo a failed attach: ask the backend to close (so an engine lets go), run remove for
    whatever add published, delete the directories. Best effort; the original error matters.

    `local` False: the block script ran in a driver domain, whose devices this domain cannot touch
    (a device number there names another device here): its `xl devd` runs remove when the backend
    reaches Closed, and deletes the backend directory; give it libxl's time for that first."""
    state: str | None = None
    with contextlib.suppress(XenblockError):
        state = _begin_close(store, loc, force=False)
        if not _state_in(
            state, None, XenbusState.Initialising, XenbusState.Closed
        ):  # a backend took it: let it let go before deleting
            _wait_for(
                store,
                loc,
                lambda s: _state_in(s.backend_state, None, XenbusState.Closed),
                ROLLBACK_WAIT,
                _quiet,
                what="rolling back",
            )
    if local:
        with contextlib.suppress(XenblockError):
            run_remove(
                store, BackendPath(loc.kind, loc.domid, loc.devid, loc.backend_domid), _silent(), env=env
            )
    elif not _state_in(state, None, XenbusState.Initialising):
        with contextlib.suppress(XenblockError):
            _wait_driver_domain_remove(store, loc, _quiet)
    with contextlib.suppress(XenblockError):
        delete_vbd(store, loc)


def _wait_driver_domain_remove(store: XenStore, loc: VbdLocation, progress: Progress) -> bool:
    """Wait (libxl's 10 s) for the driver domain's `xl devd` to run remove and delete the backend
    directory; True when it did. Deleting it first would leave remove without the owner record."""
    gone, _ = _wait_for(
        store,
        loc,
        lambda s: s.backend_state is None,
        DESTROY_TIMEOUT,
        progress,
        what=f"waiting for domain {loc.backend_domid} to run remove",
    )
    return gone


def _silent() -> Journal:
    return Journal("xenblockctl", stderr=False)


# --- detach ---------------------------------------------------------------------------------------


@dataclass
class DetachResult:
    location: VbdLocation
    closed: bool  # the backend reached Closed (else forced or absent)
    removed: str  # run_remove's outcome, or "skipped"
    forced: bool
    stuck: list[str] = field(default_factory=list)


def _begin_close(store: XenStore, loc: VbdLocation, *, force: bool) -> str | None:
    """libxl__initiate_device_generic_remove's transaction; returns the backend state seen."""

    def body(tx: Transaction) -> str | None:
        if force:
            tx.rm(loc.frontend, missing_ok=True)
        state = tx.read_optional(join(loc.backend, "state"))
        if state is None:
            return None
        tx.write(join(loc.backend, "online"), "0")
        if not _state_in(state, XenbusState.Closed):
            tx.write(join(loc.backend, "state"), str(XenbusState.Closing))
        return state

    return store.run_transaction(body)


def detach(
    store: XenStore,
    loc: VbdLocation,
    *,
    wait: float,
    force: bool,
    own_domid: int,
    env: Environment,
    progress: Progress = _quiet,
    journal: Journal | None = None,
) -> DetachResult:
    journal = journal or _silent()
    path = BackendPath(loc.kind, loc.domid, loc.devid, loc.backend_domid)
    before = store.read_optional(join(loc.backend, identity.OWNER))
    state = _begin_close(store, loc, force=force)
    # State 1: no backend driver ever took the directory, so nobody will answer Closing.
    closed = _state_in(state, None, XenbusState.Initialising, XenbusState.Closed)
    snap: Snapshot | None = None
    if not closed:
        closed, snap = _wait_for(
            store,
            loc,
            lambda s: _state_in(s.backend_state, None, XenbusState.Closed),
            wait,
            progress,
            what="waiting for Closed",
        )
        if not closed and not force:
            raise DetachStuck(
                f"{loc.relative} did not reach Closed within {wait:g} s ({snap.describe()}): "
                + (
                    "the guest still uses the disk (is it mounted?)"
                    if _state_in(snap.frontend_state, XenbusState.Initialised, XenbusState.Connected)
                    else "the backend did not answer Closing"
                )
            )
        if not closed:
            # libxl's force retry: the frontend goes first, then one more wait.
            _begin_close(store, loc, force=True)
            closed, snap = _wait_for(
                store,
                loc,
                lambda s: _state_in(s.backend_state, None, XenbusState.Closed),
                wait,
                progress,
                what="forced: waiting for Closed",
            )
    removed = "skipped"
    local = loc.backend_domid == own_domid
    if local:
        progress("running the block script (remove)")
        removed = run_remove(store, path, journal, env=env).detached
    elif not _state_in(state, None, XenbusState.Initialising):
        # The driver domain's `xl devd` runs remove once the backend is Closed and online 0, then
        # deletes the backend directory: wait for that as libxl does, and only then delete.
        if _wait_driver_domain_remove(store, loc, progress):
            removed = f"by domain {loc.backend_domid}"
        else:
            removed = f"not seen: domain {loc.backend_domid} kept the backend {DESTROY_TIMEOUT:g} s"
            journal.warning(f"{loc.relative}: {removed}; deleting it (as libxl does)")
    delete_vbd(store, loc)
    result = DetachResult(loc, closed, removed, force)
    result.stuck = _confirm_gone(store, loc, path, before, wait, bus=env.xen_backend_bus, local=local)
    return result


def _confirm_gone(
    store: XenStore,
    loc: VbdLocation,
    path: BackendPath,
    owner_text: str | None,
    wait: float,
    *,
    bus: str,
    local: bool,
) -> list[str]:
    """What is still there after the directories were deleted: "really gone" is checked, not
    assumed (a backend holding the device keeps a loop bound until it lets go).

    `local` False: the device lives in a driver domain; its sysfs and loop devices are not this
    domain's (the same numbers here are other devices), so only xenstore is checked."""
    deadline = time.monotonic() + max(wait, 0.5)
    while True:
        stuck: list[str] = []
        for what in (loc.backend, loc.frontend):
            if store.read_optional(what) is not None:
                stuck.append(f"{what} still exists (re-created by someone)")
        blkback = handoff.blkback_dir(path, bus)
        if local and os.path.isdir(blkback):
            stuck.append(f"kernel blkback still has {os.path.basename(blkback)}")
        if local and owner_text is not None:
            try:
                owner = parse_owner(owner_text)
            except OwnerRecordError:
                owner = None
            # Only a proven binding is reported (UNVERIFIED: the kernel could not be asked); an
            # NBD export the engine served (kind=nbd) leaves nothing kernel-side to wait for.
            if (
                isinstance(owner, OwnerRecord)
                and owner.kind == "loop"
                and owner.identity.liveness(blockdev.observe) is Liveness.LIVE
            ):
                stuck.append(
                    f"loop{owner.minor} still bound (a backend holds it; it clears on its last close)"
                )
        if not stuck or time.monotonic() >= deadline:
            return stuck
        time.sleep(0.05)
