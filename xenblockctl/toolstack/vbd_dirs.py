"""The vbd directories libxl writes for a disk, in one transaction (xen-block-protocol.md §1.2):

    /local/domain/<bedom>/backend/<kind>/<domid>/<devid>   owner bedom, readable by domid
    /local/domain/<domid>/device/vbd/<devid>               owner domid, readable by bedom
    /libxl/<domid>/device/vbd/<devid>                      dom0 only: libxl's copy, so teardown
                                                           need not trust the backend's nodes

and their removal. `auto` vdev selection happens inside the same transaction, so two attaches
racing for "the first free vdev" cannot both get it (the loser's commit conflicts and retries)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.perms import Access, Perm
from xenblockctl.xenstore.vbd import BACKEND_KINDS
from xenblockctl.xenstore.vdev import Vdev

#: `auto` tries xvda..xvdp, then extended-form disks up to this many.
AUTO_MAX_DISKS = 256


class VdevInUse(XenblockError):
    code = "vdev-in-use"
    hint = "pick another --vdev, or use --vdev auto"


@dataclass(frozen=True)
class VbdLocation:
    """Where one vbd's directories live."""

    domid: int
    devid: int
    kind: str = "vbd"
    backend_domid: int = 0

    @property
    def backend(self) -> str:
        return f"/local/domain/{self.backend_domid}/backend/{self.kind}/{self.domid}/{self.devid}"

    @property
    def relative(self) -> str:
        return f"backend/{self.kind}/{self.domid}/{self.devid}"

    @property
    def frontend(self) -> str:
        return f"/local/domain/{self.domid}/device/vbd/{self.devid}"

    @property
    def libxl(self) -> str:
        return f"/libxl/{self.domid}/device/vbd/{self.devid}"

    @property
    def error_node(self) -> str:
        """Where xenbus_dev_fatal() (blkback) and our engine report a backend failure."""
        return f"/local/domain/{self.backend_domid}/error/{self.relative}/error"

    def to_json(self, vdev: str | None) -> dict[str, Any]:
        """The keys every JSON record of one vbd (list, show, attach) starts with: where it is.
        `vdev` is the caller's name for devid (a spec's, or whatever names a devid no scheme does)."""
        return {
            "domid": self.domid,
            "devid": self.devid,
            "vdev": vdev,
            "kind": self.kind,
            "backend_domid": self.backend_domid,
            "backend_path": self.backend,
            "frontend_path": self.frontend,
        }


@dataclass(frozen=True)
class DiskSpec:
    domid: int
    vdev: Vdev
    params: str
    mode: str  # "r" | "w"
    kind: str = "vbd"
    backend_domid: int = 0
    script: str = ""
    device_type: str = "disk"
    discard: bool = True
    trusted: bool = True

    @property
    def location(self) -> VbdLocation:
        return VbdLocation(self.domid, self.vdev.number, self.kind, self.backend_domid)

    def backend_nodes(self) -> dict[str, str]:
        loc = self.location
        nodes = {
            "frontend": loc.frontend,
            "frontend-id": str(self.domid),
            "params": self.params,
            "online": "1",
            "removable": "0",
            "bootable": "1",
            "state": "1",
            "dev": self.vdev.name,
            # libxl__device_disk_string_of_backend: PHY -> "phy", TAP -> "vbd3"
            "type": "phy" if self.kind == "vbd" else "vbd3",
            "mode": self.mode,
            "device-type": self.device_type,
            "discard-enable": "1" if self.discard else "0",
            "specification": "xen",
        }
        if self.script:
            nodes["script"] = self.script
        return nodes

    def frontend_nodes(self) -> dict[str, str]:
        return {
            "backend": self.location.backend,
            "backend-id": str(self.backend_domid),
            "state": "1",
            "virtual-device": str(self.vdev.number),
            "device-type": self.device_type,
            "trusted": "1" if self.trusted else "0",
        }


def used_devids(tx: Transaction, domid: int, backend_domid: int) -> set[int]:
    """devids of `domid` taken by a frontend, a backend of any kind in `backend_domid`, or libxl's
    copy (a half-removed device still blocks its number, as in libxl)."""
    parents = [
        f"/local/domain/{domid}/device/vbd",
        f"/libxl/{domid}/device/vbd",
        *(f"/local/domain/{backend_domid}/backend/{kind}/{domid}" for kind in BACKEND_KINDS),
    ]
    used: set[int] = set()
    for parent in parents:
        if tx.read_optional(parent) is None:
            continue
        used.update(n for name in tx.ls(parent) if (n := uint_or_none(name, maximum=0xFFFFFFFF)) is not None)
    return used


def _auto_candidates() -> list[Vdev]:
    return [Vdev("xvd", disk) for disk in range(AUTO_MAX_DISKS)]


def frontend_perms(spec: DiskSpec) -> list[Perm]:
    """libxl's `frontend_perms`: the guest owns its device directory, the backend domain reads."""
    return [Perm(Access.NONE, spec.domid), Perm(Access.READ, spec.backend_domid)]


def backend_perms(spec: DiskSpec) -> list[Perm]:
    """libxl's `backend_perms`: the backend domain owns its directory, the guest reads."""
    return [Perm(Access.NONE, spec.backend_domid), Perm(Access.READ, spec.domid)]


