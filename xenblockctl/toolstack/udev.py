"""udev hooks (hotplug/xenblockctl-udev, rules in hotplug/60-xenblockctl.rules).

`backend` events (SUBSYSTEM=xen-backend, vbd*): run the block script where no toolstack does.
Upstream libxl runs hotplug scripts itself and removed its udev rules in 2015
(xen-block-protocol.md §1.9), so running from udev as well would make two `add`s race for one
device. Guards, all of which must pass:
  * `[udev] enabled = true` (off by default: only for setups where nothing else runs the script);
  * the backend's `script` node names block-xenblockctl (another script's disk is not ours);
  * libxl's private copy `/libxl/<domid>/device/vbd/<devid>` is not visible: where it is, libxl
    (or `xenblockctl attach`) runs in this domain and runs the script itself.

`block` events (SUBSYSTEM=block, change/remove): when the device behind an attached vbd goes away
or changes media (its diskseq moves on), record that on the backend (`hotplug-error`) and in the
journal, so `list`/`doctor` show the vbd as broken instead of it silently naming a re-used
major:minor. Closing backends are skipped: their device going away is the detach itself.

Both exit 0 whatever happens (udev only logs a failing RUN), and import no click.

The hook runs on every block event, so its start-up is the block script's: no `os`, `typing` or
`collections` (posix, xenblockctl.records and xenblockctl.pathsteps instead), the synchronous
xenstore link (no pyxs, `socket` or threads), and the xenstore client only once an event will use
it (tests/lint/test_udev_imports.py; bench/README.md, issue 18 round 11)."""

from __future__ import annotations

import posix

from xenblockctl import config, pathsteps
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal
from xenblockctl.records import NamedTuple
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.identity import IdentityError, Liveness, PublishedIdentity
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import XenbusState, walk_backends

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from xenblockctl.xenstore.client import XenStore

IDENTIFIER = "xenblockctl-udev"
SCRIPT_NAME = "block-xenblockctl"


class DeviceReplaced(XenblockError):
    """Written to `hotplug-error` of a backend whose device went away or changed under it."""

    code = "device-replaced"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    import sys

    argv = list(sys.argv if argv is None else argv)
    env = Environment.of_process().variables if env is None else env
    journal = Journal(IDENTIFIER, stderr=False)
    what = argv[1] if len(argv) == 2 else ""
    try:
        if what == "backend":
            return backend_event(env, journal)
        if what == "block":
            return block_event(env, journal)
        journal.error(f"usage: {IDENTIFIER} backend|block (got {' '.join(argv[1:])[:60]!r})")
    except XenblockError as exc:
        journal.error(exc.one_line(), CODE=exc.code)
    return 0


def _enabled(env: Mapping[str, str]) -> bool:
    """udev.enabled, by the one parser: a bad value is a coded error (main logs it), never a
    silent "off"."""
    return config.load(env, section="udev")["udev.enabled"].value is True


def backend_event(env: Mapping[str, str], journal: Journal) -> int:
    """Returns 0 always; what was decided goes to the journal (and the tests read it back)."""
    action = env.get("ACTION", "")
    if action not in ("add", "remove"):
        return 0
    if not _enabled(env):
        return 0
    from xenblockctl.xenstore.client import XenStore
    from xenblockctl.xenstore.vbd import BackendPath, backend_dir

    path = BackendPath.from_env(env)
    with XenStore.connect(timeout=5.0, env=env, synchronous=True) as store:
        be = backend_dir(store, path)
        libxl_copy = f"/libxl/{path.domid}/device/vbd/{path.devid}"
        try:
            managed = store.read_optional(libxl_copy) is not None
        except XenblockError:
            managed = False  # not readable from a driver domain: nobody here runs scripts for it
        if managed:
            journal.info(f"{path.relative}: {action} left to libxl ({libxl_copy} exists)")
            return 0
        if action == "add":
            script = store.read_optional(join(be, "script")) or ""
            if pathsteps.basename(script) != SCRIPT_NAME:
                journal.info(f"{path.relative}: script {script!r} is not ours; ignoring")
                return 0
    from xenblockctl.blockscript import hotplug

    journal.info(f"{path.relative}: running {action} from udev")
    # In line, not in a forked child: udev kills what a RUN program leaves behind when the event
    # ends (udev(7)), and a child killed before its ioctl would leave AUTOCLEAR on.
    status = hotplug.main([SCRIPT_NAME, action], env, defer_autoclear=False)
    journal.info(f"{path.relative}: {action} from udev exited {status}")
    return 0


def block_event(env: Mapping[str, str], journal: Journal) -> int:
    action = env.get("ACTION", "")
    major_text, minor_text = env.get("MAJOR", ""), env.get("MINOR", "")
    major, minor = uint_or_none(major_text, maximum=0xFFFFFFFF), uint_or_none(minor_text, maximum=0xFFFFFFFF)
    if action not in ("change", "remove") or major is None or minor is None:
        return 0
    now = None if action == "remove" else _device_now(major, minor, env.get("DISKSEQ", ""))
    from xenblockctl.xenstore.client import XenStore

    try:
        store = XenStore.connect(timeout=5.0, env=env, synchronous=True)
    except XenblockError:
        return 0  # no xenstored: no vbds to break
    with store:
        for be in _backends_using(store, f"{major:x}:{minor:x}"):
            _check_backend(store, be, major, minor, now=now, journal=journal)
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


def _backends_using(store: XenStore, physical: str) -> list[str]:
    return [
        entry.path
        for entry in walk_backends(store, store.home())
        if store.read_optional(join(entry.path, identity.PHYSICAL_DEVICE)) == physical
    ]


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
