"""The libxl hotplug entry point: `block-xenblockctl add|remove` with XENBUS_PATH in the env.

On every VM start's critical path: imports only what the flows need (no click), and the
remove flow does not import the add-only modules' heavier parts until needed."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence

from xenblockctl.errors import XenblockError
from xenblockctl.journal import Journal

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
IDENTIFIER = "block-xenblockctl"
#: LIBXL_HOTPLUG_TIMEOUT (libxl_internal.h): the script is SIGKILLed after this many seconds.
LIBXL_TIMEOUT = 40.0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    env = os.environ if env is None else env
    journal = Journal(IDENTIFIER, XENBUS_PATH=env.get("XENBUS_PATH", ""))
    action = argv[1] if len(argv) == 2 else None
    if action not in ("add", "remove"):
        journal.error(f"usage: {IDENTIFIER} add|remove (got {' '.join(argv[1:])[:80]!r})", CODE="usage")
        return EXIT_USAGE

    from xenblockctl.blockscript.settings import Settings
    from xenblockctl.xenstore.vbd import BackendPath

    try:
        path = BackendPath.from_env(env)
        settings = Settings.from_env(env)
    except XenblockError as exc:
        # Without a valid backend path there is nowhere safe to write hotplug-error.
        journal.error(exc.one_line(), CODE=exc.code)
        return EXIT_FAILED
    journal.bind(DOMID=path.domid, DEVID=path.devid, ACTION=action)

    from xenblockctl.xenstore.client import XenStore

    started = time.monotonic()
    try:
        # One thread, one shot: the synchronous link (no reader thread, no `socket`; bench/README.md).
        store = XenStore.connect(timeout=settings.xenstore_timeout, synchronous=True)
    except XenblockError as exc:
        journal.error(exc.one_line(), CODE=exc.code, ERRNO=exc.errno or 0)
        return EXIT_FAILED
    # libxl SIGKILLs us at 40 s: every xenstore request, wait and backoff ends before that, so a
    # failure is always reported (and withdrawn) by us rather than cut off half-way.
    store.deadline = started + LIBXL_TIMEOUT - 2
    try:
        if action == "add":
            from xenblockctl.blockscript.add import run_add

            result = run_add(store, path, settings, journal)
            verb = "already attached" if result.already else f"handed to {result.consumer}"
            journal.info(f"{result.device_path} {result.physical_device} luid {result.luid}: {verb}")
        else:
            from xenblockctl.blockscript.remove import run_remove

            removed = run_remove(store, path, journal)
            journal.info(f"removed ({removed.detached})")
    except XenblockError as exc:
        journal.error(exc.one_line(), CODE=exc.code, ERRNO=exc.errno or 0)
        return EXIT_FAILED
    except Exception as exc:  # a bug: still a coded line for libxl, and the traceback in the log
        import traceback

        journal.error(f"internal: {type(exc).__name__}: {exc}", CODE="internal")
        traceback.print_exc()
        if action == "add":
            _report_internal(store, path, exc)
        return EXIT_FAILED
    finally:
        store.close()
    return EXIT_OK


def _report_internal(store: object, path: object, exc: Exception) -> None:
    from xenblockctl.blockscript.add import report_failure
    from xenblockctl.xenstore.client import XenStore
    from xenblockctl.xenstore.vbd import BackendPath, backend_dir

    if isinstance(store, XenStore) and isinstance(path, BackendPath):
        try:
            be = backend_dir(store, path)
            report_failure(store, be, XenblockError(f"{type(exc).__name__}: {exc}"), withdraw=False)
        except XenblockError:
            pass


if __name__ == "__main__":
    sys.exit(main())
