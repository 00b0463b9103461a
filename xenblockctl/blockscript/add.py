"""`add`: open the target, publish its identity atomically, hand it to the backend, exit.

Invariants, whatever step we are killed at (tests/flows/test_kill.py proves them):
  * xenstore never shows `physical-device` without `physical-device-luid` (one transaction);
  * no loop device of ours stays bound unless a consumer holds it (AUTOCLEAR is on from the
    first ioctl; it is turned off only after kernel blkback holds the device);
  * a failure leaves no physical-device*, a coded `hotplug-error` and `hotplug-status`, and
    nothing allocated."""

from __future__ import annotations

import contextlib
import os
import stat
from typing import NamedTuple

from xenblockctl.blockscript import faults, handoff, sharing
from xenblockctl.blockscript.locks import target_lock
from xenblockctl.blockscript.owner import NODE as OWNER_NODE
from xenblockctl.blockscript.owner import OwnerRecord, OwnerRecordError, parse_luid
from xenblockctl.blockscript.settings import Settings
from xenblockctl.blockscript.target import (
    Target,
    TargetSyntaxError,
    check_expectations,
    maybe_dm,
    parse_target,
)
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.kernel import blockdev, loop
from xenblockctl.kernel.blockdev import BlockDevice
from xenblockctl.kernel.errors import IdentityMismatch, TargetTypeError
from xenblockctl.kernel.loop import LoopDevice
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, BackendRecordError, backend_dir, parse_physical_device

#: Nodes `add` publishes and `remove`/failure withdraws, together, always in one transaction.
PUBLISHED = ("physical-device-luid", "physical-device", "physical-device-path", OWNER_NODE)
#: What `add` decides from, read in one batch (one round trip) before anything is opened. Not a
#: transaction: `_publish` re-reads every one of these it relies on inside the publishing
#: transaction, so a change in between (closing, deleted, re-created with other params, published
#: by a concurrent add) is refused there and never published over.
CONFIG_NODES = ("state", "online", "mode", "params", "physical-device")


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
    store: XenStore, path: BackendPath, settings: Settings, journal: Journal, *, env: Environment
) -> AddResult:
    home = store.home()
    be = backend_dir(store, path)
    published = False
    try:
        nodes = _read_backend(store, be)
        mode, target_params = _validate(nodes)
        target = parse_target(target_params)
        writable = mode == "w"
        if "physical-device" in nodes:
            published_nodes = store.run_transaction(lambda tx: _read_published(tx, be))
            if "physical-device" not in published_nodes:
                raise BackendClosing("physical-device was withdrawn while this repeated add checked it")
            return _confirm_existing(published_nodes)
        faults.pause(env, "add-start")
        claimed = _open_and_claim(
            store,
            target,
            home=home,
            be=be,
            path=path,
            writable=writable,
            settings=settings,
            env=env,
            config=(mode, target_params),
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
                identity=device.identity,
                timeout=settings.handoff_timeout,
                bus=env.xen_backend_bus,
            )
            faults.pause(env, "add-consumer-ready")
            if (
                isinstance(device, LoopDevice)
                and consumer is handoff.Consumer.KERNEL
                and not settings.kernel_autoclear
            ):
                # blkback holds it now; without this a guest reboot would detach its disk.
                device.set_autoclear(False)
                owner = owner.with_autoclear(False)
            store.run_transaction(lambda tx: _mark_connected(tx, be, owner))
            faults.pause(env, "add-done")
            return AddResult(
                device.identity.physical_device, device.identity.luid, claimed.path, consumer.value
            )
        finally:
            device.close()  # delete-on-close: the consumer's reference is what keeps it now
    except XenblockError as exc:
        report_failure(store, be, exc, withdraw=published)
        raise


def _read_backend(store: XenStore, be: str) -> dict[str, str]:
    """The nodes `add` decides from (CONFIG_NODES; absent ones left out), in one round trip. The
    directory node itself comes first: it reads as "" when it exists, ENOENT when not."""
    values = store.read_many([be, *(join(be, name) for name in CONFIG_NODES)])
    if values[0] is None:
        raise BackendGone(f"{be} does not exist")
    return {name: value for name, value in zip(CONFIG_NODES, values[1:], strict=True) if value is not None}


def _read_published(tx: Transaction, be: str) -> dict[str, str]:
    """What an earlier add published, consistently (they are written in one transaction)."""
    names = ("physical-device", "physical-device-luid", "physical-device-path")
    values = tx.read_many([join(be, name) for name in names])
    return {name: value for name, value in zip(names, values, strict=True) if value is not None}


