"""Hand-off with delete-on-close: hold the device until its consumer has its own reference.

The block script's fd is what keeps an auto-clearing loop device (or a deferred-remove dm device)
alive. If it closed before the consumer opened the device, the number could be re-used and the
consumer would open someone else's disk. So `add` waits, holding the fd, until:

  * engine: our bundled backend wrote `opened`=`1` after checking BLKGETDISKSEQ == luid (it writes
    `opened`=`0` at InitWait, before libxl runs us, which is how we know it is the consumer);
  * kernel blkback: /sys/bus/xen-backend/devices/vbd-<domid>-<devid>/physical_device shows our
    major:minor (blkback opened it; blkback itself ignores the luid); never for an NBD export the
    engine serves (nbdexport.py: no device, `physical_device` None), which only the engine takes;

and gives up on a backend error node, the backend closing or vanishing, or the deadline."""

from __future__ import annotations

import posix
import time

from xenblockctl import pathsteps
from xenblockctl.enums import Enum
from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.client import WatchEvent, XenStore
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, XenbusState

#: Polls of blkback's sysfs attribute. Nothing announces it: blkback creates `physical_device`
#: after its open (xenvbd_sysfs_addif) and never calls sysfs_notify() on it, and kernfs sends no
#: inotify event for a file the kernel creates (checked: a loop device's bind creates loop/ with
#: no event). A poll reads only sysfs (a stat, an open), not xenstore: the store is read again on
#: a watch event or every ENGINE_POLL. blkback usually opens within a few ms, so for
#: BLKBACK_FAST_FOR the polls come every BLKBACK_FIRST_POLL, then doubling to BLKBACK_POLL; the
#: open is then seen as soon as the engine's `opened` event is (~0.5 ms p50 on a loaded 2-vCPU VM;
#: doubling from 0.5 ms, each poll a xenstore round trip, 0.7-1.3 ms: bench/README.md, issue 18,
#: poll20). The CPU is bounded, measured there: the fast phase ~30 wake-ups, ~2.5 ms of CPU at
#: most; then 200 wake-ups a second, ~5 % of a CPU (the round-trip polls: ~7.5 %), so a blkback
#: that takes libxl's whole 40 s costs ~8,000 wake-ups, ~2 s of CPU.
BLKBACK_FIRST_POLL = 0.0002
BLKBACK_FAST_FOR = 0.01
BLKBACK_POLL = 0.005
#: How often the hand-off reads the store again without an event: a safety net only (the engine's
#: `opened` write, an error node, a closing backend fire a watch), so that a lost event costs
#: this much and no more.
ENGINE_POLL = 0.05
#: What the hand-off leaves of the store's overall deadline (the script's, see hotplug.py): a
#: request after it fails, so a hand-off that ran up to it could neither withdraw nor write
#: `hotplug-error`. That is one transaction, milliseconds; a second covers a loaded dom0.
REPORT_RESERVE = 1.0


class Consumer(Enum):
    ENGINE = "engine"
    KERNEL = "kernel-blkback"


class HandoffError(XenblockError):
    code = "handoff-failed"


class HandoffTimeout(HandoffError):
    code = "handoff-timeout"


def blkback_dir(path: BackendPath, bus: str) -> str:
    """`bus`: the environment's xen_backend_bus (/sys/bus/xen-backend/devices, or the directory in
    which a flow test plays kernel blkback, which cannot exist off Xen; the Xen lane has the real
    one)."""
    return f"{bus}/{path.kind}-{path.domid}-{path.devid}"


def blkback_device(path: BackendPath, bus: str) -> str | None:
    """What kernel blkback says it opened (`%x:%x`), or None if it has not (yet)."""
    try:
        with open(f"{blkback_dir(path, bus)}/physical_device") as f:
            return f.read().strip() or None
    except OSError:
        return None


def error_node(home: str, path: BackendPath) -> str:
    """Where xenbus_dev_error() (and our engine) report a backend failure."""
    return join(home, "error", path.relative, "error")


