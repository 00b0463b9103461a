"""`remove`: detach only what our ownership record proves we created, then withdraw our nodes.

libxl may run remove for a device whose add failed, never ran, or ran partially; twice; after
the image was deleted; or never (then delete-on-close cleans up). So every node may be missing,
and the device is detached *before* the record is withdrawn: killed in between, a re-run finds the
record, sees the diskseq moved on (ALREADY_GONE) and finishes the withdrawal."""

from __future__ import annotations

from xenblockctl.blockscript import faults
from xenblockctl.environment import Environment
from xenblockctl.journal import Journal
from xenblockctl.kernel import loop
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.errors import XenstoreNoEntry
from xenblockctl.xenstore.identity import OWNER, PUBLISHED, OwnerRecord
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, backend_dir


class RemoveResult(NamedTuple):
    detached: str  # "detached" | "already-gone" | "not-a-loop" | "nothing"


def run_remove(store: XenStore, path: BackendPath, journal: Journal, *, env: Environment) -> RemoveResult:
    be = backend_dir(store, path)
    try:
        owner_text = store.read_optional(join(be, OWNER))
    except XenstoreNoEntry:
        owner_text = None
    faults.pause(env, "remove-start")
    outcome = "nothing"
    if owner_text is not None:
        owner = OwnerRecord.parse(owner_text)  # malformed: cannot prove ownership, touch nothing
        if owner.kind == "loop":
            assert owner.tag is not None
            result = loop.detach_with_proof(
                owner.devt, diskseq=owner.diskseq, tag=owner.tag, backing=owner.backing
            )
            outcome = result.value
            journal.info(f"loop {owner.major}:{owner.minor} seq {owner.diskseq:x}: {outcome}")
        else:
            outcome = "not-a-loop"
    faults.pause(env, "remove-detached")
    if owner_text is not None:
        store.run_transaction(lambda tx: _withdraw(tx, be, owner_text))
    faults.pause(env, "remove-done")
    return RemoveResult(outcome)


def _withdraw(tx: Transaction, be: str, owner_text: str) -> None:
    """Remove our nodes, but only if the record is still the one we acted on (a concurrent add
    after a forced detach could have published a new one)."""
    if tx.read_optional(join(be, OWNER)) != owner_text:
        return
    tx.rm_many([join(be, name) for name in PUBLISHED])
