"""Every vbd this domain serves (plus frontends whose backend is gone), with what is true *now*:
states, the published identity and whether the live device still carries it, who holds it.

"Whether the live device still matches the luid" is the question no other tool answers: a
`physical-device` of `7:3` says nothing once loop3 has been detached and re-used; the diskseq of
whatever is at 7:3 now, compared with `physical-device-luid`, does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xenblockctl.blockscript import handoff
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.kernel import blockdev, sysfs
from xenblockctl.toolstack import domains
from xenblockctl.toolstack.vbd_dirs import VbdLocation
from xenblockctl.xenstore import identity as published_identity
from xenblockctl.xenstore.backends import walk_backends
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreNoEntry
from xenblockctl.xenstore.identity import (
    AnyOwnerRecord,
    IdentityError,
    Liveness,
    NbdOwnerRecord,
    OwnerRecordError,
    PublishedIdentity,
    parse_owner,
)
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.vbd import (
    BACKEND_KINDS,
    ERROR_RESPONSES_NODE,
    BackendPath,
    BackendRecordError,
    XenbusState,
    parse_error_responses,
)
from xenblockctl.xenstore.vdev import VdevError, vdev_name

#: identity values (documented in xenblockctl(1), JSON OUTPUT)
IDENTITY_NONE = "none"  # nothing published
IDENTITY_UNVERIFIED = "unverified"  # physical-device without a luid (stock script)
IDENTITY_MATCH = "match"
IDENTITY_MISMATCH = "mismatch"  # the number now names another device: the guest may see the wrong disk
IDENTITY_GONE = "gone"  # no device at that number any more
IDENTITY_UNKNOWN = "unknown"  # could not look (not root), or physical-device is malformed
#: an NBD export the engine serves (owner record kind=nbd): no device to look at; the engine
#: compared its own handshake with the record before `opened`=1
IDENTITY_EXPORT = "export"
#: identity.Liveness -> the word above. EMPTY reads "gone": the published device is gone either way
#: (the number names nothing, or an empty loop device / drive); `live_diskseq` tells them apart.
_IDENTITY_WORD = {
    Liveness.LIVE: IDENTITY_MATCH,
    Liveness.REPLACED: IDENTITY_MISMATCH,
    Liveness.GONE: IDENTITY_GONE,
    Liveness.EMPTY: IDENTITY_GONE,
    Liveness.UNVERIFIED: IDENTITY_UNVERIFIED,
}


@dataclass(frozen=True)
class VbdInfo:
    location: VbdLocation
    backend: dict[str, str] | None  # None: backend directory missing
    frontend: dict[str, str] | None
    domain_alive: bool
    backend_error: str | None
    live_diskseq: int | None
    identity: str
    owner: AnyOwnerRecord | None
    owner_error: str | None
    holder: str | None  # "engine" | "kernel-blkback" | None
    device_path: str | None
    dm_name: str | None

    # -- derived ---------------------------------------------------------------------------------
    def _node(self, name: str) -> str | None:
        return None if self.backend is None else self.backend.get(name)

    @property
    def vdev(self) -> str | None:
        try:
            return vdev_name(self.location.devid)
        except VdevError:
            return self._node("dev")

    @staticmethod
    def _state(nodes: dict[str, str] | None) -> int | None:
        text = None if nodes is None else nodes.get("state")
        if text is None:
            return None
        try:
            return int(XenbusState.parse(text))
        except BackendRecordError:
            return None

    @property
    def backend_state(self) -> int | None:
        return self._state(self.backend)

    @property
    def frontend_state(self) -> int | None:
        return self._state(self.frontend)

    @property
    def published(self) -> PublishedIdentity | None:
        """The published identity (None: nothing published, or malformed)."""
        try:
            return PublishedIdentity.from_nodes(self.backend or {})
        except IdentityError:
            return None

    @property
    def physical_device(self) -> tuple[int, int] | None:
        try:
            return published_identity.parse_physical_device(
                self._node(published_identity.PHYSICAL_DEVICE) or ""
            )
        except IdentityError:
            return None

    @property
    def health(self) -> str:
        """One word for tables and scripts (documented in xenblockctl(1))."""
        if self.backend is None:
            return "orphan-frontend"
        if not self.domain_alive:
            return "stale"
        if self.backend_error or self._node("hotplug-status") in ("error", "busy"):
            return "failed"
        if self._node("online") == "0" or self.backend_state in (5, 6):
            return "closing"
        if self.identity in (IDENTITY_MISMATCH, IDENTITY_GONE):
            return "broken"
        if self.backend_state == 4:
            return "connected"
        return "pending"

    @property
    def error_responses(self) -> dict[str, int] | None:
        """The bundled engine's error responses to this guest by cause, with their total (None:
        not served by the engine, or nothing published yet)."""
        counts = parse_error_responses(self._node(ERROR_RESPONSES_NODE))
        return None if counts is None else {"total": sum(counts.values()), **counts}

    def to_json(self) -> dict[str, Any]:
        loc = self.location
        phys = self.physical_device
        luid = self._node(published_identity.LUID)
        published = self.published
        luid_value = None if published is None else published.diskseq
        owner: dict[str, Any] | None = None
        if isinstance(self.owner, NbdOwnerRecord):
            n = self.owner
            owner = {
                "kind": n.kind,
                "mode": n.mode,
                "uri": n.uri,
                "size": n.size,
                "flags": n.flags,
                "socket_dev": None if n.socket is None else n.socket[0],
                "socket_ino": None if n.socket is None else n.socket[1],
                "socket_ctime_ns": None if n.socket is None else n.socket[2],
            }
        elif self.owner is not None:
            o = self.owner
            owner = {
                "kind": o.kind,
                "mode": o.mode,
                "autoclear": o.autoclear,
                "tag": o.tag,
                "major": o.major,
                "minor": o.minor,
                "diskseq": o.diskseq,
            }
        be_state, fe_state = self.backend_state, self.frontend_state
        return {
            **loc.to_json(self.vdev),
            "domain_alive": self.domain_alive,
            "backend_state": be_state,
            "backend_state_name": None if be_state is None else XenbusState(be_state).name,
            "frontend_state": fe_state,
            "frontend_state_name": None if fe_state is None else XenbusState(fe_state).name,
            "online": None if self._node("online") is None else self._node("online") != "0",
            "mode": self._node("mode"),
            "type": self._node("type"),
            "params": self._node("params"),
            "script": self._node("script"),
            "physical_device": self._node(published_identity.PHYSICAL_DEVICE),
            "major": None if phys is None else phys[0],
            "minor": None if phys is None else phys[1],
            "device_path": self.device_path,
            "dm_name": self.dm_name,
            "luid": luid,
            "diskseq": luid_value,
            "live_diskseq": self.live_diskseq,
            "identity": self.identity,
            "owner": owner,
            "owner_error": self.owner_error,
            "holder": self.holder,
            "hotplug_status": self._node("hotplug-status"),
            "hotplug_error": self._node("hotplug-error"),
            "backend_error": self.backend_error,
            "error_responses": self.error_responses,
            "health": self.health,
        }


def _read_dir(store: XenStore, path: str) -> dict[str, str] | None:
    try:
        return store.read_dir(path)
    except XenstoreNoEntry:
        return None


def inspect(store: XenStore, loc: VbdLocation, *, env: Environment, alive: set[int] | None = None) -> VbdInfo:
    backend = _read_dir(store, loc.backend)
    frontend = _read_dir(store, loc.frontend)
    domain_alive = (loc.domid in alive) if alive is not None else domains.exists(store, loc.domid)
    backend_error = store.read_optional(loc.error_node)
    owner: AnyOwnerRecord | None = None
    owner_error: str | None = None
    owner_text = None if backend is None else backend.get(published_identity.OWNER)
    if owner_text is not None:
        try:
            owner = parse_owner(owner_text)
        except OwnerRecordError as exc:
            owner_error = exc.one_line()
    identity = IDENTITY_NONE
    live: int | None = None
    device_path: str | None = None
    dm_name: str | None = None
    physical = None if backend is None else backend.get(published_identity.PHYSICAL_DEVICE)
    if physical is not None and backend is not None:
        contradictory = False
        try:
            published = PublishedIdentity.from_nodes(backend)
        except IdentityError:
            # A malformed luid/diskseq (or the two disagreeing) beside a valid physical-device: the
            # published identity does not hold whatever is there. A malformed physical-device names
            # nothing to look at.
            contradictory = True
            published = PublishedIdentity.named(backend)
        if published is None:
            identity = IDENTITY_UNKNOWN
        else:
            try:
                now = blockdev.observe(published.devt)
            except XenblockError:
                identity = IDENTITY_UNKNOWN  # e.g. no permission to make a private node
            else:
                live = None if now is None else now.diskseq
                identity = _IDENTITY_WORD[published_identity.judge(published.diskseq, now)]
                if contradictory and now is not None:
                    identity = IDENTITY_MISMATCH
                if now is not None:
                    name = sysfs.kernel_name(published.major, published.minor)
                    device_path = f"/dev/{name}" if name else None
                    dm_name = sysfs.dm_name(published.major, published.minor)
            if device_path is None:
                device_path = backend.get(published_identity.DEVICE_PATH)
    if isinstance(owner, NbdOwnerRecord) and physical is None:
        identity = IDENTITY_EXPORT
    holder: str | None = None
    if backend is not None:
        if backend.get("opened") == "1":
            holder = "engine"
        elif (
            physical is not None
            and handoff.blkback_device(
                BackendPath(loc.kind, loc.domid, loc.devid, loc.backend_domid), env.xen_backend_bus
            )
            == physical
        ):
            holder = "kernel-blkback"
    return VbdInfo(
        location=loc,
        backend=backend,
        frontend=frontend,
        domain_alive=domain_alive,
        backend_error=backend_error,
        live_diskseq=live,
        identity=identity,
        owner=owner,
        owner_error=owner_error,
        holder=holder,
        device_path=device_path,
        dm_name=dm_name,
    )


def _ls(store: XenStore, path: str) -> list[str]:
    try:
        return store.ls(path)
    except XenstoreNoEntry:
        return []


def _num(text: str) -> int | None:
    return uint_or_none(text, maximum=(1 << 64) - 1)


def locations(store: XenStore, *, home_domid: int, domid: int | None = None) -> list[VbdLocation]:
    """Backends in our home (every kind) plus frontends pointing at a backend of ours that is gone."""
    found: dict[tuple[int, int], VbdLocation] = {}
    home = f"/local/domain/{home_domid}"
    for entry in walk_backends(store, home):
        dom, dev = _num(entry.domid), _num(entry.devid)
        if dom is None or dev is None or (domid is not None and dom != domid):
            continue
        found.setdefault((dom, dev), VbdLocation(dom, dev, entry.kind, home_domid))
    candidates = [domid] if domid is not None else sorted(domains.live_domids(store))
    for dom in candidates:
        for dev_text in _ls(store, f"/local/domain/{dom}/device/vbd"):
            dev = _num(dev_text)
            if dev is None or (dom, dev) in found:
                continue
            backend = store.read_optional(f"/local/domain/{dom}/device/vbd/{dev}/backend") or ""
            if backend.startswith(f"{home}/backend/"):
                kind = backend.split("/")[5] if backend.count("/") >= 5 else "vbd"
                found[(dom, dev)] = VbdLocation(
                    dom, dev, kind if kind in BACKEND_KINDS else "vbd", home_domid
                )
    return [found[key] for key in sorted(found)]


def scan(store: XenStore, *, home_domid: int, env: Environment, domid: int | None = None) -> list[VbdInfo]:
    alive = domains.live_domids(store)
    found = locations(store, home_domid=home_domid, domid=domid)
    return [inspect(store, loc, env=env, alive=alive) for loc in found]
