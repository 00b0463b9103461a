"""Sharing rules: a disk may be given to several domains only if every user is read-only, or
if every other user is a backend serving another domain of the same VM (a migration).

Who uses a disk is decided from identities, never from text: (st_dev, st_ino) of backing files,
major:minor + diskseq of devices, the canonical URI of an NBD export the engine serves. Claims
come from:
  * for a file: the kernel's bound loop devices (any tool's, through LOOP_GET_STATUS64);
  * for a block device: other backends in xenstore that publish its major:minor (our owner record,
    else the public physical-device + luid + mode), mounted filesystems on this host
    (/proc/self/mountinfo), and dm/md holders in sysfs;
  * for an NBD export served by the engine: other backends whose owner record (kind=nbd) names
    the same canonical URI. NBD has no lock of its own (a second writer is the server's policy),
    so this host's second writer is refused here like a block device's.
One pass over each, one xenstore connection, no subprocess.

The same-VM rule (what Xen's own `block` script calls same_vm): during a migration the
destination domain's `add` runs while the paused source still holds the disk writable, and both
domains carry the same `/local/domain/<id>/vm` node (`/vm/<uuid>`: libxl writes it from the
domain's uuid, dom0-owned, read-only for the guest, so a guest cannot forge it). A conflicting
claim is therefore waived when it is a backend's (its directory `backend/<kind>/<domid>/<devid>`
names the frontend domain; a file's loop device is a backend's only if that backend's owner record
or luid names the loop's devt + diskseq, i.e. exactly this binding) and that frontend is *another*
domain with exactly the requester's `vm` value. Unlike Xen's script, nothing
unknown is waived: a missing, unreadable (a driver domain may not read other domains' nodes) or
malformed `vm` node, a holder we cannot name (mounts, dm/md, loops nobody published, the stock
script's loops without a luid) or the requester's own domain (one disk given twice to one
guest is a configuration mistake, never a migration) keeps the refusal, with the reason.

Clones (libxl 4.17 facts, tools/xl/xl_saverestore.c and xl_vmcontrol.c): `xl save` stores the
domain's configuration as retrieved from libxl, uuid included, and `xl restore` without a config
file recreates the domain with that uuid; libxl checks names, never uuids, for uniqueness. So
`xl save -c` (the source keeps running) + `xl rename` of the source + `xl restore` of the image
gives two *running* domains with one `vm` path, and xenstore shows exactly what a migration
shows: the running-or-paused state of the holder is the hypervisor's, which a driver domain
cannot ask and a hotplug script should not. We accept that case like Xen does, because making
it takes the same deliberate steps as a migration (a renamed live source, whose uuid is then
reused on purpose). A clone made the ordinary way gets a fresh uuid and stays refused: a config
file given to `xl save` or `xl restore` is parsed anew, and xl generates a new uuid unless the
file sets `uuid=`. man block-xenblockctl(8), SHARING, says the same for admins."""

from __future__ import annotations

import posix

from xenblockctl.errors import XenblockError
from xenblockctl.kernel import blockdev, loop
from xenblockctl.kernel.loop_abi import LoopFlags
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreError
from xenblockctl.xenstore.identity import (
    NbdOwnerRecord,
    OwnerRecord,
    OwnerRecordError,
    PublishedIdentity,
)
from xenblockctl.xenstore.numbers import HEX_DIGITS, uint_or_none
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import DOMID_FIRST_RESERVED, BackendPath, VbdPathError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from xenblockctl.xenstore.backends import BackendEntry

#: Set in a warm server's worker only (blockscript/warm.py, sharetable.worker_query): the backends
#: publishing a devt, from the server's sharing table brought up to date after the per-target lock
#: was taken, or None when the table cannot answer (then the walk runs, as everywhere else).
TABLE: Callable[[XenStore, str, str, int], list[BackendEntry] | None] | None = None


class SharingConflict(XenblockError):
    """Written as hotplug-status=busy: the disk is in use in a way that forbids this attach."""

    code = "busy"


class Claim(NamedTuple):
    """Someone uses a file or device. `diskseq` None = unknown (stock script, mounts).
    `frontend` is the domain a backend serves the device to (from the backend's directory
    name); None for users that are not backends (loops, mounts)."""

    where: str
    writable: bool
    file_id: tuple[int, int] | None = None
    devt: int | None = None
    diskseq: int | None = None
    frontend: int | None = None
    nbd_uri: str | None = None  # an engine-served NBD export (canonical URI)


