"""Why a vbd handshake stalled, said from what xenstore shows and no further.

dom0 cannot see into another domain: not whether a guest loaded blkfront, not whether a driver
domain loaded xen-blkback or runs our engine. What xenstore does show: whether the domain exists,
whether libxl made it a driver domain, who may write the handshake nodes, and how the other vbds
it serves fare. These sentences state those facts and name what stays unknown, instead of
guessing (a guest that could not write its own `state` used to be reported as "no blkfront
loaded", issue 14)."""

from __future__ import annotations

from xenblockctl.errors import XenblockError
from xenblockctl.toolstack.domains import domain_path
from xenblockctl.toolstack.vbd_dirs import VbdLocation
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import Perm, join
from xenblockctl.xenstore.vbd import XenbusState, walk_backends


def may_write(perms: list[Perm], domid: int) -> bool:
    """xenstore's rule: the owner (first entry) writes; another domain writes if its entry, or
    the default (the first entry's access) when it has none, grants w or b."""
    if not perms:
        return False
    if perms[0].domid == domid:
        return True
    for perm in perms[1:]:
        if perm.domid == domid:
            return perm.can_write
    return perms[0].can_write


def _perms_or_none(store: XenStore, path: str) -> list[Perm] | None:
    try:
        return store.get_perms(path)
    except XenblockError:
        return None


def _domain_label(store: XenStore, domid: int) -> str:
    name = store.read_optional(join(domain_path(domid), "name"))
    return f"domain {domid}" + (f" ({name[:40]!r})" if name else "")


def frontend_stall(store: XenStore, loc: VbdLocation, frontend_state: str | None) -> str:
    """The frontend never moved past Initialising/InitWait: what is known about why."""
    try:
        return _frontend_stall(store, loc, frontend_state)
    except XenblockError as exc:  # e.g. a driver domain may not read the guest's nodes
        state = frontend_state or "absent"
        return f"the guest has not answered (frontend state {state}); no more is known: {exc}"


def _frontend_stall(store: XenStore, loc: VbdLocation, frontend_state: str | None) -> str:
    guest = _domain_label(store, loc.domid)
    if store.read_optional(domain_path(loc.domid)) is None:
        return f"{guest} is gone from xenstore (destroyed?)"
    state_node = join(loc.frontend, "state")
    perms = _perms_or_none(store, state_node)
    if perms is None:
        return f"the frontend's state node is missing ({state_node})"
    if not may_write(perms, loc.domid):
        listed = ",".join(str(p) for p in perms)
        return (
            f"{guest} may not write its frontend state ({state_node} is ({listed})): "
            "the frontend directory was not written as libxl writes it"
        )
    return (
        f"the guest has not answered: frontend state {frontend_state or 'absent'}, and {guest} "
        "exists and may write it; from here it cannot be told whether the guest is still booting, "
        "is paused, or has no blkfront (xen-blkfront) loaded"
    )


def _other_backends(store: XenStore, loc: VbdLocation) -> tuple[int, int]:
    """(vbds of this backend domain past InitWait, all its other vbds), every kind and guest."""
    working = total = 0
    for entry in walk_backends(store, domain_path(loc.backend_domid)):
        if uint_or_none(entry.domid, maximum=0xFFFF) is None or entry.path == loc.backend:
            continue
        total += 1
        state = XenbusState.of(store.read_optional(join(entry.path, "state")))
        if state is not None and XenbusState.InitWait <= state <= XenbusState.Connected:
            working += 1
    return working, total


def backend_domain_silent(store: XenStore, loc: VbdLocation) -> str:
    """No backend in another domain took the directory: what xenstore shows of that domain."""
    try:
        return _backend_domain_silent(store, loc)
    except XenblockError as exc:
        return f"domain {loc.backend_domid} stayed silent; xenstore could not tell more: {exc}"


def _backend_domain_silent(store: XenStore, loc: VbdLocation) -> str:
    bedom = _domain_label(store, loc.backend_domid)
    if store.read_optional(domain_path(loc.backend_domid)) is None:
        return f"{bedom} does not exist in xenstore"
    facts = []
    # libxl__domain_make creates <home>/libxl only for driver_domain=1.
    if store.read_optional(join(domain_path(loc.backend_domid), "libxl")) is None:
        facts.append("it was not created as a driver domain (no driver_domain=1: no libxl directory)")
    else:
        facts.append("it was created as a driver domain")
    perms = _perms_or_none(store, join(loc.backend, "state"))
    if perms is not None and not may_write(perms, loc.backend_domid):
        facts.append(f"it may not write {loc.relative}/state ({','.join(str(p) for p in perms)})")
    working, total = _other_backends(store, loc)
    if total:
        facts.append(f"{working} of its {total} other vbd backends are past Initialising")
    else:
        facts.append("it serves no other vbd")
    return (
        f"{bedom}: " + "; ".join(facts) + ". Whether its kernel has xen-blkback loaded, or our engine "
        "runs there, cannot be seen from this domain"
    )
