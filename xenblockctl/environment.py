"""The one environment object: an entry point reads its variables once and passes this down.

Nothing below an entry point (`block-xenblockctl`, the udev helper, the admin CLI) reads
`os.environ`: the xenstore transport, the per-target locks, the hand-off, the pause points, the
dm stop points and gc get what they need from here, so an in-process caller (a test, `attach`)
decides exactly what they see. The options of config.py are read from `variables` by
`config.load` / `Settings.from_env`; what is here is the rest:

  XENSTORED_PATH, XENSTORED_RUNDIR   where xenstored is (xenstore/transport.py reads `variables`)
  XENBLOCKCTL_LOCK_DIR               the per-target lock directory (tests: one per run)
  XENBLOCKCTL_CACHE_DIR              the hotplug bundle's directory: read by the laid block script
                                     itself, before any import (blockscript/bundle.py)

and test-only hooks, inert when unset:

  XENBLOCKCTL_TEST_XEN_BACKEND_BUS   stands in for /sys/bus/xen-backend/devices: there is no
                                     kernel blkback off Xen, so flow tests play its sysfs attribute
  XENBLOCKCTL_PAUSE_AT, _PAUSE_FILE  stop the process at a named point (blockscript/faults.py)
  XENBLOCKCTL_TEST_GC_SCOPE          gc, and remove's pass over loops tagged for a vbd without a
                                     record, consider only loop devices backed by files below this
  XENBLOCKCTL_TEST_WARM_IMPORTS      a warm server's worker prints the modules it imported beyond
                                     the server's after its run (blockscript/warm.py)

A plain class, not a dataclass: this is on the hotplug path, whose import graph stays small."""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Mapping

LOCK_DIR = "/run/xenblockctl/locks"
LOCK_DIR_ENV = "XENBLOCKCTL_LOCK_DIR"
XEN_BACKEND_BUS = "/sys/bus/xen-backend/devices"
XEN_BACKEND_BUS_ENV = "XENBLOCKCTL_TEST_XEN_BACKEND_BUS"
PAUSE_AT_ENV = "XENBLOCKCTL_PAUSE_AT"
PAUSE_FILE_ENV = "XENBLOCKCTL_PAUSE_FILE"
GC_SCOPE_ENV = "XENBLOCKCTL_TEST_GC_SCOPE"
WARM_IMPORTS_ENV = "XENBLOCKCTL_TEST_WARM_IMPORTS"
#: Tests: a warm worker says on stderr whether its sharing check used the server's table or walked.
WARM_SHARING_ENV = "XENBLOCKCTL_TEST_WARM_SHARING"


class Environment:
    """What one process was started with. An empty variable counts as unset (as for options)."""

    __slots__ = ("gc_scope", "lock_dir", "pause_at", "pause_file", "variables", "xen_backend_bus")

    def __init__(self, variables: Mapping[str, str]) -> None:
        self.variables = variables
        self.lock_dir = variables.get(LOCK_DIR_ENV) or LOCK_DIR
        self.xen_backend_bus = variables.get(XEN_BACKEND_BUS_ENV) or XEN_BACKEND_BUS
        self.pause_at = variables.get(PAUSE_AT_ENV) or None
        self.pause_file = variables.get(PAUSE_FILE_ENV) or None
        self.gc_scope = variables.get(GC_SCOPE_ENV) or None

    @classmethod
    def of_process(cls) -> Environment:
        """For entry points only: a snapshot of this process's environment, decoded as os.environ
        decodes it (the filesystem encoding, surrogateescape), from `posix.environ`: the hotplug path
        never imports `os` (bench/README.md, issue 18 round 10)."""
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        return cls({k.decode(encoding, errors): v.decode(encoding, errors) for k, v in posix.environ.items()})

    def __repr__(self) -> str:
        return f"Environment(lock_dir={self.lock_dir!r}, pause_at={self.pause_at!r})"
