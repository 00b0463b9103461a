"""The udev hook's `block` events (SUBSYSTEM=block, change/remove; hotplug/60-xenblockctl.rules).

When the device behind an attached vbd goes away or changes media (its diskseq moves on), record
that on the backend (`hotplug-error`) and in the journal, so `list`/`doctor` show the vbd as broken
instead of it silently naming a re-used major:minor. Closing backends are skipped: their device
going away is the detach itself. Imported by udev.main for these events only (a backend event does
not need the identity rules or the backend walk); the same start-up rules (udev.py)."""

from __future__ import annotations

import posix

from xenblockctl.errors import XenblockError
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.identity import IdentityError, Liveness, PublishedIdentity
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import XenbusState

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping

    from xenblockctl.journal import Journal
    from xenblockctl.xenstore.client import XenStore


class DeviceReplaced(XenblockError):
    """Written to `hotplug-error` of a backend whose device went away or changed under it."""

    code = "device-replaced"


def block_event(env: Mapping[str, str], journal: Journal) -> int:
    action = env.get("ACTION", "")
    if action not in ("change", "remove"):
        return 0
    # the kernel's dev_t: 12 bits of major, 20 of minor (MINORBITS); a larger number names no device
    major_text, minor_text = env.get("MAJOR", ""), env.get("MINOR", "")
    major = uint_or_none(major_text, maximum=(1 << 12) - 1)
    minor = uint_or_none(minor_text, maximum=(1 << 20) - 1)
    if major is None or minor is None:
        journal.warning(
            f"block {action}: MAJOR {major_text[:20]!r} MINOR {minor_text[:20]!r} name no device; ignored"
        )
        return 0
    now = None if action == "remove" else _device_now(major, minor, env.get("DISKSEQ", ""))
    from xenblockctl.xenstore.client import XenStore

    try:
        store = XenStore.connect(timeout=5.0, env=env, synchronous=True)
    except XenblockError:
        return 0  # no xenstored: no vbds to break
    with store:
        for entry in identity.backends_publishing(store, store.home(), posix.makedev(major, minor)):
            _check_backend(store, entry.path, major, minor, now=now, journal=journal)
    return 0


class _DeviceNow(NamedTuple):
    diskseq: int
    size_bytes: int


def _device_now(major: int, minor: int, event_diskseq: str) -> _DeviceNow | None:
    """What is at major:minor when the hook runs (None: nothing), for identity.judge().

    The event's DISKSEQ is not trusted alone: a loop detach announces its change *before* the
    kernel bumps the diskseq (observed on 6.18: the event carries the old value, sysfs the new
    one), so sysfs is asked first, then the device itself, then the event."""
    from xenblockctl.kernel import blockdev, sysfs

    if sysfs.read_attr(major, minor, "dev") is None:
        return None
    sectors = uint_or_none(sysfs.read_attr(major, minor, "size"), maximum=(1 << 64) - 1)
    seq = uint_or_none(sysfs.read_attr(major, minor, "diskseq"), maximum=(1 << 64) - 1)
    if seq is None:
        try:
            opened = blockdev.observe(posix.makedev(major, minor))
        except XenblockError:
            opened = None
        if opened is None and uint_or_none(event_diskseq, maximum=(1 << 64) - 1) is None:
            return None
        seq = opened.diskseq if opened is not None else int(event_diskseq)
    return _DeviceNow(seq, 512 * sectors if sectors is not None else 1)


def _describe(now: _DeviceNow | None, verdict: Liveness) -> str:
    if now is None:
        return "is gone"
    if verdict is Liveness.EMPTY:
        return "has no media (detached)"
    return f"now has diskseq {now.diskseq:x}"


def _check_backend(
    store: XenStore, be: str, major: int, minor: int, *, now: _DeviceNow | None, journal: Journal
) -> None:
    from xenblockctl.xenstore.client import Transaction

    names = (*identity.IDENTITY_NODES, "online", "state", "hotplug-error")

    def body(tx: Transaction) -> str | None:
        nodes = dict(zip(names, tx.read_many([join(be, name) for name in names]), strict=True))
        try:
            published = PublishedIdentity.from_nodes(nodes)
        except IdentityError:
            published = None  # not ours to judge: list/show report a malformed identity
        if published is None or published.devt != posix.makedev(major, minor) or published.diskseq is None:
            return None  # gone meanwhile, or not verifiable (stock script)
        state = XenbusState.of(nodes["state"])
        if nodes["online"] == "0" or (state is not None and state.closing):
            return None  # detaching: the device going away is expected
        verdict = identity.judge(published.diskseq, now)
        if verdict is Liveness.LIVE:
            return None
        luid = identity.format_diskseq(published.diskseq)
        error = DeviceReplaced(
            f"device {major}:{minor} {_describe(now, verdict)}, published luid {luid}: the backend's disk "
            "was detached or replaced under it"
        )
        text = error.one_line()
        if nodes["hotplug-error"] != text:
            tx.write(join(be, "hotplug-error"), text)
        return text

    recorded = store.run_transaction(body)
    if recorded is not None:
        journal.error(f"{be}: {recorded}", CODE=DeviceReplaced.code, BACKEND=be)
