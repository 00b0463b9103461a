"""The hotplug bundle's writer: the code of every module `add` and `remove` import, in one file.

A VM start spends ~2 ms of CPU finding, checking and reading ~37 .pyc files (bench/README.md,
issue 18). The laid block script reads this one file instead: its loader (in the script itself,
hotplug/block-xenblockctl, since a module of its own would cost a module) uses the bundle only if
it was written by the same interpreter (magic number) from the same package directory, every
source still has the size and mtime recorded here (one stat each, as a .pyc is checked), and the
file and its directory are owned by the running uid and writable by nobody else. Anything else:
normal imports for that run, and this module is imported to write a fresh bundle. Correctness
never depends on the bundle.

Who writes it: the script on a miss, like a .pyc, before it runs its action (so the bundle holds
exactly the closure of ROOTS, whatever the run's action or target kind); and `install-hooks`, so
the first VM start is fast. A bundle is written to a temporary name in its directory and renamed
over, so a reader never sees half of one. Failing to write is not the action's failure: it is
logged with its reason and the attach goes on.

Imported only on a miss: it is not on the hotplug path's import graph, and not in the bundle."""

from __future__ import annotations

import marshal
import os
import sys
import types

from xenblockctl.journal import Journal
from xenblockctl.xenstore.numbers import uint_or_none

#: What hotplug.main imports for every action (itself, and lazily config, settings, vbd, the client
#: and the synchronous link it connects with, which XenStore.connect imports).
MAIN_ROOTS = (
    "xenblockctl.blockscript.hotplug",
    "xenblockctl.config",
    "xenblockctl.blockscript.settings",
    "xenblockctl.xenstore.vbd",
    "xenblockctl.xenstore.client",
    "xenblockctl.xenstore.synchronous",
)
#: What remove imports: the bundle's first section, all that a remove unmarshals (remove imports
#: nothing of add's; add's own modules are ~22 % of the code).
REMOVE_ROOTS = (*MAIN_ROOTS, "xenblockctl.blockscript.remove")
#: The hotplug path: the bundle holds these and every xenblockctl module they import; what add adds
#: to REMOVE_ROOTS' closure is the second section. The one list of the hotplug path's roots:
#: tests/lint/test_hotplug_imports.py measures the graphs from these, and checks that the steps a
#: file add imports lazily add nothing outside them.
ROOTS = (*REMOVE_ROOTS, "xenblockctl.blockscript.add")
NAME = "hotplug.bundle"
#: The file starts with this and the interpreter's bytecode magic number, checked before any of it
#: is unmarshalled (another Python version's marshal data must never be decoded as code). Then,
#: marshalled: (package directory, ((source, size, mtime_ns) for every module), (section, ...)),
#: each section the marshalled {name: (code, is package, source)} of a step of ROOTS.
FORMAT = b"xenblockctl-bundle 2 "
#: Where the bundle lives unless XENBLOCKCTL_CACHE_DIR says otherwise (hostfiles.Layout.cache_dir).
CACHE_DIR = "/var/cache/xenblockctl"
CACHE_DIR_ENV = "XENBLOCKCTL_CACHE_DIR"
IDENTIFIER = "block-xenblockctl"


class Refused(Exception):
    """The bundle directory is not ours alone: writing a bundle there would be pointless (the loader
    refuses it) and reading one is code injection into a root process."""


