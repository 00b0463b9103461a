"""`add` of an NBD export the engine serves itself: no kernel device, the export's identity published.

Chosen when the target is an NBD URI and our engine has claimed the backend (it wrote `opened`=0
at InitWait, before libxl ran us: the same signal handoff.py reads). Kernel blkback cannot serve
an export without a kernel device, so for it claim.py's `_NbdKernel` makes one instead.

Steps, each failure a coded `hotplug-error` with nothing published and the connection closed:
  1. handshake in userspace (nbd/client.py): a bad URI, an unreachable server, a refused, empty or
     read-only-but-wanted-writable export fail here;
  2. under the per-export lock: the sharing check (a second writer of the same export on this host
     is refused like one of a block device, sharing.py), then one transaction publishing the owner
     record (xenstore/identity.py NbdOwnerRecord: canonical URI, size, transmission flags, the
     unix socket's dev/inode), re-checking the backend as add.py's `_publish` does;
  3. the engine connects itself, compares its own handshake with the record and writes `opened`=1
     or refuses with its error node; we wait for either (handoff.py), then `hotplug-status`.

The socket's dev/inode is read before connecting and again after the handshake: a socket replaced
in between (a server restarted at the same path) is refused rather than published with facts of
two different servers."""

from __future__ import annotations

import contextlib

from xenblockctl.blockscript import claim, faults, handoff, sharing
from xenblockctl.blockscript.add import (
    AddResult,
    AlreadyPublished,
    BackendClosing,
    BackendGone,
    _stale_error_dir,
)
from xenblockctl.blockscript.locks import target_lock
from xenblockctl.blockscript.settings import Settings
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.kernel.errors import TargetTypeError
from xenblockctl.nbd import client
from xenblockctl.nbd.errors import NbdError
from xenblockctl.nbd.uri import NbdUri
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.identity import NbdOwnerRecord, OwnerRecordError
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, XenbusState


def probe(export: NbdUri, *, writable: bool) -> NbdOwnerRecord:
    """Handshake with the export and return the record that identifies it (nothing published)."""
    before = client.socket_identity(export)
    with client.NbdClient.connect(export) as conn:
        info = conn.info
    if writable and info.read_only:
        raise TargetTypeError(f"{export.canonical()}: the export is read-only, the disk is writable")
    after = client.socket_identity(export)
    if before != after:
        raise NbdError(
            f"{export.socket_path} was replaced while the export was being checked (another server?)",
            code="nbd-export-changed",
        )
    return NbdOwnerRecord(export.canonical(), info.size, info.flags, "w" if writable else "r", after)


def run_add_nbd(
    store: XenStore,
    *,
    home: str,
    be: str,
    path: BackendPath,
    export: NbdUri,
    nodes: dict[str, str],
    mode: str,
    settings: Settings,
    journal: Journal,
    env: Environment,
) -> AddResult:
    """The engine-served NBD `add` (see the module docstring). The caller reports a failure."""
    config = (mode, nodes.get("params"))
    existing = nodes.get(identity.OWNER)
    if existing is not None:
        return _confirm_existing(existing, export)
    faults.pause(env, "add-start")
    record = probe(export, writable=mode == "w")
    faults.pause(env, "add-target-open")
    with target_lock(claim.export_key(export), timeout=settings.lock_timeout, lock_dir=env.lock_dir):
        sharing.check(store, home, be, sharing.Wanted(writable=mode == "w", nbd_uri=record.uri))
        store.run_transaction(lambda tx: _publish(tx, home, be, record, config))
    journal.info(
        f"published NBD export {record.uri} size {record.size} flags {record.flags:#x} for the engine"
    )
    try:
        faults.pause(env, "add-published")
        consumer = handoff.wait_for_consumer(
            store,
            home=home,
            backend=be,
            path=path,
            physical_device=None,
            timeout=settings.handoff_timeout,
            bus=env.xen_backend_bus,
        )
        faults.pause(env, "add-consumer-ready")
        store.run_transaction(lambda tx: _mark_connected(tx, be, record))
    except XenblockError:
        # The caller writes hotplug-error; the record goes first (only if it is still ours), so
        # that a refused export is never left looking published.
        with contextlib.suppress(XenblockError):
            store.run_transaction(lambda tx: _withdraw(tx, be, record))
        raise
    faults.pause(env, "add-done")
    return AddResult("", "", record.uri, consumer.value)


def _withdraw(tx: Transaction, be: str, record: NbdOwnerRecord) -> None:
    if tx.read_optional(join(be, identity.OWNER)) == record.format():
        tx.rm_many([join(be, name) for name in identity.PUBLISHED])


def _publish(
    tx: Transaction, home: str, be: str, record: NbdOwnerRecord, config: tuple[str, str | None]
) -> None:
    """One transaction, after the same re-checks as add.py's `_publish`: the record is the whole
    publication (no physical-device: nothing kernel-side exists), and the stale error node of an
    earlier backend at this domain/devid is cleared with it."""
    state, online, published, owner, mode, params = tx.read_many(
        [
            join(be, name)
            for name in ("state", "online", identity.PHYSICAL_DEVICE, identity.OWNER, "mode", "params")
        ]
    )
    if state is None:
        raise BackendGone(f"{be} vanished before publishing")
    seen = XenbusState.of(state)
    if (seen is not None and seen.closing) or online == "0":
        raise BackendClosing("backend started closing before publishing")
    if published is not None or owner is not None:
        raise AlreadyPublished("another add published for this backend concurrently")
    if (mode, params) != config:
        raise BackendGone(f"{be} changed mode or params while the export was being checked (re-created?)")
    tx.write_many(
        {join(be, identity.OWNER): record.format()},
        remove=[join(be, "hotplug-error"), *_stale_error_dir(home, be)],
    )


def _mark_connected(tx: Transaction, be: str, record: NbdOwnerRecord) -> None:
    if tx.read_optional(join(be, "state")) is None:
        raise BackendGone(f"{be} vanished during hand-off")
    if tx.read_optional(join(be, identity.OWNER)) != record.format():
        raise BackendGone(f"{be}: the published export was withdrawn during hand-off")
    tx.write(join(be, "hotplug-status"), "connected")


def _confirm_existing(text: str, export: NbdUri) -> AddResult:
    """A second `add` (libxl and udev both ran us, or a retry): fine if the record names this
    export; the engine checked (or will check) the export itself against it."""
    try:
        record = identity.parse_owner(text)
    except OwnerRecordError as exc:
        raise AlreadyPublished(
            f"an owner record is already published and is malformed: {exc.message}"
        ) from exc
    if not isinstance(record, NbdOwnerRecord) or record.uri != export.canonical():
        raise AlreadyPublished(f"this backend already published another target ({text[:120]})")
    return AddResult("", "", record.uri, "existing", already=True)
