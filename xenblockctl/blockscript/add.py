"""`add`: open the target, publish its identity atomically, hand it to the backend, exit.

Invariants, whatever step we are killed at (tests/flows/test_kill.py proves them):
  * xenstore never shows `physical-device` without `physical-device-luid` and `diskseq` (one
    transaction; xenstore/identity.py owns their names and spelling);
  * no loop device of ours stays bound unless a consumer holds it (AUTOCLEAR is on from the
    first ioctl; it is turned off only after kernel blkback holds the device, by a job deferred
    past hotplug-status=connected -- a forked child, or the warm server's worker after its reply:
    blockscript/autoclear.py. Killed before its ioctl, that job leaves AUTOCLEAR on, the one
    degraded case: nothing leaks, but a later frontend reconnect detaches the guest's disk, as
    with kernel_autoclear=true);
  * a failure leaves no physical-device*, a coded `hotplug-error` and `hotplug-status`, and
    nothing allocated."""

from __future__ import annotations

from xenblockctl.blockscript import claim, faults, handoff, sharing
from xenblockctl.blockscript.settings import Settings
from xenblockctl.blockscript.target import TargetSyntaxError, parse_target
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.kernel import blockdev
from xenblockctl.kernel.errors import IdentityMismatch
from xenblockctl.kernel.loop import LoopDevice
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.identity import PUBLISHED, IdentityError, Liveness, PublishedIdentity
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, XenbusState, backend_dir

#: What `add` decides from, read in one batch (one round trip) before anything is opened. Not a
#: transaction: `_publish` re-reads every one of these it relies on inside the publishing
#: transaction, so a change in between (closing, deleted, re-created with other params, published
#: by a concurrent add) is refused there and never published over.
CONFIG_NODES = ("state", "online", "mode", "params", identity.PHYSICAL_DEVICE, identity.OWNER, "opened")


class BackendGone(XenblockError):
    code = "backend-missing"


class BackendClosing(XenblockError):
    code = "backend-closing"


class BadMode(XenblockError):
    code = "bad-mode"


class AlreadyPublished(XenblockError):
    code = "already-published"


class AddResult(NamedTuple):
    physical_device: str
    luid: str
    device_path: str
    consumer: str
    already: bool = False


def run_add(
    store: XenStore,
    path: BackendPath,
    settings: Settings,
    journal: Journal,
    *,
    env: Environment,
    defer_autoclear: bool = False,
) -> AddResult:
    """`defer_autoclear`: on the kernel-blkback path, turn AUTOCLEAR off after we return, in a
    forked child or, in a warm server's worker, in the worker after its reply (autoclear.STAGE;
    blockscript/autoclear.py), rather than in line. Only the libxl script asks for it: an
    in-process caller (the CLI's attach) may have threads, which a fork would copy without their
    locks' owners, and udev kills whatever a RUN program leaves behind (udev(7))."""
    # Our home and the backend's nodes in one round trip: the nodes are read by the path libxl
    # gave (relative: the daemon resolves it against our home, as backend_dir would).
    where = path.absolute() if path.backend_domid is not None else path.relative
    home, values = store.home_and_read_many([where, *(join(where, name) for name in CONFIG_NODES)])
    be = backend_dir(store, path)
    published = False
    try:
        nodes = _backend_nodes(be, values)
        mode, target_params = _validate(nodes)
        target = parse_target(target_params)
        writable = mode == "w"
        if target.nbd is not None and "opened" in nodes:
            # Our engine claimed the backend (`opened`=0 at InitWait): it serves the export itself.
            from xenblockctl.blockscript import nbdexport  # NBD code only for NBD targets

            return nbdexport.run_add_nbd(
                store,
                home=home,
                be=be,
                path=path,
                export=target.nbd,
                nodes=nodes,
                mode=mode,
                settings=settings,
                journal=journal,
                env=env,
            )
        if identity.PHYSICAL_DEVICE in nodes:
            published_nodes = store.run_transaction(lambda tx: _read_published(tx, be))
            if identity.PHYSICAL_DEVICE not in published_nodes:
                raise BackendClosing("physical-device was withdrawn while this repeated add checked it")
            return _confirm_existing(published_nodes)
        faults.pause(env, "add-start")
        config = (mode, target_params)
        with claim.open_target(target, writable=writable, env=env, for_backend=True) as opened:
            claimed = claim.claim(
                opened,
                use=claim.Use((path.domid, path.devid), direct_io=settings.direct_io),
                lock_timeout=settings.lock_timeout,
                env=env,
                check=lambda wanted: sharing.check(store, home, be, wanted),
                publish=lambda made: store.run_transaction(lambda tx: _publish(tx, home, be, made, config)),
            )
        device, owner = claimed.device, claimed.owner
        try:
            published = True
            journal.info(
                f"published {device.identity.physical_device} luid {device.identity.luid} for {target.path}",
                DISKSEQ=device.identity.diskseq,
            )
            faults.pause(env, "add-published")
            consumer = handoff.wait_for_consumer(
                store,
                home=home,
                backend=be,
                path=path,
                physical_device=device.identity.physical_device,
                timeout=settings.handoff_timeout,
                bus=env.xen_backend_bus,
            )
            faults.pause(env, "add-consumer-ready")
            published_owner = owner.format()
            if (
                isinstance(device, LoopDevice)
                and consumer is handoff.Consumer.KERNEL
                and not settings.kernel_autoclear
            ):
                # blkback holds it now; without AUTOCLEAR off a guest reboot would detach its disk.
                # The ioctl costs a 16-39 ms queue freeze, so it is done after we reply (autoclear.py).
                from xenblockctl.blockscript import autoclear

                autoclear.hand_off(
                    store,
                    be,
                    device,
                    owner,
                    mark_connected=lambda tx: _mark_connected(tx, be, published_owner),
                    settings=settings,
                    defer=defer_autoclear,
                    journal=journal,
                    env=env,
                )
            else:
                store.run_transaction(lambda tx: _mark_connected(tx, be, published_owner))
            faults.pause(env, "add-done")
            return AddResult(
                device.identity.physical_device, device.identity.luid, claimed.path, consumer.value
            )
        finally:
            device.close()  # delete-on-close: the consumer's reference is what keeps it now
    except XenblockError as exc:
        report_failure(store, be, exc, withdraw=published)
        raise