def trusted_dir(directory: str) -> None:
    """Create `directory` if missing (mode 0755); raise Refused unless it is owned by the running
    uid and not writable by group or others."""
    os.makedirs(directory, 0o755, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid():
        raise Refused(f"{directory} is owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o022:
        raise Refused(f"{directory} is writable by group or others (mode {st.st_mode & 0o7777:o})")


Entry = tuple[str, bool, str, int, int, types.CodeType]


def collect(packages: str) -> list[list[Entry]]:
    """(name, is package, source path, size, mtime_ns, code) of every module of REMOVE_ROOTS'
    closure, then of what ROOTS add to it: imported normally (bundle.py's own imports are of the
    first; tests/lint checks both sections against the measured graphs)."""
    sections: list[list[Entry]] = []
    seen = {__name__}
    for roots in (REMOVE_ROOTS, ROOTS):
        for root in roots:
            __import__(root)
        names = sorted(
            n for n in sys.modules if (n == "xenblockctl" or n.startswith("xenblockctl.")) and n not in seen
        )
        seen.update(names)
        sections.append([_entry(name, packages) for name in names])
    return sections


def _entry(name: str, packages: str) -> Entry:
    spec = sys.modules[name].__spec__
    origin = None if spec is None else spec.origin
    loader = None if spec is None else spec.loader
    get_code = getattr(loader, "get_code", None)
    if spec is None or origin is None or not origin.startswith(packages + os.sep) or get_code is None:
        raise ValueError(f"{name} is not a source file below {packages} ({origin})")
    # The stat before the code: a source edited in between is newer than recorded, so the next
    # start sees the mismatch and falls back (a .pyc has the same order).
    st = os.stat(origin)
    code = get_code(name)
    if not isinstance(code, types.CodeType):
        raise ValueError(f"{name}: no code from {origin}")
    return name, spec.submodule_search_locations is not None, origin, st.st_size, st.st_mtime_ns, code


def encode(packages: str, sections: list[list[Entry]]) -> bytes:
    """The bundle's bytes after FORMAT and the magic number (the layout at FORMAT)."""
    stats = tuple(
        (origin, size, mtime) for section in sections for _n, _p, origin, size, mtime, _c in section
    )
    blobs = tuple(
        marshal.dumps({name: (code, package, origin) for name, package, origin, _s, _m, code in section})
        for section in sections
    )
    return marshal.dumps((packages, stats, blobs))


def write(directory: str, packages: str) -> int:
    """Write the bundle of ROOTS' closure from `packages` into `directory`, atomically; returns the
    number of modules. Raises Refused or OSError/ValueError."""
    from importlib._bootstrap_external import MAGIC_NUMBER  # the frozen module the script checks against

    trusted_dir(directory)
    sections = collect(packages)
    data = FORMAT + MAGIC_NUMBER + encode(packages, sections)
    target = os.path.join(directory, NAME)
    # A per-process temporary name in the same directory, renamed over the bundle: a reader (or a
    # writer killed half-way) never leaves a half bundle under NAME. No fsync: after a crash the
    # bundle may be empty or short, which the loader rejects like any bad bundle.
    tmp = os.path.join(directory, f".{NAME}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        _unlink(tmp)
        raise
    _sweep(directory)
    return sum(len(section) for section in sections)


def _unlink(path: str) -> None:
    try:  # noqa: SIM105 (contextlib is kept off the hotplug path)
        os.unlink(path)
    except OSError:
        pass


def _sweep(directory: str) -> None:
    """Remove the temporary files of writers that were killed before their rename (their pid is
    gone), so kills do not pile up bundles nobody reads."""
    prefix = f".{NAME}."
    for entry in os.listdir(directory):
        pid = uint_or_none(entry[len(prefix) : -len(".tmp")], maximum=1 << 22)  # pid_max's bound
        if entry.startswith(prefix) and entry.endswith(".tmp") and pid:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _unlink(os.path.join(directory, entry))
            except OSError:
                pass  # alive (EPERM: someone else's): leave it


def renew(directory: str, packages: str, reason: str) -> bool:
    """The laid script's miss: write a fresh bundle, log what happened; never raises (the attach goes
    on with normal imports). True if a bundle was written."""
    journal = Journal(IDENTIFIER)
    try:
        count = write(directory, packages)
    except Refused as exc:
        journal.warning(f"hotplug bundle refused, not written: {exc}; normal imports", CODE="bundle-refused")
        return False
    except Exception as exc:  # any failure, even a bug here: the action must still run
        journal.warning(
            f"hotplug bundle not written in {directory}: {type(exc).__name__}: {exc}; normal imports "
            f"(it was not used: {reason})",
            CODE="bundle-unwritable",
        )
        return False
    journal.info(f"hotplug bundle written: {count} modules in {directory}/{NAME} (it was not used: {reason})")
    return True
