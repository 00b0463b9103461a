"""The hotplug bundle: the code of every module `add` and `remove` import, in one checked file.

A VM start spent ~2 ms of CPU finding, checking and reading ~37 .pyc files (bench/README.md,
issue 18). The laid block script (hotplug/block-xenblockctl) calls start(), which reads this one
file instead and puts a finder for its modules first on sys.meta_path; every other module imports
normally. The bundle is used only if all of it checks out, as a .pyc is checked:
  * its directory and the file are owned by the running uid and writable by nobody else: root
    runs the script, and a bundle someone else can write is code injection;
  * it was written by this interpreter (its bytecode magic number, checked before unmarshalling:
    another version's marshal data is never decoded) from the package directory the script was
    laid for;
  * every source still has the size and mtime_ns recorded (one stat each): an edit or an upgrade
    misses.
Anything else (missing, stale, refused, truncated, corrupt): normal imports for that run, and a
fresh bundle is written and the reason logged. Correctness never depends on the bundle.

The reader is this module, imported normally (its .pyc), not code in the script: a script run
as __main__ is compiled from source at every start, and the ~60 lines of a reader cost 0.6-0.7 ms
of compiling there against ~0.1 ms for a module (bench/README.md, issue 18 round 6). It imports
nothing at module level that the hotplug path would not import anyway (os, sys, marshal); the
writer's imports are made on a miss only.

Who writes it: the script on a miss, like a .pyc, before its action runs (so the bundle holds
exactly the closure of ROOTS, whatever the run's action or target kind); and `install-hooks`
(the script's `--write-bundle`), so the first VM start is fast. It is written to a temporary name
in its directory and renamed over, so no reader sees half of one. Failing to write is not the
action's failure: it is logged with its reason and the action goes on."""

# No `from __future__ import annotations` here (annotations naming typing-only names are quoted):
# the laid script imports this module normally, and it would be the only one to load __future__
# (lean_code compiles the bundle's modules with the flag instead of the statement).
import marshal
import os
import sys
from _frozen_importlib import ModuleSpec  # importlib.machinery's, loaded before any script runs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    import types
    from collections.abc import Sequence

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
#: is unmarshalled (another Python version's marshal data must never be decoded as code). Then the
#: index's length (4 bytes, little-endian), the index, marshalled: (package directory, ((source,
#: size, mtime_ns) for every module), (each section's length, ...)), and the sections, each the
#: marshalled {name: (code, is package, source, its .pyc path)} of a step of ROOTS, the code without
#: docstrings and function annotations (lean_code). Sections are read in place (no copy of ~350
#: KB), and only those the action needs.
FORMAT = b"xenblockctl-bundle 3 "
#: Where the bundle lives unless XENBLOCKCTL_CACHE_DIR says otherwise (hostfiles.Layout.cache_dir).
CACHE_DIR = "/var/cache/xenblockctl"
CACHE_DIR_ENV = "XENBLOCKCTL_CACHE_DIR"
IDENTIFIER = "block-xenblockctl"
#: The script's `--write-bundle` (install-hooks) exits with: the bundle was good and used,
#: a fresh one was written, none could be written (the reason is logged).
USED, WRITTEN, UNWRITTEN = 0, 3, 1

#: name -> (code, is package, source, .pyc path) of the bundle's modules this run may import
_codes: "dict[str, tuple[types.CodeType, bool, str, str]]" = {}


class _BundleLoader:
    """The import system's loader protocol: a module's code from the bundle."""

    @staticmethod
    def create_module(spec: ModuleSpec) -> None:
        return None

    @staticmethod
    def exec_module(module: "types.ModuleType") -> None:
        exec(_codes[module.__name__][0], module.__dict__)