def _validate(nodes: dict[str, str]) -> tuple[str, str]:
    if nodes.get("online") == "0" or nodes.get("state") in ("5", "6"):
        raise BackendClosing(f"backend is closing (state {nodes.get('state')}, online {nodes.get('online')})")
    mode = nodes.get("mode")
    if mode not in ("r", "w"):
        raise BadMode(f"mode must be exactly 'r' or 'w', not {(mode or '')[:20]!r}")
    params = nodes.get("params")
    if params is None:
        raise TargetSyntaxError("params is missing")
    return mode, params


class _Claimed(NamedTuple):
    """The device we publish (held until the consumer has it), its record and its shown path."""

    device: BlockDevice
    owner: OwnerRecord
    path: str


def _open_and_claim(
    store: XenStore,
    target: Target,
    *,
    home: str,
    be: str,
    path: BackendPath,
    writable: bool,
    settings: Settings,
    env: Environment,
    config: tuple[str, str],
) -> _Claimed:
    """Open the target once, check sharing under a per-target lock, create the loop device if it
    is a file, and publish — all before the lock is released, so a concurrent add of the same
    target sees our claim. `config` is the (mode, params) the target came from; publishing
    re-checks it."""
    if target.snapshot:
        return _claim_snapshot(
            store,
            target,
            home=home,
            be=be,
            path=path,
            writable=writable,
            settings=settings,
            env=env,
            config=config,
        )
    if maybe_dm(target):
        from xenblockctl.blockscript import dmtargets

        named = dmtargets.open_named(target, writable=writable, env=env)
        if named is not None:
            try:
                return _claim_device(
                    store,
                    named,
                    home=home,
                    be=be,
                    writable=writable,
                    settings=settings,
                    env=env,
                    config=config,
                )
            except BaseException:
                named.close()
                raise
    fd = blockdev.open_path(target.path, writable=writable)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if target.expect_dm_name is not None or target.expect_diskseq is not None:
                raise IdentityMismatch(f"{target.path} is a regular file, expected a block device")
            wanted = sharing.Wanted(writable=writable, file_id=(st.st_dev, st.st_ino))
            key = f"file-{st.st_dev:x}-{st.st_ino:x}"
        else:
            ident = blockdev.identify(fd)
            check_expectations(target, ident)
            wanted = sharing.Wanted(writable=writable, devt=ident.devt, diskseq=ident.diskseq)
            key = f"dev-{ident.major}-{ident.minor}"
        faults.pause(env, "add-target-open")
        with target_lock(key, timeout=settings.lock_timeout, lock_dir=env.lock_dir):
            sharing.check(store, home, be, wanted)
            device: BlockDevice
            if stat.S_ISREG(st.st_mode):
                device = loop.attach_fd(
                    fd,
                    read_only=not writable,
                    tag=loop.make_tag(path.domid, path.devid),
                    autoclear=True,
                    direct_io=settings.direct_io,
                    backing_path=target.path,
                )
            else:
                device = BlockDevice(os.dup(fd), blockdev.identify(fd), target.path)
                if device.identity != ident:
                    device.close()
                    raise IdentityMismatch(f"{target.path} changed identity while it was being checked")
            try:
                claimed = _Claimed(
                    device, OwnerRecord.for_device(device, writable=writable), _device_path(device)
                )
                store.run_transaction(lambda tx: _publish(tx, home, be, claimed, config))
            except BaseException:
                device.close()
                raise
            return claimed
    finally:
        os.close(fd)


def _claim_device(
    store: XenStore,
    device: BlockDevice,
    *,
    home: str,
    be: str,
    writable: bool,
    settings: Settings,
    env: Environment,
    config: tuple[str, str],
) -> _Claimed:
    """Sharing check and publish for a device already opened and confirmed (dm name/uuid forms)."""
    ident = device.identity
    wanted = sharing.Wanted(writable=writable, devt=ident.devt, diskseq=ident.diskseq)
    faults.pause(env, "add-target-open")
    with target_lock(
        f"dev-{ident.major}-{ident.minor}", timeout=settings.lock_timeout, lock_dir=env.lock_dir
    ):
        sharing.check(store, home, be, wanted)
        claimed = _Claimed(device, OwnerRecord.for_device(device, writable=writable), device.path or "")
        store.run_transaction(lambda tx: _publish(tx, home, be, claimed, config))
        return claimed


