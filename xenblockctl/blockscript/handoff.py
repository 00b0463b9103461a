"""Hand-off with delete-on-close: hold the device until its consumer has its own reference.

The block script's fd is what keeps an auto-clearing loop device (or a deferred-remove dm device)
alive. If it closed before the consumer opened the device, the number could be re-used and the
consumer would open someone else's disk. So `add` waits, holding the fd, until:

  * engine: our bundled backend wrote `opened`=`1` after checking BLKGETDISKSEQ == luid (it writes
    `opened`=`0` at InitWait, before libxl runs us, which is how we know it is the consumer);
  * kernel blkback: /sys/bus/xen-backend/devices/vbd-<domid>-<devid>/physical_device shows our
    major:minor (blkback opened it; blkback itself ignores the luid);

and gives up on a backend error node, the backend closing or vanishing, or the deadline."""

from __future__ import annotations

import contextlib
import enum
import os
import time

from xenblockctl.errors import XenblockError
from xenblockctl.kernel.blockdev import BlockIdentity
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.paths import join
from xenblockctl.xenstore.vbd import BackendPath, XenbusState

XEN_BACKEND_BUS = "/sys/bus/xen-backend/devices"
#: Test-only override of XEN_BACKEND_BUS: there is no kernel blkback off Xen, so the flow tests play
#: it by writing `vbd-D-N/physical_device` into a directory of their own (fault injection of a
#: kernel part that cannot exist here; the Xen lane exercises the real one).
XEN_BACKEND_BUS_ENV = "XENBLOCKCTL_TEST_XEN_BACKEND_BUS"
#: Poll interval for blkback's sysfs attribute (sysfs has no change notification for it).
BLKBACK_POLL = 0.005


class Consumer(enum.Enum):
    ENGINE = "engine"
    KERNEL = "kernel-blkback"


class HandoffError(XenblockError):
    code = "handoff-failed"


class HandoffTimeout(HandoffError):
    code = "handoff-timeout"


def blkback_dir(path: BackendPath) -> str:
    bus = os.environ.get(XEN_BACKEND_BUS_ENV) or XEN_BACKEND_BUS
    return os.path.join(bus, f"{path.kind}-{path.domid}-{path.devid}")


def blkback_device(path: BackendPath) -> str | None:
    """What kernel blkback says it opened (`%x:%x`), or None if it has not (yet)."""
    try:
        with open(os.path.join(blkback_dir(path), "physical_device")) as f:
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
    identity: BlockIdentity,
    timeout: float,
) -> Consumer:
    token = f"xenblockctl-handoff-{os.getpid()}"
    watched = [backend, error_node(home, path)]
    store.watch_many(watched, token)
    deadline = time.monotonic() + timeout
    try:
        while True:
            consumer = _check(store, home, backend, path, identity)
            if consumer is not None:
                return consumer
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandoffTimeout(
                    f"no backend opened {identity.physical_device} within {timeout:.0f} s "
                    "(is kernel blkback loaded or the xenblockctl engine running?)"
                )
            poll = BLKBACK_POLL if os.path.isdir(blkback_dir(path)) else 0.05
            store.wait_watch(min(remaining, poll))
            store.drain_watches()
    finally:
        with contextlib.suppress(XenblockError):
            store.unwatch_many(watched, token)


def _check(
    store: XenStore, home: str, backend: str, path: BackendPath, identity: BlockIdentity
) -> Consumer | None:
    # One batch (one round trip): these are independent facts, each acted on by itself.
    error, opened, state, online = store.read_many(
        [error_node(home, path), join(backend, "opened"), join(backend, "state"), join(backend, "online")]
    )
    if error:
        raise HandoffError(f"backend reported: {error[:200]}")
    if state is None:
        raise HandoffError("backend directory vanished during hand-off")
    if opened == "1":
        return Consumer.ENGINE
    if opened is None:
        seen = blkback_device(path)
        if seen is not None:
            if seen != identity.physical_device:
                raise HandoffError(f"kernel blkback opened {seen}, not {identity.physical_device}")
            return Consumer.KERNEL
    be_state = XenbusState.of(state)
    if (be_state is not None and be_state.closing) or online == "0":
        raise HandoffError(f"backend is closing (state {state}, online {online}) before taking the device")
    return None