class _BundleFinder:
    """First on sys.meta_path: the bundle's modules; None (the next finder) for every other one."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        entry = _codes.get(name)
        if entry is None:
            return None
        # the class serves as the loader (its methods are static): importlib.abc.Loader, which the
        # stubs ask for, would be one more import at every start
        spec = ModuleSpec(name, _BundleLoader, origin=entry[2], is_package=entry[1])  # type: ignore[arg-type]
        if entry[1]:
            spec.submodule_search_locations = [os.path.dirname(entry[2])]
        spec.has_location = True  # __file__ is the source, for tracebacks and messages
        spec.cached = entry[3]  # recorded: computing __cached__ from the source costs ~2 us a module
        return spec


def use(directory: str, packages: str, action: str | None) -> str | None:
    """Serve this run's imports of our modules from the bundle in `directory` (laid for
    `packages`); None if it is used, else why not (nothing changed then). A remove unmarshals
    only the first section: remove's graph, which holds nothing of add's."""
    from _frozen_importlib_external import MAGIC_NUMBER

    try:
        held = os.stat(directory)
        fd = os.open(os.path.join(directory, NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            for what, st in ((directory, held), (NAME, os.fstat(fd))):
                if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                    raise PermissionError(f"{what}: owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}")
            data = f.read()
        written_for, stats, sections = parts(data, MAGIC_NUMBER)
        if written_for != packages:
            raise ValueError(f"written for {written_for}")
        for origin, size, mtime in stats:
            st = os.stat(origin)
            if st.st_size != size or st.st_mtime_ns != mtime:
                raise ValueError(f"{origin} changed")
        codes: dict[str, tuple[types.CodeType, bool, str, str]] = {}
        for section in sections[:1] if action == "remove" else sections:
            codes.update(marshal.loads(section))
        code_type = type(use.__code__)
        for code, _package, origin, cached in codes.values():
            if type(code) is not code_type or type(origin) is not str or type(cached) is not str:
                raise TypeError("not a bundle's entry")
    except Exception as exc:  # missing, stale, refused, truncated, corrupt: never fatal
        return f"{type(exc).__name__}: {exc}"
    _codes.update(codes)
    sys.meta_path.insert(0, _BundleFinder)
    return None


def parts(data: bytes, magic: bytes) -> tuple[str, tuple[tuple[str, int, int], ...], list[memoryview]]:
    """A bundle's package directory, (source, size, mtime_ns) of every module, and its sections
    still marshalled (views into `data`); ValueError/EOFError/TypeError for anything else."""
    head = FORMAT + magic
    if not data.startswith(head):
        raise ValueError("another interpreter's or format's header")
    view = memoryview(data)
    at = len(head) + 4
    size = int.from_bytes(view[len(head) : at], "little")
    written_for, stats, lengths = marshal.loads(view[at : at + size])
    at += size
    sections = []
    for length in lengths:
        sections.append(view[at : at + length])
        at += length
    if at != len(data):
        raise ValueError(f"{len(data)} bytes, not {at}")  # truncated, or more than was written
    return written_for, stats, sections


def start(directory: str, packages: str, argv: "Sequence[str]") -> None:
    """The laid script's first step: use the bundle, or import normally and write a fresh one.
    With `--write-bundle` (install-hooks) the process ends here, its status saying which."""
    action = argv[1] if len(argv) == 2 else None
    why = use(directory, packages, action)
    written = why is not None and renew(directory, packages, why)
    if action == "--write-bundle":
        sys.stderr.flush()
        os._exit(USED if why is None else WRITTEN if written else UNWRITTEN)


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
    Entry = tuple[str, bool, str, int, int, types.CodeType]


def collect(packages: str) -> "list[list[Entry]]":
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
    code = lean_code(origin)
    if type(code) is not type(_entry.__code__):
        raise ValueError(f"{name}: no code from {origin}")
    return name, spec.submodule_search_locations is not None, origin, st.st_size, st.st_mtime_ns, code


def lean_code(origin: str) -> "types.CodeType":
    """The code of the source `origin` as its .pyc holds it, less the docstrings (modules, classes,
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
    code: types.CodeType = compile(tree, origin, "exec", flags=flags, dont_inherit=True)
    return code


def encode(packages: str, sections: "list[list[Entry]]") -> bytes:
    """The bundle's bytes after FORMAT and the magic number (the layout at FORMAT)."""
    from _frozen_importlib_external import cache_from_source

    stats = tuple(
        (origin, size, mtime) for section in sections for _n, _p, origin, size, mtime, _c in section
    )
    blobs = [
        marshal.dumps(
            {
                name: (code, package, origin, cache_from_source(origin))
                for name, package, origin, _s, _m, code in section
            }
        )
        for section in sections
    ]
    index = marshal.dumps((packages, stats, tuple(len(blob) for blob in blobs)))
    return len(index).to_bytes(4, "little") + index + b"".join(blobs)


def write(directory: str, packages: str) -> int:
    """Write the bundle of ROOTS' closure from `packages` into `directory`, atomically; returns the
    number of modules. Raises Refused or OSError/ValueError."""
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
    from xenblockctl.journal import Journal

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