class Wanted(NamedTuple):
    """What the attach in progress is about to use."""

    writable: bool
    file_id: tuple[int, int] | None = None
    devt: int | None = None
    diskseq: int | None = None
    nbd_uri: str | None = None  # an NBD export for the engine (canonical URI)


def conflicts(wanted: Wanted, claim: Claim) -> bool:
    if not (wanted.writable or claim.writable):
        return False  # read-only with read-only is fine
    if wanted.nbd_uri is not None and claim.nbd_uri == wanted.nbd_uri:
        return True
    if wanted.file_id is not None and claim.file_id == wanted.file_id:
        return True
    if wanted.devt is not None and claim.devt == wanted.devt:
        # A claim for another diskseq names an older binding of this number: not our disk.
        return claim.diskseq is None or wanted.diskseq is None or claim.diskseq == wanted.diskseq
    return False


def check(store: XenStore, home: str, own_backend: str, wanted: Wanted) -> None:
    """Raise SharingConflict naming the first user that forbids this attach."""
    same_vm = _SameVm(store, home, own_backend)
    for claim in _all_claims(store, home, own_backend, wanted):
        if conflicts(wanted, claim) and _live(claim):
            why_not = same_vm.refusal(claim)
            if why_not is None:
                continue  # another domain of the same VM: a migration's source
            mode = "writable" if claim.writable else "read-only"
            want = "writable" if wanted.writable else "read-only"
            raise SharingConflict(
                f"target already in use {mode} by {claim.where}; refusing {want} attach ({why_not})"
            )
    if wanted.writable and wanted.devt is not None:
        from xenblockctl.kernel import sysfs  # block devices only: pathlib stays off a file add

        stacked = sysfs.holders(posix.major(wanted.devt), posix.minor(wanted.devt))
        if stacked:
            raise SharingConflict(
                f"device is held by {_describe_holders(wanted.devt, stacked)}; refusing writable attach"
            )


def _describe_holders(devt: int, stacked: list[str]) -> str:
    """Name dm holders as the admin knows them (`dmsetup ls`), others by kernel name. A disk under
    a dm table must not be written behind the table's back (a snapshot origin least of all)."""
    from xenblockctl.kernel import dm  # only here: a refusal is rare, the import is not free

    names = dm.dm_holders(posix.major(devt), posix.minor(devt))
    described = [f"dm device {name!r}" for name in names]
    if len(names) < len(stacked):
        described.append(f"{', '.join(stacked)} (kernel names)")
    return " and ".join(described) if names else f"{', '.join(stacked)} (dm/md on top)"


#: libxl writes `/vm/` + libxl__uuid2string (lowercase 8-4-4-4-12 hex); anything else is not a
#: vm path libxl made, so it proves nothing.
def _is_vm_path(text: str) -> bool:
    """`/vm/<uuid>` as libxl writes it: lowercase 8-4-4-4-12 hex (string checks: no `re` at start-up)."""
    groups = text[4:].split("-")
    return (
        text.startswith("/vm/")
        and [len(g) for g in groups] == [8, 4, 4, 4, 12]
        and all(HEX_DIGITS.issuperset(g) for g in groups)
    )


