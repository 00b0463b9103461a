"""`remove`: detach only what we can prove we created, then withdraw our nodes.

The proof is our ownership record; with the record gone, a loop device's tag (below).

libxl may run remove for a device whose add failed, never ran, or ran partially; twice; after
the image was deleted; or never (then delete-on-close cleans up). So every node may be missing,
and the device is detached *before* the record is withdrawn: killed in between, a re-run finds the
record, sees the diskseq moved on (ALREADY_GONE) and finishes the withdrawal. An NBD export the
engine served (kind=nbd) has nothing kernel-side: only the record is withdrawn.

A kernel NBD device is never in the record until it is opened and published; an `add` killed between
its connect and its open leaves a connected device that nobody opened, which does not clear by
itself. Its backend identifier names this vbd, so `remove` disconnects every such device except
the one the record names (that one goes at its consumer's last close, DISCONNECT_ON_CLOSE).
Loop devices likewise have a second proof source when the record is gone (dom0's libxl removed a
driver domain's backend directory before this remove read it): their tag names this vbd
(`_detach_unrecorded_loops`).

A loop device's detach and the withdrawal run under the device's lock (blockscript/autoclear.py),
which the job turning AUTOCLEAR off after a kernel-blkback hand-off (a forked child, or the warm
worker after its reply) holds until it is done: otherwise that job's ioctl could cancel the
AUTOCLEAR our LOOP_CLR_FD armed, and the device would stay bound after blkback lets go. With a
record, a wait longer than lock_timeout is a coded error that changes nothing; the pass by tag
tries every device it found and then raises the first failure.

With a record, the record is read once before the detach and once more inside the withdrawal's
transaction, in the batch that removes our nodes (not again after the lock: that was a round trip of its own;
bench/README.md, issue 18, session 14). The detach needs no second look: it acts only on the
exact binding the first read names (devt, diskseq, tag, backing: loop.detach_with_proof), which
nobody but this backend's add can have made, so detaching it is right whoever rewrote the record
since. The withdrawal does: it goes through only for the record that was read, or for the same
record as the AUTOCLEAR job rewrites it (autoclear=0, written while we waited for its lock).
Any other record (a concurrent add published a new device after a forced detach) is left in
place and logged as `record-changed`; a record already withdrawn is logged as such."""

from __future__ import annotations

import posix
import time

from xenblockctl.blockscript import faults
from xenblockctl.blockscript.locks import device_lock
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.kernel import loop
from xenblockctl.kernel.errors import LoopError
from xenblockctl.kernel.loop import DetachResult
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.identity import (
    OWNER,
    PUBLISHED,
    NbdOwnerRecord,
    OwnerRecord,
    OwnerRecordError,
    PublishedIdentity,
    parse_owner,
)
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, backend_dir


class RemoveResult(NamedTuple):
    # "detached" | "already-gone" | "not-a-loop" | "nbd-export" | "nothing" | "record-changed"
    detached: str


#: How long remove waits for a loop device's lock when no setting says (the CLI's detach, gc).
LOCK_WAIT = 10.0
#: The nbd driver's sysfs directory: absent, no NBD device can exist.
NBD_DRIVER = "/sys/module/nbd"


def run_remove(
    store: XenStore, path: BackendPath, journal: Journal, *, env: Environment, lock_timeout: float = LOCK_WAIT
) -> RemoveResult:
    # Our home and the owner record in one round trip (as add reads its nodes): the record is read
    # by the path libxl gave, which the daemon resolves against our home as backend_dir does.
    where = path.absolute() if path.backend_domid is not None else path.relative
    home, (owner_text,) = store.home_and_read_many([join(where, OWNER)])  # a missing node: None
    be = backend_dir(store, path)
    faults.pause(env, "remove-start")
    if owner_text is None:
        result = _remove(store, path, be, (None, None), journal, env=env)
        unrecorded = _detach_unrecorded_loops(
            store, path, (home, be), journal, env=env, lock_timeout=lock_timeout
        )
        return result if unrecorded is None else RemoveResult(unrecorded)
    # malformed: cannot prove ownership, touch nothing
    owner = parse_owner(owner_text)
    if not isinstance(owner, OwnerRecord) or owner.kind != "loop":
        return _remove(store, path, be, (owner_text, owner), journal, env=env)
    with device_lock(owner.major, owner.minor, timeout=lock_timeout, lock_dir=env.lock_dir):
        return _remove(store, path, be, (owner_text, owner), journal, env=env)