def _backend_nodes(be: str, values: list[str | None]) -> dict[str, str]:
    """The nodes `add` decides from (CONFIG_NODES; absent ones left out), read in one round trip
    after the directory node itself: it reads as "" when it exists, ENOENT when not."""
    if values[0] is None:
        raise BackendGone(f"{be} does not exist")
    return {name: value for name, value in zip(CONFIG_NODES, values[1:], strict=True) if value is not None}


def _read_published(tx: Transaction, be: str) -> dict[str, str]:
    """What an earlier add published, consistently (they are written in one transaction)."""
    names = (*identity.IDENTITY_NODES, identity.DEVICE_PATH)
    values = tx.read_many([join(be, name) for name in names])
    return {name: value for name, value in zip(names, values, strict=True) if value is not None}


def _validate(nodes: dict[str, str]) -> tuple[str, str]:
    state = XenbusState.of(nodes.get("state"))
    if nodes.get("online") == "0" or (state is not None and state.closing):
        raise BackendClosing(f"backend is closing (state {nodes.get('state')}, online {nodes.get('online')})")
    mode = nodes.get("mode")
    if mode not in ("r", "w"):
        raise BadMode(f"mode must be exactly 'r' or 'w', not {(mode or '')[:20]!r}")
    params = nodes.get("params")
    if params is None:
        raise TargetSyntaxError("params is missing")
    return mode, params