class _SameVm:
    """Decides whether a conflicting claim is waived by the same-VM rule (module docstring).
    Reads nothing until a conflict is found: an attach without conflicts pays no round trip."""

    def __init__(self, store: XenStore, home: str, own_backend: str) -> None:
        self._store = store
        self._home = home
        self._own_backend = own_backend
        self._vms: dict[int, str | None] = {}
        self._why: dict[int, str] = {}

    def refusal(self, claim: Claim) -> str | None:
        """None when `claim` is held for another domain of the requester's VM, else why not."""
        try:
            requester = BackendPath.parse(self._own_backend).domid
        except VbdPathError:
            return "the requesting backend's path names no frontend domain"
        holder = claim.frontend if claim.frontend is not None else self._publisher(claim)
        if holder is None:
            return "not a backend of another domain of the same VM"
        if holder == requester:
            return f"domain {requester} already has it: one disk twice in one domain is never a migration"
        mine, theirs = self._vm(requester), self._vm(holder)
        if mine is None:
            return f"same VM unproven: {self._why[requester]}"
        if theirs is None:
            return f"same VM unproven: {self._why[holder]}"
        if mine != theirs:
            return f"domain {holder} is VM {theirs}, domain {requester} is VM {mine}"
        return None

    def _publisher(self, claim: Claim) -> int | None:
        """The frontend domain of the backend that published exactly this device binding (devt
        and diskseq: a backend naming an older binding of the number is someone else)."""
        if claim.devt is None or claim.diskseq is None:
            return None
        for published in backend_claims(self._store, self._home, self._own_backend, devt=claim.devt):
            if published.diskseq == claim.diskseq and published.devt == claim.devt:
                return published.frontend
        return None

    def _vm(self, domid: int) -> str | None:
        """The domain's `vm` node if it is a vm path libxl made; else None, and why in _why."""
        if domid in self._vms:
            return self._vms[domid]
        node = f"/local/domain/{domid}/vm"
        try:
            text = self._store.read_optional(node)
        except XenstoreError as exc:  # EACCES in a driver domain, among others
            text, self._why[domid] = None, f"{node} unreadable: {exc.one_line()}"
        else:
            if text is None:
                self._why[domid] = f"{node} is missing"
            elif not _is_vm_path(text):
                self._why[domid] = f"{node} is not a /vm/<uuid> path: {text[:60]!r}"
                text = None
        self._vms[domid] = text
        return text


def _live(claim: Claim) -> bool:
    """A backend's claim whose device is gone, empty or replaced (the engine let go and the loop
    auto-cleared) gives nobody access to the disk any more, so it does not count. Claims without
    a known diskseq (stock script, mounts), or whose device the kernel cannot be asked about,
    cannot be proven stale and count (identity.Liveness.holds)."""
    if claim.devt is None or claim.diskseq is None:
        return True
    return identity.liveness_of(claim.devt, claim.diskseq, blockdev.observe).holds


def _all_claims(store: XenStore, home: str, own_backend: str, wanted: Wanted) -> Iterator[Claim]:
    if wanted.file_id is not None:
        # Every live user of a file reaches it through a bound loop device, whoever set that up
        # (our backends, the stock script, losetup, a snapshot's base), so the kernel's list is
        # complete and costs no xenstore round trip; a backend whose loop is gone gives nobody
        # access any more. Cost: O(bound loops), independent of the number of backends. Only
        # loops backed by this file can conflict (conflicts(): a loop's claim matches a file by
        # file_id, or by devt when the wanted names one), so the scan tells the others apart by
        # their backing inode alone.
        yield from loop_claims(wanted.file_id if wanted.devt is None else None)
    if wanted.devt is not None:
        yield from backend_claims(store, home, own_backend, devt=wanted.devt)
        yield from mount_claims()
    if wanted.nbd_uri is not None:
        # Only backends can use an export through us; one owner record read per backend.
        yield from backend_claims(store, home, own_backend)


def backend_claims(
    store: XenStore, home: str, own_backend: str, *, devt: int | None = None
) -> Iterator[Claim]:
    """Claims of every other vbd/vbd3 backend this domain serves; with `devt`, only of those whose
    `physical-device` names it. Whoever wrote a backend (we, Xen's stock script, another tool),
    its physical-device is read: the listings and those reads are streamed (backends.read_in_backends),
    so a dom0 with 128 backends pays the daemon's cost of ~2 requests per backend and no wait
    between the levels of the walk (bench/README.md, issue 18); the full record only for the
    matches. Without `devt` (an NBD export's check) every backend's owner record is streamed
    instead of its physical-device: one round trip per backend before (issue 18 round 6)."""
    if devt is None:
        from xenblockctl.xenstore.backends import read_in_backends  # the walk: only here

        found = read_in_backends(store, home, identity.OWNER, skip=own_backend)
        entries = [entry for entry, _owner in found]
        owners = [owner for _entry, owner in found]
    else:
        tabled = TABLE(store, home, own_backend, devt) if TABLE is not None else None
        if tabled is None:
            tabled = identity.backends_publishing(store, home, devt, skip=own_backend)
        entries = tabled
        owners = store.read_many([join(entry.path, identity.OWNER) for entry in entries])
    for entry, claims in zip(entries, _backend_claims(store, entries, owners), strict=True):
        frontend = uint_or_none(entry.domid, maximum=DOMID_FIRST_RESERVED - 1)
        for claim in claims:
            yield claim._replace(frontend=frontend)


