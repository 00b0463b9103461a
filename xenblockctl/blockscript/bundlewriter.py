"""Writing the hotplug bundle (xenblockctl/blockscript/bundle.py: its format, its reader).

A miss of the laid block script (bundle.start), `install-hooks` (the script's `--write-bundle`) and
the .deb's postinst write it; a start that uses the bundle never imports this module. It is apart
from the reader because the reader is imported from its file at every start and its .pyc is
unmarshalled each time: the writer was ~60 % of that code (bench/README.md, issue 18 round 7)."""

import marshal
import os
import sys

from xenblockctl.blockscript.bundle import FORMAT, IDENTIFIER, LATER_ROOTS, NAME, REMOVE_ROOTS, ROOTS

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


def write(directory: str, packages: str) -> int:
    """Write the bundle of ROOTS' and LATER_ROOTS' closure from `packages` into `directory`,
    atomically; returns the number of modules. Raises Refused or OSError/ValueError."""
    from _frozen_importlib_external import MAGIC_NUMBER

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


def renew(directory: str, packages: str, reason: str) -> bool:
    """The laid script's miss: write a fresh bundle, log what happened; never raises (the attach goes
    on with normal imports). True if a bundle was written."""
    try:
        count = write(directory, packages)
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
    _journal().info(
        f"hotplug bundle written: {count} modules in {directory}/{NAME} (it was not used: {reason})"
    )
    return True


def _journal() -> "Journal":
    """The log, imported after collect has imported the graph (journal is part of it): the bundle
    records the order a fresh start finishes the modules in, which preload runs them in."""
    from xenblockctl.journal import Journal

    return Journal(IDENTIFIER)
