"""Garbage: what xenblockctl made, can prove it made, and nothing uses any more.

  loop     bound loop device with our tag and AUTOCLEAR off (the kernel-blkback hand-off turns
           it off) that no backend's owner record names by major:minor *and* diskseq. This is
           what leaks when libxl deletes a backend without running `remove` (§1.5 step 3);
           a `remove` that runs after its record was deleted detaches by the tag itself.
           Devices with AUTOCLEAR on are never garbage: they vanish on their holder's last close.
  dm       dm device with our uuid prefix, not open, no deferred remove armed, creator dead.
  backend  backend directory we wrote or served (owner record, or `script` is ours) whose
           domain is gone, or whose add failed and published nothing.
  nbd      kernel NBD device whose backend identifier names one of our vbds
           (`xenblockctl:<domid>:<devid>`) that no backend's record or published identity names,
           while that vbd is gone, its domain is gone, or its add has finished (hotplug-status
           set): an add killed between connect and open leaves it connected and never opened, and
           such a device does not clear by itself. A vbd whose add has not finished is left alone
           (that add may be inside the window); its `remove` disconnects it. `identify:<pid>`
           identifiers count when that process is gone. Other identifiers are never touched.

Detaching uses the same proof as `remove` (tag + diskseq + backing inode; for NBD identifier +
diskseq), so a device re-used between the scan and the detach is refused, not cleared."""

from __future__ import annotations

import os
from dataclasses import dataclass

from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.kernel import dm, loop
from xenblockctl.kernel import nbd as knbd
from xenblockctl.kernel.loop_abi import LoopFlags
from xenblockctl.toolstack import inventory
from xenblockctl.toolstack.inventory import VbdInfo
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.identity import (
    OwnerRecord,
    OwnerRecordError,
    PublishedIdentity,
    parse_owner,
)
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.vbd import DOMID_FIRST_RESERVED
from xenblockctl.xenstore.vdev import RESERVED

SCRIPT_NAME = "block-xenblockctl"


@dataclass(frozen=True)
class Garbage:
    kind: str  # "loop" | "dm" | "backend" | "nbd"
    name: str  # /dev/loop3, dm name, backend path, /dev/nbd0
    reason: str
    loop: loop.BoundLoop | None = None
    nbd: knbd.NbdDevice | None = None
    vbd: VbdInfo | None = None
    uuid: str | None = None  # dm: removed by uuid, so a re-created namesake is never hit

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "reason": self.reason}


def is_ours(info: VbdInfo) -> bool:
    backend = info.backend or {}
    script = backend.get("script", "")
    return info.owner is not None or os.path.basename(script) == SCRIPT_NAME


def stale_backend_reason(info: VbdInfo) -> str | None:
    if info.backend is None or not is_ours(info):
        return None
    if not info.domain_alive:
        return f"domain {info.location.domid} no longer exists"
    # an engine-served NBD export publishes its owner record alone (kind=nbd)
    published = identity.PHYSICAL_DEVICE in info.backend or identity.OWNER in info.backend
    if info.backend.get("hotplug-status") in ("error", "busy") and not published:
        return f"failed attach: {(info.backend.get('hotplug-error') or 'no error text')[:120]}"
    return None


#: In _claimed's result: the diskseq of a devt whose published identity cannot be verified (no
#: luid/diskseq, or a malformed one): every binding of that number counts as claimed.
ANY_DISKSEQ = 0


def _claimed(vbds: list[VbdInfo]) -> set[tuple[int, int]]:
    """(devt, diskseq) of every device a backend's owner record names, and of every published
    identity (luid or diskseq node, read by the one parser: xenstore/identity.py) even beside an
    unparsable record: anything a backend might still use is never garbage. Where the published
    diskseq is missing or malformed, (devt, ANY_DISKSEQ): the number is claimed whatever is bound."""
    claimed: set[tuple[int, int]] = set()
    for info in vbds:
        backend = info.backend or {}
        text = backend.get(identity.OWNER)
        if text is not None:
            try:
                owner = parse_owner(text)
            except OwnerRecordError:
                owner = None
            if isinstance(owner, OwnerRecord):  # an NBD export (kind=nbd) claims no kernel device
                claimed.add((owner.devt, owner.diskseq))
        published = PublishedIdentity.claimed(backend)
        if published is not None:
            claimed.add((published.devt, ANY_DISKSEQ if published.diskseq is None else published.diskseq))
    return claimed


def orphan_loops(vbds: list[VbdInfo], env: Environment) -> list[Garbage]:
    """`env.gc_scope` (test-only): consider only loop devices whose backing file is below it, so a
    test's gc cannot touch loop devices of another test run sharing the machine (each run has its
    own xenstored, whose backends the others cannot see)."""
    claimed = _claimed(vbds)
    scope = env.gc_scope
    found: list[Garbage] = []
    for bound in loop.bound_loops(tag_prefix=loop.TAG_PREFIX):
        if scope and not bound.backing_file.startswith(scope.rstrip("/") + "/"):
            continue
        if LoopFlags.AUTOCLEAR in bound.status.flags:
            continue
        if (bound.devt, bound.diskseq) in claimed or (bound.devt, ANY_DISKSEQ) in claimed:
            continue
        found.append(
            Garbage(
                "loop",
                f"/dev/loop{bound.number}",
                f"tag {bound.status.tag}, backing {bound.backing_file}: no backend uses it",
                loop=bound,
            )
        )
    return found