def _backend_claims(
    store: XenStore, entries: list[BackendEntry], owner_texts: list[str | None]
) -> list[list[Claim]]:
    """Each backend's claims: from its owner record (ours) if it has a valid one, else from its
    public nodes, which are read for all such backends in one batch."""
    owners: list[OwnerRecord | NbdOwnerRecord | None] = []
    for text in owner_texts:
        try:
            owners.append(None if text is None else identity.parse_owner(text))
        except OwnerRecordError:
            owners.append(None)
    public = [entry.path for entry, owner in zip(entries, owners, strict=True) if owner is None]
    values = iter(store.read_many([join(be, name) for be in public for name in _PUBLIC_NODES]))
    claims: list[list[Claim]] = []
    for entry, owner in zip(entries, owners, strict=True):
        if isinstance(owner, NbdOwnerRecord):
            claims.append([Claim(entry.path, owner.mode == "w", nbd_uri=owner.uri)])
        elif owner is not None:
            claims.append(list(_owner_claims(entry.path, owner)))
        else:
            claim = _public_claim(entry.path, [next(values) for _name in _PUBLIC_NODES])
            claims.append([] if claim is None else [claim])
    return claims


def _owner_claims(be: str, owner: OwnerRecord) -> Iterator[Claim]:
    if owner.kind == "dm":
        # A volatile disk reads its base and never writes it: read-only on the base, `mode` on the
        # dm device itself. Both live exactly as long as the dm device (its devt + diskseq).
        yield Claim(be, owner.mode == "w", devt=owner.devt, diskseq=owner.diskseq)
        if owner.backing is not None:
            yield Claim(be, False, file_id=owner.backing, devt=owner.devt, diskseq=owner.diskseq)
        return
    yield Claim(
        where=be,
        writable=owner.mode == "w",
        file_id=owner.backing,
        devt=owner.devt,
        diskseq=owner.diskseq,
    )


#: What a backend without our owner record publishes (Xen's stock script: physical-device only).
_PUBLIC_NODES = (*identity.IDENTITY_NODES, "mode")


def _public_claim(be: str, texts: list[str | None]) -> Claim | None:
    values = dict(zip(_PUBLIC_NODES, texts, strict=True))
    mode = values["mode"] or "w"  # unknown mode: assume the worst
    published = PublishedIdentity.claimed(values)
    if published is None:
        return None
    return Claim(where=be, writable="w" in mode, devt=published.devt, diskseq=published.diskseq)


def loop_claims(file_id: tuple[int, int] | None = None) -> Iterator[Claim]:
    """Every bound loop device on the host, whoever made it (tag filter off); with `file_id`,
    only those backed by that file (st_dev, st_ino)."""
    bound_loops = (
        loop.bound_loops(tag_prefix=None) if file_id is None else loop.bound_loops_backed_by(file_id)
    )
    for bound in bound_loops:
        yield Claim(
            where=f"/dev/loop{bound.number} ({bound.status.tag or 'untagged'})",
            writable=LoopFlags.READ_ONLY not in bound.status.flags,
            file_id=(bound.status.backing_dev, bound.status.backing_ino),
            devt=bound.devt,
            diskseq=bound.diskseq,
        )


def mount_claims(mountinfo: str = "/proc/self/mountinfo") -> Iterator[Claim]:
    """Block devices mounted on this host. Field 3 is major:minor (decimal), field 6 the options."""
    try:
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        major_text, _, minor_text = fields[2].partition(":")
        major = uint_or_none(major_text, maximum=0xFFFFFFFF)
        if not major or uint_or_none(minor_text, maximum=0xFFFFFFFF) is None:
            continue  # major 0: virtual filesystems
        options = fields[5].split(",")
        yield Claim(
            where=f"mount {fields[4]}",
            writable="rw" in options,
            devt=posix.makedev(int(major_text), int(minor_text)),
        )
