"""Why a vbd handshake stalled, said from what xenstore shows and no further.

dom0 cannot see into another domain: not whether a guest loaded blkfront, not whether a driver
domain loaded xen-blkback or runs our engine. What xenstore does show: whether the domain exists,
whether libxl made it a driver domain, who may write the handshake nodes, how the other vbds
it serves fare and who took them (our engine writes `opened`; blkback does not), and whether block
scripts ran there (`hotplug-status`: `xl devd` ran then; that it still runs, nothing shows; it
writes no node of its own). These sentences state those facts and name what stays unknown, instead of
guessing (a guest that could not write its own `state` used to be reported as "no blkfront
loaded", issue 14)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from xenblockctl.errors import XenblockError
from xenblockctl.toolstack.domains import domain_path
from xenblockctl.toolstack.vbd_dirs import VbdLocation
from xenblockctl.xenstore.backends import walk_backends
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.perms import Perm
from xenblockctl.xenstore.vbd import XenbusState


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


@dataclass
class DomainBackends:
    """What a backend domain's other vbds show of who serves there, read from xenstore alone.

    Our engine writes `opened` when it takes a directory (at InitWait, before any script runs);
    kernel blkback never does. A `hotplug-status` was written by a block script, which in a driver
    domain only its `xl devd` runs. So a directory past Initialising tells which consumer took it,
    and one with hotplug-status that devd ran there -- when it did, not that it still does."""

    total: int = 0
    #: past Initialising (InitWait..Connected), by kind and consumer ("engine" | "other")
    working: Counter[tuple[str, str]] = field(default_factory=Counter)
    scripted: int = 0  # carry a hotplug-status

    @property
    def working_total(self) -> int:
        return sum(self.working.values())

    def engine_kinds(self) -> set[str]:
        return {kind for kind, who in self.working if who == "engine"}

    def describe(self) -> str:
        """One short clause (it ends up in a bounded one-line error)."""
        if not self.total:
            return "it serves no other vbd"
        said = f"{self.working_total} of its {self.total} other vbd backends are past Initialising"
        served = [f"{n} {kind} by {self._who(kind, who)}" for (kind, who), n in sorted(self.working.items())]
        if served:
            said += f" ({', '.join(served)})"
        if self.scripted:
            return said + f"; {self.scripted} carry a hotplug-status (`xl devd` ran scripts there)"
        return said + "; none carries a hotplug-status (no sign `xl devd` ran there)"

    @staticmethod
    def _who(kind: str, who: str) -> str:
        if who == "engine":
            return "our engine"
        return "kernel blkback" if kind == "vbd" else "another driver"


def domain_backends(store: XenStore, backend_domid: int, *, skip: str | None = None) -> DomainBackends:
    """Survey every vbd/vbd3 backend directory of `backend_domid` except `skip` (a full path)."""
    seen = DomainBackends()
    for entry in walk_backends(store, domain_path(backend_domid)):
        if uint_or_none(entry.domid, maximum=0xFFFF) is None or entry.path == skip:
            continue
        seen.total += 1
        state_text, opened, status = store.read_many(
            [join(entry.path, "state"), join(entry.path, "opened"), join(entry.path, "hotplug-status")]
        )
        state = XenbusState.of(state_text)
        if state is not None and XenbusState.InitWait <= state <= XenbusState.Connected:
            seen.working[(entry.kind, "engine" if opened is not None else "other")] += 1
        if status is not None:
            seen.scripted += 1
    return seen


def driver_domain_scripts(store: XenStore, loc: VbdLocation) -> str:
    """The driver domain took the directory but no block script answered: what its other vbds
    show of `xl devd` there."""
    try:
        return domain_backends(store, loc.backend_domid, skip=loc.backend).describe()
    except XenblockError as exc:
        return f"xenstore could not tell more: {exc}"


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
    facts.append(domain_backends(store, loc.backend_domid, skip=loc.backend).describe())
    return f"{bedom}: " + "; ".join(facts) + ". Its modules and processes cannot be seen from this domain"
