"""The libxl hotplug entry point: `block-xenblockctl add|remove` with XENBUS_PATH in the env.

On every VM start's critical path: imports only what the flows need (no click), and the
remove flow does not import the add-only modules' heavier parts until needed."""

from __future__ import annotations

import sys
import time

from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
IDENTIFIER = "block-xenblockctl"


def main(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, *, defer_autoclear: bool = True
) -> int:
    """`defer_autoclear`: see add.run_add (the udev hook, whose leftover processes udev kills,
    passes False)."""
    argv = list(sys.argv if argv is None else argv)
    environment = Environment.of_process() if env is None else Environment(env)
    variables = environment.variables
    journal = Journal(IDENTIFIER, XENBUS_PATH=variables.get("XENBUS_PATH", ""))
    action = argv[1] if len(argv) == 2 else None
    if action not in ("add", "remove"):
        journal.error(f"usage: {IDENTIFIER} add|remove (got {' '.join(argv[1:])[:80]!r})", CODE="usage")
        return EXIT_USAGE

    from xenblockctl import config
    from xenblockctl.blockscript.settings import Settings
    from xenblockctl.xenstore.vbd import BackendPath

    try:
        path = BackendPath.from_env(variables)
    except XenblockError as exc:
        # Without a valid backend path there is nowhere safe to write hotplug-error.
        journal.error(exc.one_line(), CODE=exc.code)
        return EXIT_FAILED
    journal.bind(DOMID=path.domid, DEVID=path.devid, ACTION=action)
    unusable: XenblockError | None = None
    try:
        settings = Settings.from_env(variables)
    except XenblockError as exc:
        # A setting we cannot use fails this add, but libxl only shows the admin `hotplug-error`:
        # reach xenstore with the defaults to write it (below), and change nothing else.
        unusable, settings = exc, Settings()

    from xenblockctl.xenstore.client import XenStore

    started = time.monotonic()
    try:
        # One thread, one shot: the synchronous link (no reader thread, no `socket`; bench/README.md).
        store = XenStore.connect(timeout=settings.xenstore_timeout, env=variables, synchronous=True)
    except XenblockError as exc:
        if unusable is not None:
            journal.error(unusable.one_line(), CODE=unusable.code)
        journal.error(exc.one_line(), CODE=exc.code, ERRNO=exc.errno or 0)
        return EXIT_FAILED
    # libxl SIGKILLs us at 40 s: every xenstore request, wait and backoff ends before that, so a
    # failure is always reported (and withdrawn) by us rather than cut off half-way.
    store.deadline = started + config.SCRIPT_DEADLINE
    try:
        if unusable is not None and action == "add":
            raise unusable
        if unusable is not None:
            # remove still cleans up, with the defaults: a typo in the config must not leak the
            # devices of every guest that stops (nothing remove does depends on a tunable).
            journal.error(f"{unusable.one_line()} (remove runs with the defaults)", CODE=unusable.code)
        if action == "add":
            from xenblockctl.blockscript.add import run_add

            result = run_add(store, path, settings, journal, env=environment, defer_autoclear=defer_autoclear)
            verb = "already attached" if result.already else f"handed to {result.consumer}"
            journal.info(f"{result.device_path} {result.physical_device} luid {result.luid}: {verb}")
        else:
            from xenblockctl.blockscript.remove import run_remove

            removed = run_remove(store, path, journal, env=environment, lock_timeout=settings.lock_timeout)
            journal.info(f"removed ({removed.detached})")
    except XenblockError as exc:
        journal.error(exc.one_line(), CODE=exc.code, ERRNO=exc.errno or 0)
        if exc is unusable and action == "add":
            _report(store, path, exc)
        return EXIT_FAILED
    except Exception as exc:  # a bug: still a coded line for libxl, and the traceback in the log
        import traceback

        journal.error(f"internal: {type(exc).__name__}: {exc}", CODE="internal")
        traceback.print_exc()
        if action == "add":
            _report(store, path, XenblockError(f"{type(exc).__name__}: {exc}"))
        return EXIT_FAILED
    finally:
        store.close()
    return EXIT_OK


def _report(store: object, path: object, exc: XenblockError) -> None:
    """`hotplug-error` for a failure run_add did not report itself (it reports its own): a setting
    we cannot use, or a bug. Nothing was published, so nothing is withdrawn."""
    from xenblockctl.blockscript.add import report_failure
    from xenblockctl.xenstore.client import XenStore
    from xenblockctl.xenstore.vbd import BackendPath, backend_dir

    if isinstance(store, XenStore) and isinstance(path, BackendPath):
        try:
            be = backend_dir(store, path)
            report_failure(store, be, exc, withdraw=False)
        except XenblockError:
            pass


if __name__ == "__main__":
    sys.exit(main())
