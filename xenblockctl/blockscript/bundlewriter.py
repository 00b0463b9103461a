"""Writing the hotplug bundle (xenblockctl/blockscript/bundle.py: its format, its reader).

`install-hooks` and the .deb's postinst (the script's `--write-bundle`), and the background writer
a missing or stale bundle starts (`--renew-bundle`, renew_later) write it; a start that uses the
bundle never imports this module. It is apart from the reader because the reader is imported from
its file at every start and its .pyc is unmarshalled each time: the writer was ~60 % of that code
(bench/README.md, issue 18 round 7)."""

import errno
import fcntl
import marshal
import os
import stat
import sys

from xenblockctl.blockscript.bundle import (
    FORMAT,
    IDENTIFIER,
    LATER_ROOTS,
    NAME,
    REMOVE_ROOTS,
    RENEW,
    ROOTS,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    import types

    from xenblockctl.journal import Journal


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


if TYPE_CHECKING:
    Entry = tuple[str, bool, str, int, int, types.CodeType, tuple[str, ...]]


def collect(packages: str) -> "list[list[Entry]]":
    """(name, is package, source path, size, mtime_ns, code, the built-in modules its body imports)
    of every module of REMOVE_ROOTS' closure, then of what ROOTS add to it, then of what
    LATER_ROOTS add: imported normally (bundle.py's own imports are of the first; tests/lint checks
    the sections against the measured graphs)."""
    sections: list[list[Entry]] = []
    seen = {"xenblockctl.blockscript.bundle", __name__}  # the reader and this: never in a bundle
    for roots in (REMOVE_ROOTS, ROOTS, LATER_ROOTS):
        for root in roots:
            __import__(root)
        # in sys.modules' order, which is the order the modules finished importing (the import
        # system moves each module to the end once its body has run): the order bundle.preload
        # runs them in, each after the modules it imports
        names = [
            n for n in sys.modules if (n == "xenblockctl" or n.startswith("xenblockctl.")) and n not in seen
        ]
        seen.update(names)
        sections.append([_entry(name, packages) for name in names])
    return sections


def _entry(name: str, packages: str) -> "Entry":
    spec = sys.modules[name].__spec__
    origin = None if spec is None else spec.origin
    loader = None if spec is None else spec.loader
    get_code = getattr(loader, "get_code", None)
    if spec is None or origin is None or not origin.startswith(packages + os.sep) or get_code is None:
        raise ValueError(f"{name} is not a source file below {packages} ({origin})")
    # The stat before the code: a source edited in between is newer than recorded, so the next
    # start sees the mismatch and falls back (a .pyc has the same order).
    st = os.stat(origin)
    code, builtins = lean_code(origin)
    if type(code) is not type(_entry.__code__):
        raise ValueError(f"{name}: no code from {origin}")
    return (
        name,
        spec.submodule_search_locations is not None,
        origin,
        st.st_size,
        st.st_mtime_ns,
        code,
        builtins,
    )


def lean_code(origin: str) -> "tuple[types.CodeType, tuple[str, ...]]":
    """The code of the source `origin` as its .pyc holds it, and the built-in modules (C modules
    linked into the interpreter: errno, _socket, ...) its top-level statements import, in their
    order, which bundle.preload imports without the import system's per-module work before it runs
    the body. Only the module body's own import statements count: one under `if TYPE_CHECKING`,
    `try` or in a function may never run. The code is less the docstrings (modules, classes,
    functions), the functions' annotations and the __future__ imports (compiler flags instead).
    Unmarshalling is the bundle's largest cost at every start, and it grows with the bytes: the
    first two are ~22 % of them and ~0.3 ms of a fresh process's CPU (bench/README.md, issue 18
    round 7). Nothing the hotplug path runs reads a docstring or a
    function's __annotations__ (what would: click's help, typing.get_type_hints, is not on it);
    class-level annotations stay, since records.NamedTuple takes its fields from them. Every other
    node keeps its line number (tracebacks point at the source as before), and asserts stay (the
    optimisation level is the interpreter's, as for a .pyc)."""
    import __future__

    import ast

    with open(origin, "rb") as f:
        tree = ast.parse(f.read(), origin)
    # `from __future__ import annotations` as a compiler flag, not a statement: the same code, less
    # the import at each module's start and the __future__ module itself (~0.1 ms per start), which
    # nothing else on the hotplug path loads; a module's `annotations` name (a _Feature) goes with it
    flags = 0
    for statement in tree.body:
        if isinstance(statement, ast.ImportFrom) and statement.module == "__future__":
            for alias in statement.names:
                flags |= getattr(__future__, alias.name).compiler_flag
    tree.body = [s for s in tree.body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            arguments = node.args
            for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs):
                arg.annotation = None
            for star in (arguments.vararg, arguments.kwarg):
                if star is not None:
                    star.annotation = None
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                # dropped, or a `pass` if the body is nothing else; every other node keeps its line
                node.body[:1] = [] if len(node.body) > 1 else [ast.copy_location(ast.Pass(), first)]
    builtins: list[str] = []
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
            names = [statement.module]
        else:
            continue
        builtins.extend(n for n in names if n in sys.builtin_module_names and n not in builtins)
    code: types.CodeType = compile(tree, origin, "exec", flags=flags, dont_inherit=True)
    return code, tuple(builtins)


def encode(packages: str, sections: "list[list[Entry]]") -> bytes:
    """The bundle's bytes after FORMAT and the magic number (the layout at FORMAT)."""
    from _frozen_importlib_external import cache_from_source

    stats = tuple(
        (origin, size, mtime) for section in sections for _n, _p, origin, size, mtime, _c, _b in section
    )
    blobs = [
        marshal.dumps(
            {
                name: (code, package, origin, cache_from_source(origin), builtins)
                for name, package, origin, _s, _m, code, builtins in section
            }
        )
        for section in sections
    ]
    later = tuple(name for name, *_rest in sections[-1])
    index = marshal.dumps((packages, stats, tuple(len(blob) for blob in blobs), later))
    return len(index).to_bytes(4, "little") + index + b"".join(blobs)


def write(directory: str, packages: str, *, yield_to_another: bool = False) -> int | None:
    """Write the bundle of ROOTS' and LATER_ROOTS' closure from `packages` into `directory`,
    atomically; returns the number of modules, or None if another writer holds the lock and
    `yield_to_another` (it writes the same bundle). Raises Refused or OSError/ValueError.

    The writers' lock only spares a duplicate compile: every writer writes a temporary file of its
    own and renames it over, so two at once leave one whole bundle. A background writer (renew_later)
    leaves the work to one already at it; install-hooks and the postinst write all the same, at
    once, rather than wait for a writer that runs at SCHED_IDLE and a busy host may starve."""
    trusted_dir(directory)
    # A flock on the directory itself (no lock file to leave behind in a cache install-hooks lays
    # and a package removes). A plain flock, not locks.target_lock: this process imports nothing of
    # ours before collect(), which takes each section from the order sys.modules gained our modules
    # in. Held until this returns (the kernel drops a dead writer's).
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if yield_to_another:
                return None
        return _write_locked(directory, packages)
    finally:
        os.close(fd)


def _write_locked(directory: str, packages: str) -> int:
    from _frozen_importlib_external import MAGIC_NUMBER

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
    from xenblockctl.xenstore.numbers import uint_or_none

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


def renew(directory: str, packages: str, reason: str, *, background: bool = False) -> bool:
    """A miss outside add and remove: write a fresh bundle, log what happened; never raises (the
    process goes on with normal imports). True if a bundle was written. `background`: this is the
    writer an add's or a remove's miss started (renew_later), at the lowest CPU priority, and one
    already writing is left to it; otherwise (install-hooks, the postinst) this writes regardless."""
    refused: OSError | None = None
    if background:
        try:
            # SCHED_IDLE: the compile runs only on CPU no add or guest wants (one vCPU of a small
            # driver domain is all its adds have); dropping one's own priority needs no privilege
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            refused = exc  # logged once write() is done, whatever it did (_journal says why)
    try:
        count = write(directory, packages, yield_to_another=background)
    except Refused as exc:
        journal = _journal()
        journal.warning(f"hotplug bundle refused, not written: {exc}; normal imports", CODE="bundle-refused")
        return False
    except Exception as exc:  # any failure, even a bug here: the action must still run
        journal = _journal()
        journal.warning(
            f"hotplug bundle not written in {directory}: {type(exc).__name__}: {exc}; normal imports "
            f"(it was not used: {reason})",
            CODE="bundle-unwritable",
        )
        return False
    finally:
        if refused is not None:
            _journal().warning(f"hotplug bundle writer ran at normal priority: SCHED_IDLE refused: {refused}")
    if count is None:
        _journal().info(f"hotplug bundle not written here: another writer holds the lock on {directory}")
        return False
    _journal().info(
        f"hotplug bundle written: {count} modules in {directory}/{NAME} (it was not used: {reason})"
    )
    return True


def renew_later(directory: str, script: str, action: str, reason: str) -> None:
    """An add's or a remove's miss: start `script RENEW` (the laid script, run as libxl runs it)
    in a session of its own, and return at once; this run imports normally. The writer outlives
    this process (libxl's timeout kill is for this one); its stdin and stdout are /dev/null, and
    so is its stderr if that is a pipe or a socket (libxl and tests read the script's output to
    its end, which must not wait for the writer); a console or a file keeps its lines. Never
    raises: a writer that cannot start is logged, and the next miss tries again."""
    journal = _journal()
    null = os.devnull
    actions = [(os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0), (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0)]
    try:
        mode = os.fstat(2).st_mode
    except OSError:
        mode = stat.S_IFIFO  # no stderr: nothing to keep
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        actions.append((os.POSIX_SPAWN_OPEN, 2, null, os.O_WRONLY, 0))
    try:
        pid = os.posix_spawn(script, [script, RENEW], os.environ, file_actions=actions, setsid=True)
    except OSError as exc:
        journal.warning(
            f"hotplug bundle not used ({reason}): normal imports; its writer did not start: "
            f"{script} {RENEW}: {exc}",
            CODE="bundle-unwritable",
        )
        return
    journal.info(
        f"hotplug bundle not used ({reason}): normal imports; writer {pid} writes a fresh one, "
        f"off this {action}'s path"
    )


def _journal() -> "Journal":
    """The log, imported after collect has imported the graph (journal is part of it): the bundle
    records the order a fresh start finishes the modules in, which preload runs them in."""
    from xenblockctl.journal import Journal

    return Journal(IDENTIFIER)