def _publish(tx: Transaction, home: str, be: str, claimed: claim.Claimed, config: tuple[str, str]) -> None:
    """One transaction: the luid can never be seen without physical-device or the other way round.
    Re-checks the backend inside the transaction so a closing or deleted backend is not revived,
    and that mode and params are still the ones the device was opened from (the first read was
    not transactional). One batch: the checks' reads and every write (Transaction.
    read_many_then_write); a refused check raises, and the abort discards the writes unseen.

    It also clears the backend's error node (`error/<backend path>`): the hand-off treats an error
    there as the consumer refusing, and libxl never deletes those nodes, so one left by an earlier
    backend at the same domain/devid (a refusal, a blkback failure) would fail this attach. Nothing
    can have reported an error for this backend yet: no consumer acts before physical-device."""
    ident = claimed.device.identity
    published_identity = PublishedIdentity(ident.major, ident.minor, ident.diskseq)
    (state, online, published, mode, params), failure = tx.read_many_then_write(
        [join(be, name) for name in ("state", "online", identity.PHYSICAL_DEVICE, "mode", "params")],
        {
            **{join(be, name): value for name, value in published_identity.nodes().items()},
            join(be, identity.DEVICE_PATH): claimed.path,
            join(be, identity.OWNER): claimed.owner.format(),
        },
        remove=[join(be, "hotplug-error"), *_stale_error_dir(home, be)],
    )
    if state is None:
        raise BackendGone(f"{be} vanished before publishing")
    seen = XenbusState.of(state)
    if (seen is not None and seen.closing) or online == "0":
        raise BackendClosing("backend started closing before publishing")
    if published is not None:
        raise AlreadyPublished("another add published physical-device for this backend concurrently")
    if (mode, params) != config:
        raise BackendGone(f"{be} changed mode or params while the target was being opened (re-created?)")
    if failure is not None:
        raise failure


def _stale_error_dir(home: str, be: str) -> list[str]:
    """The error directory of backend `be` (absolute, under `home`), as xenbus_dev_error() names it."""
    prefix = home.rstrip("/") + "/"
    return [join(home, "error", be[len(prefix) :])] if be.startswith(prefix) else []


def _mark_connected(tx: Transaction, be: str, published: str) -> None:
    """hotplug-status=connected, only while our published record stands: a remove (or gc) that ran
    during the hand-off withdrew it, and writing it back would revive a detached device's record.
    The write goes in the reads' batch; a refusal raises, and the abort discards it."""
    (state, record), failure = tx.read_many_then_write(
        [join(be, "state"), join(be, identity.OWNER)], {join(be, "hotplug-status"): "connected"}
    )
    if state is None:
        raise BackendGone(f"{be} vanished during hand-off")
    if record != published:
        raise BackendGone(f"{be}: our owner record was withdrawn or replaced during the hand-off")
    if failure is not None:
        raise failure


def _confirm_existing(nodes: dict[str, str]) -> AddResult:
    """A second `add` (libxl and udev both ran us, or a retry). Fine if the published identity
    still names the live device; a mismatch is an error, never a silent rewrite: blkback ignores
    changes to physical-device, so rewriting could not help and could hide a swapped disk."""
    try:
        published = PublishedIdentity.from_nodes(nodes)
    except IdentityError as exc:
        raise IdentityMismatch(f"published identity is malformed: {exc.message}") from exc
    assert published is not None  # the caller saw physical-device in these nodes
    if published.diskseq is None:
        raise IdentityMismatch("physical-device is set without physical-device-luid (not written by us)")
    verdict = published.liveness(blockdev.observe)
    if verdict is not Liveness.LIVE:
        raise IdentityMismatch(
            f"physical-device {published.physical_device} published with diskseq {published.diskseq:x}"
            f" is {verdict.value} now: {_VERDICT_WHY[verdict]}"
        )
    return AddResult(
        published.physical_device,
        identity.format_diskseq(published.diskseq),
        nodes.get(identity.DEVICE_PATH, ""),
        "existing",
        already=True,
    )


_VERDICT_WHY = {
    Liveness.GONE: "no block device has that number any more",
    Liveness.EMPTY: "the number names an empty device (the published one was detached)",
    Liveness.REPLACED: "the number names another device: the device was replaced",
    Liveness.UNVERIFIED: "its diskseq could not be read",
}


def report_failure(store: XenStore, be: str, exc: XenblockError, *, withdraw: bool) -> None:
    """Write the coded error for libxl (and withdraw what we published) in one transaction; write
    nothing if the backend directory is gone (never re-create a deleted backend)."""
    status = "busy" if isinstance(exc, sharing.SharingConflict) else "error"

    def tx_body(tx: Transaction) -> None:
        if tx.read_optional(join(be, "state")) is None:
            return
        tx.write_many(
            {join(be, "hotplug-error"): exc.one_line(), join(be, "hotplug-status"): status},
            remove=[join(be, name) for name in PUBLISHED] if withdraw else [],
        )

    # If even this fails, the exit status still tells libxl; the caller logs the original error.
    try:  # noqa: SIM105 (contextlib is kept off the hotplug path's imports)
        store.run_transaction(tx_body)
    except XenblockError:
        pass