def _claim_snapshot(
    store: XenStore,
    target: Target,
    *,
    home: str,
    be: str,
    path: BackendPath,
    writable: bool,
    settings: Settings,
    env: Environment,
    config: tuple[str, str],
) -> _Claimed:
    """`snapshot:BASE`: the base is only ever read, so the sharing check asks for read-only use of
    the base file; the writable dm device is new and private to this backend."""
    from xenblockctl.blockscript import dmtargets

    fd = blockdev.open_path(target.path, writable=False)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TargetTypeError(
                f"{target.path}: the base of a snapshot: target must be a regular image file"
            )
        with dmtargets.control(env) as ctl:  # no dm: fail before allocating anything
            wanted = sharing.Wanted(writable=False, file_id=(st.st_dev, st.st_ino))
            faults.pause(env, "add-target-open")
            with target_lock(
                f"file-{st.st_dev:x}-{st.st_ino:x}", timeout=settings.lock_timeout, lock_dir=env.lock_dir
            ):
                sharing.check(store, home, be, wanted)
                disk = dmtargets.create_snapshot(
                    ctl,
                    fd,
                    base_path=target.path,
                    domid=path.domid,
                    devid=path.devid,
                    direct_io=settings.direct_io,
                )
                try:
                    owner = OwnerRecord.for_dm(
                        disk.device.identity,
                        uuid=disk.uuid,
                        backing=(st.st_dev, st.st_ino),
                        writable=writable,
                    )
                    claimed = _Claimed(disk.device, owner, disk.device.path or "")
                    store.run_transaction(lambda tx: _publish(tx, home, be, claimed, config))
                except BaseException:
                    disk.device.close()  # deferred remove is armed: this removes it, the loops follow
                    raise
                return claimed
    finally:
        os.close(fd)


def _device_path(device: BlockDevice) -> str:
    if isinstance(device, LoopDevice):
        return f"/dev/loop{device.number}"
    return device.path or ""


def _publish(tx: Transaction, home: str, be: str, claimed: _Claimed, config: tuple[str, str]) -> None:
    """One transaction: the luid can never be seen without physical-device or the other way round.
    Re-checks the backend inside the transaction so a closing or deleted backend is not revived,
    and that mode and params are still the ones the device was opened from (the first read was
    not transactional). Two batches: the checks, then every write.

    It also clears the backend's error node (`error/<backend path>`): the hand-off treats an error
    there as the consumer refusing, and libxl never deletes those nodes, so one left by an earlier
    backend at the same domain/devid (a refusal, a blkback failure) would fail this attach. Nothing
    can have reported an error for this backend yet: no consumer acts before physical-device."""
    state, online, published, mode, params = tx.read_many(
        [join(be, name) for name in ("state", "online", "physical-device", "mode", "params")]
    )
    if state is None:
        raise BackendGone(f"{be} vanished before publishing")
    if state in ("5", "6") or online == "0":
        raise BackendClosing("backend started closing before publishing")
    if published is not None:
        raise AlreadyPublished("another add published physical-device for this backend concurrently")
    if (mode, params) != config:
        raise BackendGone(f"{be} changed mode or params while the target was being opened (re-created?)")
    ident = claimed.device.identity
    tx.write_many(
        {
            join(be, "physical-device-luid"): ident.luid,
            join(be, "physical-device"): ident.physical_device,
            join(be, "physical-device-path"): claimed.path,
            join(be, OWNER_NODE): claimed.owner.format(),
        },
        remove=[join(be, "hotplug-error"), *_stale_error_dir(home, be)],
    )


def _stale_error_dir(home: str, be: str) -> list[str]:
    """The error directory of backend `be` (absolute, under `home`), as xenbus_dev_error() names it."""
    prefix = home.rstrip("/") + "/"
    return [join(home, "error", be[len(prefix) :])] if be.startswith(prefix) else []


def _mark_connected(tx: Transaction, be: str, owner: OwnerRecord) -> None:
    if tx.read_optional(join(be, "state")) is None:
        raise BackendGone(f"{be} vanished during hand-off")
    tx.write_many({join(be, OWNER_NODE): owner.format(), join(be, "hotplug-status"): "connected"})


def _confirm_existing(nodes: dict[str, str]) -> AddResult:
    """A second `add` (libxl and udev both ran us, or a retry). Fine if the published identity
    still names the live device; a mismatch is an error, never a silent rewrite: blkback ignores
    changes to physical-device, so rewriting could not help and could hide a swapped disk."""
    physical = nodes["physical-device"]
    luid_text = nodes.get("physical-device-luid")
    if luid_text is None:
        raise IdentityMismatch("physical-device is set without physical-device-luid (not written by us)")
    try:
        major, minor = parse_physical_device(physical)
        diskseq = parse_luid(luid_text)
    except (BackendRecordError, OwnerRecordError) as exc:
        raise IdentityMismatch(f"published identity is malformed: {exc.message}") from exc
    live = blockdev.live_diskseq(os.makedev(major, minor))
    if live != diskseq:
        raise IdentityMismatch(
            f"physical-device {physical} now has diskseq {live if live is not None else 'none'}, "
            f"published luid says {diskseq}: the device was replaced"
        )
    return AddResult(physical, luid_text, nodes.get("physical-device-path", ""), "existing", already=True)


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
    with contextlib.suppress(XenblockError):
        store.run_transaction(tx_body)