def _nbd_orphan_reason(identifier: str, vbds: dict[tuple[int, int], VbdInfo]) -> str | None:
    """Why a kernel NBD device with our identifier prefix and no claim is garbage, or None when it
    must be left alone (its vbd's add may still be between connect and publish, or the identifier
    is not one this package makes)."""
    parts = identifier.removeprefix(loop.TAG_PREFIX).split(":")
    if len(parts) != 2:
        return None
    if parts[0] == "identify":
        pid = uint_or_none(parts[1], maximum=2**22)
        if pid is None or _process_alive(pid):
            return None
        return f"identifier {identifier}: that identify process is gone"
    domid = uint_or_none(parts[0], maximum=DOMID_FIRST_RESERVED - 1)
    devid = uint_or_none(parts[1], maximum=RESERVED - 1)
    if domid is None or devid is None:
        return None
    info = vbds.get((domid, devid))
    if info is None or info.backend is None:
        return f"identifier {identifier}: no backend vbd {domid}/{devid}, never published"
    if not info.domain_alive:
        return f"identifier {identifier}: domain {domid} is gone, never published"
    status = info.backend.get("hotplug-status")
    if status:
        return f"identifier {identifier}: its add ended (hotplug-status {status[:20]}) without publishing it"
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphan_nbd(vbds: list[VbdInfo], sysfs: str = "/sys/block") -> list[Garbage]:
    """Kernel NBD devices of ours that nothing published and nothing is still making (see the
    module text). Without any NBD device this reads one directory and stops."""
    from pathlib import Path

    devices = knbd.devices_named(loop.TAG_PREFIX, Path(sysfs))  # one listdir when there are none
    if not devices:
        return []
    claimed = _claimed(vbds)
    by_vbd = {(v.location.domid, v.location.devid): v for v in vbds}
    found: list[Garbage] = []
    for device in devices:
        if (device.devt, device.diskseq) in claimed or (device.devt, ANY_DISKSEQ) in claimed:
            continue
        reason = _nbd_orphan_reason(device.identifier, by_vbd)
        if reason is not None:
            found.append(Garbage("nbd", device.path, f"{reason}, seq {device.diskseq:x}", nbd=device))
    return found


def orphan_dm() -> tuple[list[Garbage], str | None]:
    """(our unused dm devices, None) or ([], why dm could not be checked)."""
    try:
        ctl = dm.DmControl.open()
    except XenblockError as exc:
        return [], exc.one_line()
    found: list[Garbage] = []
    with ctl:
        for entry in ctl.list_devices():
            try:
                uuid = entry.uuid if entry.uuid is not None else ctl.status(name=entry.name).uuid
                if not uuid.startswith(dm.OWNED_UUID_PREFIX) or dm.creator_alive(uuid):
                    continue
                st = ctl.status(uuid=uuid)
            except XenblockError:
                continue
            if st.open_count == 0 and not st.deferred_remove:
                found.append(Garbage("dm", entry.name, f"uuid {uuid}: not open, creator gone", uuid=uuid))
    return found, None


def stale_backends(vbds: list[VbdInfo]) -> list[Garbage]:
    found: list[Garbage] = []
    for info in vbds:
        reason = stale_backend_reason(info)
        if reason is not None:
            found.append(Garbage("backend", info.location.backend, reason, vbd=info))
    return found


@dataclass(frozen=True)
class Collected:
    garbage: Garbage
    result: str  # "would remove" | "removed" | "refused: ..." | "failed: ..."

    def to_json(self) -> dict[str, str]:
        return {**self.garbage.to_json(), "result": self.result}


def find(store: XenStore | None, home_domid: int, env: Environment) -> tuple[list[Garbage], list[str]]:
    """Everything collectable, and notes on what could not be checked."""
    notes: list[str] = []
    vbds = inventory.scan(store, home_domid=home_domid, env=env) if store is not None else []
    if store is None:
        notes.append("xenstore unreachable: backends not checked, so no loop device counts as orphaned")
    garbage = stale_backends(vbds)
    if store is not None:
        garbage += orphan_loops(vbds, env)
        garbage += orphan_nbd(vbds)
    dms, why = orphan_dm()
    if why is not None:
        notes.append(f"device-mapper not checked: {why}")
    return garbage + dms, notes


def collect(
    store: XenStore | None, *, home_domid: int, env: Environment, dry_run: bool, detach_wait: float = 2.0
) -> tuple[list[Collected], list[str]]:
    from xenblockctl.toolstack import lifecycle

    garbage, notes = find(store, home_domid, env)
    done: list[Collected] = []
    # Backends first: their remove may release loop devices, which then are no longer garbage.
    for item in sorted(garbage, key=lambda g: {"backend": 0, "loop": 1, "nbd": 1, "dm": 2}[g.kind]):
        if dry_run:
            done.append(Collected(item, "would remove"))
            continue
        try:
            if item.kind == "backend":
                assert item.vbd is not None
                assert store is not None
                lifecycle.detach(
                    store, item.vbd.location, wait=detach_wait, force=True, own_domid=home_domid, env=env
                )
            elif item.kind == "loop":
                assert item.loop is not None
                outcome = loop.detach_with_proof(
                    item.loop.devt,
                    diskseq=item.loop.diskseq,
                    tag=item.loop.status.tag,
                    backing=(item.loop.status.backing_dev, item.loop.status.backing_ino),
                )
                done.append(Collected(item, f"removed ({outcome.value})"))
                continue
            elif item.kind == "nbd":
                assert item.nbd is not None
                result = knbd.disconnect_with_proof(item.nbd)
                refused = result == "changed"  # re-used index: not the device we judged
                done.append(Collected(item, f"refused: {result}" if refused else f"removed ({result})"))
                continue
            else:
                with dm.DmControl.open() as ctl:
                    ctl.remove(uuid=item.uuid)
            done.append(Collected(item, "removed"))
        except XenblockError as exc:
            done.append(Collected(item, f"failed: {exc.one_line(160)}"))
    return done, notes