def _remove(
    store: XenStore,
    path: BackendPath,
    be: str,
    read: tuple[str | None, OwnerRecord | NbdOwnerRecord | None],
    journal: Journal,
    *,
    env: Environment,
) -> RemoveResult:
    """The detach and withdrawal, for the record as `read` (its text and what it parsed to)."""
    owner_text, owner = read
    outcome = "nothing"
    if owner is not None:
        if isinstance(owner, NbdOwnerRecord):
            outcome = "nbd-export"  # the engine's connection closed with the backend: nothing to free
            journal.info(f"NBD export {owner.uri}: nothing kernel-side to release")
        elif owner.kind == "loop":
            assert owner.tag is not None
            result = loop.detach_with_proof(
                owner.devt, diskseq=owner.diskseq, tag=owner.tag, backing=owner.backing
            )
            outcome = result.value
            journal.info(f"loop {owner.major}:{owner.minor} seq {owner.diskseq:x}: {outcome}")
        else:
            outcome = "not-a-loop"
    _disconnect_unpublished_nbd(path, owner, journal)
    faults.pause(env, "remove-detached")
    if owner_text is not None:
        accepted = _records_acted_on(owner_text, owner)
        recorded = store.run_transaction(lambda tx: _withdraw(tx, be, accepted))
        if recorded is None:
            journal.info("owner record already withdrawn (another remove or gc): nothing to withdraw")
        elif recorded not in accepted:
            changed = _describe(recorded)
            journal.warning(
                f"owner record changed since it was read ({changed}): left alone, nothing withdrawn"
            )
            outcome = "record-changed"
    faults.pause(env, "remove-done")
    return RemoveResult(outcome)


def _detach_unrecorded_loops(
    store: XenStore,
    path: BackendPath,
    where: tuple[str, str],
    journal: Journal,
    *,
    env: Environment,
    lock_timeout: float,
) -> str | None:
    """Detach the loop devices tagged for this vbd while its owner record is gone: "detached" if
    one was, else "already-gone" if one was found gone, None if there was nothing to do (or all
    were left alone).

    dom0's libxl waits LIBXL_DESTROY_TIMEOUT (10 s) for a driver domain to remove a backend
    directory, then removes it itself (libxl_device.c, device_destroy_be_watch_cb and
    libxl__device_destroy), owner record and all; a driver domain slow to run this script reads
    no record afterwards (ci34's scenario 21: both loops stayed bound). The tag
    (`xenblockctl:<domid>:<devid>`) is the other proof: we assume nobody else writes our prefix into
    lo_file_name (any root process could; gc, sharing and the record's proof assume the same), so a
    device carrying exactly this vbd's tag was bound by an add of this vbd. With the vbd going
    away, one whose AUTOCLEAR is off (the kernel-blkback hand-off turned it off: no close will
    ever free it) is ours to detach. For each, in order:
      * its device lock: the AUTOCLEAR job of an add holds it from before its record is published
        until it is done, so under it AUTOCLEAR is what it stays, and is read then (a job that read
        the record before it vanished may have turned AUTOCLEAR off since the scan);
      * AUTOCLEAR on: left to its last close (delete-on-close);
      * this vbd's record, read again under the lock: one naming this device is a re-add's, and
        its device is left to it (a malformed one proves nothing: the pass stops);
      * another backend publishing the device with its diskseq, or without one that says
        otherwise (an admin's block-device target): left bound;
      * detach_with_proof with the tag, diskseq and backing inode the scan read: a number re-bound
        since is refused, not cleared.
    Every decision is logged. A device that fails (its lock not had in time, the proof refused, a
    store error) is logged and the others are still tried; the first failure is then raised, so
    libxl reports it. All lock waits together take at most `lock_timeout`. Tests scope the scan to
    their own files, as gc's (env.gc_scope)."""
    home, be = where
    ours = loop.make_tag(path.domid, path.devid)
    scope = env.gc_scope.rstrip("/") + "/" if env.gc_scope else None
    try:
        found = [b for b in loop.bound_loops_tagged(ours) if not scope or b.backing_file.startswith(scope)]
    except OSError as exc:
        raise LoopError(f"cannot scan the loop devices for tag {ours}", errno=exc.errno) from exc
    deadline = time.monotonic() + lock_timeout
    outcomes: list[str] = []
    failed: XenblockError | None = None
    for bound in found:
        name = f"loop {posix.major(bound.devt)}:{posix.minor(bound.devt)} seq {bound.diskseq:x} ({ours})"
        try:
            outcome = _detach_unrecorded(store, (home, be), bound, journal, env=env, deadline=deadline)
        except XenblockError as exc:
            journal.error(f"{name}, no owner record: {exc.one_line()}")
            failed = failed or exc
            continue
        if outcome is None:
            break  # a malformed record appeared: nothing can be proven any more
        journal.info(f"{name}, no owner record: {outcome}")
        outcomes.append(outcome)
    if failed is not None:
        raise failed
    for result in DetachResult.DETACHED, DetachResult.ALREADY_GONE:
        if any(outcome.startswith(result.value) for outcome in outcomes):
            return str(result.value)
    return None  # nothing, or all left alone