def wait_for_consumer(
    store: XenStore,
    *,
    home: str,
    backend: str,
    path: BackendPath,
    physical_device: str | None,
    timeout: float,
    bus: str,
) -> Consumer:
    """`physical_device`: what kernel blkback must show it opened (hex MAJOR:MINOR); None when
    there is no device and only the engine can be the consumer."""
    token = f"xenblockctl-handoff-{posix.getpid()}"
    watched = [backend, error_node(home, path)]
    # The first check's reads go in the watches' batch: one round trip less on every add.
    values: list[str | None] | None = store.watch_many(
        watched, token, then_read=_checked(home, backend, path)
    )
    started = time.monotonic()
    deadline = started + timeout
    if store.deadline is not None:
        # The configured timeout is bounded (config.py), but the steps before the hand-off (a lock
        # wait above all) may have used part of the script's budget: the failure is still reported.
        deadline = min(deadline, store.deadline - REPORT_RESERVE)
    read_at = started
    blkback_poll = BLKBACK_FIRST_POLL
    first = True
    try:
        while True:
            if values is None:
                values = store.read_many(_checked(home, backend, path))
                read_at = time.monotonic()
            # Between two reads of the store its values stand (a change would have fired a watch):
            # a check without one looks at sysfs only.
            consumer = _check(values, path, physical_device, bus=bus)
            if consumer is not None:
                return consumer
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                raise HandoffTimeout(
                    f"no backend opened {physical_device or 'the export'} within {deadline - started:.0f} s "
                    "(is kernel blkback loaded or the xenblockctl engine running?)"
                )
            if first:
                first = False
                # A change since the watches were set: look again at once.
                if _news(store.drain_watches(), watched, token):
                    values = None
                    continue
            poll = ENGINE_POLL - (now - read_at)
            if physical_device is not None and pathsteps.is_dir(blkback_dir(path, bus)):
                poll = min(poll, blkback_poll)
                if now - started >= BLKBACK_FAST_FOR:
                    blkback_poll = min(blkback_poll * 2, BLKBACK_POLL)
            event = store.wait_watch(max(0.0, min(remaining, poll)))
            if store.drain_watches() or event is not None or time.monotonic() - read_at >= ENGINE_POLL:
                values = None
    finally:
        # Sent with the next request (add's transaction that marks the backend connected or
        # reports the failure): one round trip fewer; nothing here depends on its reply.
        try:  # noqa: SIM105 (contextlib is kept off the hotplug path's imports)
            store.unwatch_many(watched, token, later=True)
        except XenblockError:
            pass


def _news(events: list[WatchEvent], watched: list[str], token: str) -> bool:
    """Whether `events` (queued once the first check's reads were answered) hold more than each
    watch's initial event. xenstored fires that one when the watch is set, before it answers
    the reads that follow in the batch, so it says nothing those reads did not; waking on it
    cost a second check, one round trip, whenever the consumer was not done at the first."""
    initial = set(watched)
    for event in events:
        if event.token == token and event.path in initial:
            initial.discard(event.path)
        else:
            return True
    return False


def _checked(home: str, backend: str, path: BackendPath) -> list[str]:
    """What each check reads, in one batch: independent facts, each acted on by itself."""
    return [error_node(home, path), join(backend, "opened"), join(backend, "state"), join(backend, "online")]


def _check(
    values: list[str | None], path: BackendPath, physical_device: str | None, *, bus: str
) -> Consumer | None:
    error, opened, state, online = values
    if error:
        raise HandoffError(f"backend reported: {error[:200]}")
    if state is None:
        raise HandoffError("backend directory vanished during hand-off")
    if opened == "1":
        return Consumer.ENGINE
    if opened is None and physical_device is not None:
        seen = blkback_device(path, bus)
        if seen is not None:
            if seen != physical_device:
                raise HandoffError(f"kernel blkback opened {seen}, not {physical_device}")
            return Consumer.KERNEL
    be_state = XenbusState.of(state)
    if (be_state is not None and be_state.closing) or online == "0":
        raise HandoffError(f"backend is closing (state {state}, online {online}) before taking the device")
    return None
