"""udev hooks (hotplug/xenblockctl-udev, rules in hotplug/60-xenblockctl.rules).

`backend` events (SUBSYSTEM=xen-backend, vbd*): run the block script where no toolstack does.
Upstream libxl runs hotplug scripts itself and removed its udev rules in 2015
(xen-block-protocol.md §1.9), so running from udev as well would make two `add`s race for one
device. Guards, all of which must pass:
  * `[udev] enabled = true` (off by default: only for setups where nothing else runs the script);
  * the backend's `script` node names block-xenblockctl (another script's disk is not ours);
  * libxl's private copy `/libxl/<domid>/device/vbd/<devid>` is not visible: where it is, libxl
    (or `xenblockctl attach`) runs in this domain and runs the script itself.

`block` events (SUBSYSTEM=block, change/remove): udev_block.py, imported for them only.

Both exit 0 whatever happens (udev only logs a failing RUN), and import no click.

The hook runs on every block event, so its start-up is the block script's: no `os`, `typing` or
`collections` (posix, xenblockctl.records and xenblockctl.pathsteps instead), the synchronous
xenstore link (no pyxs, `socket` or threads), and the xenstore client only once an event will use
it; each event imports what it uses, so a backend event with the hooks off (the default) stops at
the config (tests/lint/test_udev_imports.py; bench/README.md, issue 18 round 11)."""

from __future__ import annotations

from xenblockctl import config, pathsteps
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

IDENTIFIER = "xenblockctl-udev"
SCRIPT_NAME = "block-xenblockctl"


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
            from xenblockctl.toolstack.udev_block import block_event

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
    from xenblockctl.xenstore.paths import join
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