def _detach_unrecorded(
    store: XenStore,
    where: tuple[str, str],
    bound: loop.BoundLoop,
    journal: Journal,
    *,
    env: Environment,
    deadline: float,
) -> str | None:
    """One device of _detach_unrecorded_loops, under its lock: what became of it (None: a
    malformed record appeared, the pass stops)."""
    home, be = where
    major, minor = posix.major(bound.devt), posix.minor(bound.devt)
    wait = max(0.0, deadline - time.monotonic())
    with device_lock(major, minor, timeout=wait, lock_dir=env.lock_dir):
        autoclear = loop.autoclear_now(bound.number)
        if autoclear is None:
            return DetachResult.ALREADY_GONE.value
        if autoclear:
            return "left to its last close (AUTOCLEAR on)"
        text = store.read_optional(join(be, OWNER))
        if text is not None:
            try:
                record = parse_owner(text)
            except OwnerRecordError as exc:
                journal.warning(f"an owner record appeared meanwhile, malformed ({exc}): nothing detached")
                return None
            named = (record.devt, record.diskseq) if isinstance(record, OwnerRecord) else None
            if named == (bound.devt, bound.diskseq):
                return "left to the re-add whose record names it"
        holder = _published_elsewhere(store, (home, be), bound)
        if holder is not None:
            return f"left bound: {holder} publishes it"
        backing = (bound.status.backing_dev, bound.status.backing_ino)
        result = loop.detach_with_proof(
            bound.devt, diskseq=bound.diskseq, tag=bound.status.tag, backing=backing
        )
        return result.value if result is not DetachResult.DETACHED else f"{result.value} by its tag"


def _published_elsewhere(store: XenStore, where: tuple[str, str], bound: loop.BoundLoop) -> str | None:
    """Another backend of this domain whose physical-device names `bound`'s number, unless the
    diskseq it publishes is another binding's (PublishedIdentity.claimed, as gc and sharing read
    it); their identity nodes in one batch."""
    home, be = where
    entries = identity.backends_publishing(store, home, bound.devt, skip=be)
    nodes = identity.IDENTITY_NODES
    values = iter(store.read_many([join(entry.path, node) for entry in entries for node in nodes]))
    for entry in entries:
        published = PublishedIdentity.claimed({node: next(values) for node in nodes})
        if published is None or published.diskseq in (None, bound.diskseq):
            return entry.path
    return None


def _records_acted_on(owner_text: str, owner: OwnerRecord | NbdOwnerRecord | None) -> tuple[str, ...]:
    """The record texts the withdrawal may remove: the one read, and for a loop the AUTOCLEAR
    job's rewrite of it (autoclear=0, the only change it makes: autoclear.py's `cleared`)."""
    if isinstance(owner, OwnerRecord) and owner.kind == "loop" and owner.autoclear:
        return owner_text, owner.with_autoclear(False).format()
    return (owner_text,)


def _describe(text: str) -> str:
    """A changed record for the log: the device it names (major:minor in decimal, as lsblk and the
    detach line above print it; the record's own dev= is hex), else the start of its text."""
    try:
        record = parse_owner(text)
    except OwnerRecordError:
        return f"unparsable: {text[:60]!r}"
    if isinstance(record, NbdOwnerRecord):
        return f"kind=nbd {record.uri[:60]}"
    return f"kind={record.kind} {record.major}:{record.minor} seq {record.diskseq:x}"


def _withdraw(tx: Transaction, be: str, accepted: tuple[str, ...]) -> str | None:
    """Remove our nodes, but only if the record is still one we acted on (a concurrent add
    after a forced detach could have published a new one). The check's read and the removals go
    in one batch; if the record changed, the abort undoes the removals unseen. Returns the record
    as read in the transaction (None: already withdrawn)."""
    ours = [join(be, name) for name in PUBLISHED]
    (recorded,), failure = tx.read_many_then_write([join(be, OWNER)], {}, remove=ours)
    if recorded not in accepted:
        tx.abort()
        return recorded
    if failure is not None:
        raise failure
    return recorded


def _disconnect_unpublished_nbd(
    path: BackendPath, owner: OwnerRecord | NbdOwnerRecord | None, journal: Journal
) -> None:
    """Disconnect the NBD devices carrying this vbd's identifier that the owner record does not name
    (an add killed between connect and open). Each outcome is logged; a failure is logged and the
    withdrawal goes on (libxl is removing the vbd either way)."""
    try:
        # Without the nbd driver there is no NBD device: its sysfs entry (there when it is loaded or
        # built in: it has parameters) is one lookup, where listing /sys/block costs ~0.1 ms on a
        # host with a few hundred loop minors (bench/README.md, issue 18 round 7).
        posix.stat(NBD_DRIVER)
    except FileNotFoundError:
        return
    except OSError:
        pass  # unsure: the listing decides
    try:
        if not any(name.startswith("nbd") for name in posix.listdir("/sys/block")):
            return  # no NBD device at all: kernel/nbd.py stays unimported
    except OSError:
        return
    from xenblockctl.kernel import nbd as knbd

    published = (owner.devt, owner.diskseq) if isinstance(owner, OwnerRecord) else None
    ours = loop.make_tag(path.domid, path.devid)
    for device in knbd.devices_named(ours):
        if device.identifier != ours:
            continue  # a longer identifier that only starts like ours (another devid)
        if (device.devt, device.diskseq) == published:
            continue
        try:
            result = knbd.disconnect_with_proof(device)
        except XenblockError as exc:
            journal.error(f"{device.path} ({device.identifier}, never published): {exc.one_line()}")
            continue
        journal.info(f"{device.path} seq {device.diskseq:x} ({device.identifier}, never published): {result}")