def write_vbd(store: XenStore, spec: DiskSpec, *, auto: bool = False) -> DiskSpec:
    """Create both directories (and libxl's copy) with libxl's permissions in one transaction.
    With `auto`, `spec.vdev` is replaced by the first free xvd device. Returns the spec written.

    The order is libxl__device_generic_add's, and it matters: a node created by dom0 takes its
    parent's permissions at creation, and a later set-perms on the directory does not reach the
    nodes already below it. So each directory is made and given its permissions *before* any
    node goes in: the backend nodes then inherit (n<bedom>,r<domid>) and the driver domain can
    write its `state`; the frontend nodes get (n<domid>,r<bedom>) explicitly, node by node, as
    libxl does, so the guest can write its `state`. (Written the other way round, every node kept
    the parent's (n0,r<domid>) and no guest ever connected.)"""

    def body(tx: Transaction) -> DiskSpec:
        used = used_devids(tx, spec.domid, spec.backend_domid)
        chosen = spec
        if auto:
            free = next((v for v in _auto_candidates() if v.number not in used), None)
            if free is None:
                raise VdevInUse(
                    f"domain {spec.domid} has no free xvd device among the first {AUTO_MAX_DISKS}"
                )
            chosen = replace(spec, vdev=free)
        elif spec.location.devid in used:
            raise VdevInUse(f"{spec.vdev.name} ({spec.vdev.number}) of domain {spec.domid} is already in use")
        loc = chosen.location
        fperms, bperms = frontend_perms(chosen), backend_perms(chosen)
        backend, frontend = chosen.backend_nodes(), chosen.frontend_nodes()
        frontend_link = backend.pop("frontend", loc.frontend)
        # libxl's copy: under /libxl/<domid>, dom0's alone (the nodes inherit that).
        tx.write(join(loc.libxl, "frontend"), loc.frontend)
        tx.write(join(loc.libxl, "backend"), loc.backend)
        # Frontend: directory, its permissions, `backend` (inherits them), then every other node
        # with the same list set explicitly (libxl__xs_writev_perms).
        tx.mkdir(loc.frontend)
        tx.set_perms(loc.frontend, fperms)
        tx.write(join(loc.frontend, "backend"), frontend.pop("backend", loc.backend))
        for name, value in frontend.items():
            tx.write(join(loc.frontend, name), value)
            tx.set_perms(join(loc.frontend, name), fperms)
        # Backend: directory, its permissions, `frontend`, then the rest (all inherit them).
        tx.mkdir(loc.backend)
        tx.set_perms(loc.backend, bperms)
        tx.write(join(loc.backend, "frontend"), frontend_link)
        for name, value in backend.items():
            tx.write(join(loc.backend, name), value)
        for name, value in backend.items():
            tx.write(join(loc.libxl, name), value)
        return chosen

    return store.run_transaction(body)


def delete_vbd(store: XenStore, loc: VbdLocation) -> None:
    """Remove frontend, libxl copy, backend and the backend's error node, in one transaction
    (libxl__device_destroy). Missing pieces are fine: this is also the cleanup of half-made vbds."""

    def body(tx: Transaction) -> None:
        for path in (loc.frontend, loc.libxl, loc.backend, loc.error_node.rsplit("/", 1)[0]):
            tx.rm(path, missing_ok=True)
            _remove_empty_parents(tx, path)

    store.run_transaction(body)


def _remove_empty_parents(tx: Transaction, path: str) -> None:
    """libxl__xs_path_cleanup: empty parents go too (`backend/vbd/<domid>` once its last disk is
    gone), but never `/local/domain/<n>/<backend|device|error>` or `/libxl/<domid>`."""
    floor = 2 if path.startswith("/libxl/") else 4
    parent = path.rsplit("/", 1)[0]
    while parent.count("/") > floor:
        value = tx.read_optional(parent)
        if value is not None:
            if value != "" or tx.ls(parent):
                return
            tx.rm(parent, missing_ok=True)
        parent = parent.rsplit("/", 1)[0]


def locate(store: XenStore, domid: int, devid: int, *, home_domid: int) -> VbdLocation | None:
    """Find a vbd: the frontend's `backend` node, else libxl's copy, else our own backend dirs."""
    for parent in (f"/local/domain/{domid}/device/vbd/{devid}", f"/libxl/{domid}/device/vbd/{devid}"):
        backend = store.read_optional(join(parent, "backend"))
        loc = _parse_backend(backend, domid, devid) if backend else None
        if loc is not None:
            return loc
    for kind in BACKEND_KINDS:
        loc = VbdLocation(domid, devid, kind, home_domid)
        if store.read_optional(loc.backend) is not None:
            return loc
    if store.read_optional(f"/local/domain/{domid}/device/vbd/{devid}") is not None:
        return VbdLocation(domid, devid, "vbd", home_domid)  # frontend only: cleanup still possible
    return None


def _parse_backend(path: str, domid: int, devid: int) -> VbdLocation | None:
    parts = path.split("/")
    # ['', 'local', 'domain', bedom, 'backend', kind, domid, devid]
    if len(parts) != 8 or parts[1:3] != ["local", "domain"] or parts[4] != "backend":
        return None
    bedom, kind = uint_or_none(parts[3], maximum=0xFFFF), parts[5]
    if bedom is None or kind not in BACKEND_KINDS or parts[6:] != [str(domid), str(devid)]:
        return None
    return VbdLocation(domid, devid, kind, bedom)
