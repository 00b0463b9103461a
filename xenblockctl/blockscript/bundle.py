"""The hotplug bundle: the code of every module `add` and `remove` import, in one checked file.

A VM start spent ~2 ms of CPU finding, checking and reading ~37 .pyc files (bench/README.md,
issue 18). The laid block script (hotplug/block-xenblockctl) calls start(), which reads this one
file instead and puts a finder for its modules first on sys.meta_path; every other module imports
normally. For `add` and `remove`, which import every module of their graph, it then runs them all
before main, in the order a fresh import finishes them (preload: the import system's per-module
work skipped, ~0.2 ms). The bundle is used only if all of it checks out, as a .pyc is checked:
  * its directory and the file are owned by the running uid and writable by nobody else: root
    runs the script, and a bundle someone else can write is code injection;
  * it was written by this interpreter (its bytecode magic number, checked before unmarshalling:
    another version's marshal data is never decoded) from the package directory the script was
    laid for;
  * every source still has the size and mtime_ns recorded (one stat each): an edit or an upgrade
    misses.
Anything else (missing, stale, refused, truncated, corrupt): normal imports for that run, and a
fresh bundle is written and the reason logged. Correctness never depends on the bundle.

The reader is this module, loaded from its .pyc by name, alone (the laid script; its packages then
come from the bundle), not code in the script: a script run as __main__ is compiled from source at
every start, and the ~60 lines of a reader cost 0.6-0.7 ms of compiling there against ~0.1 ms for
a module (bench/README.md, issue 18 round 6). It imports nothing at module level that the hotplug
path would not import anyway (os, sys, marshal), and holds nothing but the format and the reader:
its code is unmarshalled at every start. The writer (blockscript/bundlewriter.py) is imported on
a miss only.

Who writes it: `install-hooks` and the .deb's postinst (the script's `--write-bundle`), so the
first VM start is fast; and, after a miss, a writer the script starts in the background (its
`--renew-bundle`, bundlewriter.renew_later), never the add or remove itself: compiling the graph
costs far more than the whole action (on one TCG vCPU two concurrent first adds each compiling it
ran past libxl's 40 s: scenario 21, stop 37). The writer is a fresh process, so the bundle holds
exactly the closure of ROOTS whatever the run's action or target kind, runs at SCHED_IDLE, and
leaves the work to a writer already at it (a lock on the directory). Every writer writes a
temporary name in the directory and renames it over, so no reader sees half of one. Failing to
write is never an action's failure: it is logged with its reason and the actions import normally."""

# No `from __future__ import annotations` here (annotations naming typing-only names are quoted):
# the laid script imports this module normally, and it would be the only one to load __future__
# (lean_code compiles the bundle's modules with the flag instead of the statement).
import marshal
import posix
import sys

# importlib.machinery's and importlib.util's, loaded before any script runs
from _frozen_importlib import BuiltinImporter, ModuleSpec, module_from_spec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    import types
    from collections.abc import Callable, Sequence

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
#: What an add imports lazily on its other paths: a block device's sysfs lookups and the walk of
#: every backend (its sharing check), and the AUTOCLEAR hand-off to kernel blkback. The bundle's
#: last section holds them and what they import beyond ROOTS' closure; it is unmarshalled only
#: when one of them is first imported (_BundleFinder), so a file add handed to the engine and a
#: remove neither decode nor run them, and the other paths do not read their .pyc files
#: (bench/README.md, issue 18, class18).
LATER_ROOTS = (
    "xenblockctl.kernel.sysfs",
    "xenblockctl.xenstore.backends",
    "xenblockctl.blockscript.autoclear",
)
NAME = "hotplug.bundle"
#: The file starts with this and the interpreter's bytecode magic number, checked before any of it
#: is unmarshalled (another Python version's marshal data must never be decoded as code). Then the
#: index's length (4 bytes, little-endian), the index, marshalled: (package directory, ((source,
#: size, mtime_ns) for every module), (each section's length, ...), the names in the last section),
#: and three sections, each the marshalled {name: (code, is package, source, its .pyc path, the
#: built-in modules its body imports at its top level)} of a step of ROOTS and then of LATER_ROOTS,
#: the code without docstrings and function annotations (lean_code), in the order the modules
#: finished importing when it was written (preload runs them in that order). Sections are read in
#: place (no copy of ~350 KB), and only those the action needs, the last one only on demand.
FORMAT = b"xenblockctl-bundle 6 "
#: Where the bundle lives unless XENBLOCKCTL_CACHE_DIR says otherwise (hostfiles.Layout.cache_dir).
CACHE_DIR = "/var/cache/xenblockctl"
CACHE_DIR_ENV = "XENBLOCKCTL_CACHE_DIR"
IDENTIFIER = "block-xenblockctl"
#: The script's `--write-bundle` (install-hooks, postinst: writes even while another writer is at
#: it) and `--renew-bundle` (the writer a miss starts: leaves it to one already at it) exit with: the
#: bundle was good and used, a fresh one was written, none was written (the reason is logged).
USED, WRITTEN, UNWRITTEN = 0, 3, 1
WRITE, RENEW = "--write-bundle", "--renew-bundle"

if TYPE_CHECKING:
    #: (code, is package, source, .pyc path, the built-in modules its body imports at its top level)
    Entry = tuple[types.CodeType, bool, str, str, tuple[str, ...]]
#: name -> Entry of the bundle's modules this run may import
_codes: "dict[str, Entry]" = {}
#: The last section while it is still marshalled: its module names, and the section itself (a view
#: into the bundle's bytes), unmarshalled by the finder when one of those names is first imported.
_later: "list[tuple[frozenset[str], memoryview]]" = []
#: The bundle file in use (removed if its last section turns out not to decode)
_where: list[str] = []


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
        if entry is None and _later and name in _later[0][0]:
            _decode_later()
            entry = _codes.get(name)
        return None if entry is None else _spec(name, entry)


def _decode_later() -> None:
    """Unmarshal the last section (once) into _codes. It was read and stat-checked with the rest
    at the start; if it does not decode into a bundle's entries, its modules are imported normally
    and the bundle is removed, so the next start writes a fresh one (as for any bad bundle)."""
    _names, section = _later.pop()
    try:
        codes = _checked(marshal.loads(section))
    except Exception as exc:
        _unusable(f"{type(exc).__name__}: {exc}")
        return
    _codes.update(codes)


def _unusable(why: str) -> None:
    """The last section did not decode: logged, and the bundle removed (the next start writes a
    fresh one, as after any bad bundle); the action goes on with normal imports. A failure to
    remove it is no failure of the action."""
    from xenblockctl.journal import Journal  # loaded already: every action's graph holds it

    path = _where.pop() if _where else None
    if path is not None:
        try:  # noqa: SIM105 (contextlib is kept off the hotplug path)
            posix.unlink(path)
        except OSError:
            pass
    Journal(IDENTIFIER).warning(
        f"hotplug bundle's last section unusable ({why}): normal imports, {path} removed",
        CODE="bundle-unusable",
    )


def _spec(name: str, entry: "Entry") -> ModuleSpec:
    # the class serves as the loader (its methods are static): importlib.abc.Loader, which the
    # stubs ask for, would be one more import at every start
    spec = ModuleSpec(name, _BundleLoader, origin=entry[2], is_package=entry[1])  # type: ignore[arg-type]
    if entry[1]:
        spec.submodule_search_locations = [entry[2].rpartition("/")[0]]  # the source's directory
    spec.has_location = True  # __file__ is the source, for tracebacks and messages
    spec.cached = entry[3]  # recorded: computing __cached__ from the source costs ~2 us a module
    return spec


def _module(spec: ModuleSpec) -> "types.ModuleType":
    """module_from_spec(spec) for a spec of ours: the attributes the import system sets on a
    module (_bootstrap._init_module_attrs), in its order, without its checks for what other
    loaders and specs may lack (~4 us a module)."""
    module = type(sys)(spec.name)
    namespace = module.__dict__
    namespace["__loader__"] = _BundleLoader
    namespace["__package__"] = spec.parent
    namespace["__spec__"] = spec
    if spec.submodule_search_locations is not None:
        namespace["__path__"] = spec.submodule_search_locations
    namespace["__file__"] = spec.origin
    namespace["__cached__"] = spec.cached
    return module


def use(directory: str, packages: str, action: str | None) -> str | None:
    """Serve this run's imports of our modules from the bundle in `directory` (laid for
    `packages`); None if it is used, else why not (nothing changed then). A remove unmarshals
    only the first section: remove's graph, which holds nothing of add's; the last section waits
    until one of its modules is imported (LATER_ROOTS)."""
    from _frozen_importlib_external import MAGIC_NUMBER

    try:
        held = posix.stat(directory)
        fd = posix.open(f"{directory}/{NAME}", posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
        with open(fd, "rb") as f:
            for what, st in ((directory, held), (NAME, posix.fstat(fd))):
                if st.st_uid != posix.geteuid() or st.st_mode & 0o022:
                    raise PermissionError(f"{what}: owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}")
            data = f.read()
        written_for, stats, later, sections = parts(data, MAGIC_NUMBER)
        if written_for != packages:
            raise ValueError(f"written for {written_for}")
        for origin, size, mtime in stats:
            st = posix.stat(origin)
            if st.st_size != size or st.st_mtime_ns != mtime:
                raise ValueError(f"{origin} changed")
        codes: dict[str, Entry] = {}
        for section in sections[:1] if action == "remove" else sections[:2]:
            codes.update(marshal.loads(section))
        _checked(codes)
        if type(later) is not tuple or not all(type(name) is str for name in later):
            raise TypeError("not a bundle's index")
    except Exception as exc:  # missing, stale, refused, truncated, corrupt: never fatal
        return f"{type(exc).__name__}: {exc}"
    _codes.update(codes)
    _later.append((frozenset(later), sections[2]))
    _where.append(f"{directory}/{NAME}")
    sys.meta_path.insert(0, _BundleFinder)
    return None


def _checked(codes: "dict[str, Entry]") -> "dict[str, Entry]":
    """`codes` if every value is a bundle's entry, else TypeError."""
    code_type = type(use.__code__)
    builtins: set[object] = set()
    for code, _package, origin, cached, imported in codes.values():
        if type(code) is not code_type or type(origin) is not str or type(cached) is not str:
            raise TypeError("not a bundle's entry")
        if type(imported) is not tuple:
            raise TypeError("not a bundle's entry")
        builtins.update(imported)
    # a name that is not built in would become an empty module (BuiltinImporter makes none)
    if not builtins.issubset(sys.builtin_module_names):
        raise TypeError(f"not built-in modules: {sorted(map(str, builtins - set(sys.builtin_module_names)))}")
    return codes


def preload(skip: str | None = None) -> None:
    """Import every module use() read but `skip` now, in the bundle's order: the order they finished
    importing when it was written, so each module's own imports are done before its body runs.
    main imports all of them anyway (`skip` is remove's own module on an add, the one module of
    remove's graph an add never imports; tests/lint checks both lists against the measured
    graphs); run here, each costs its body and not the import system's per-module Python work as
    well (module lock, finder search, spec bookkeeping: ~0.2 ms of an add; bench/README.md, issue
    18 round 9). The built-in modules a body imports at its top level (errno, _socket, ...: the
    bundle names them) are imported just before it the same way, without the module lock and the
    meta-path search (~14 us each; issue 18, start18). What the import system does is kept: our
    finder's spec, the attributes module_from_spec sets, the module in sys.modules while its body
    runs, then set on its package, and the lines of python -v and -X importtime. Anything
    unexpected hands the rest back to the import system: a package not yet imported, or a body
    (or a built-in module's init) that raises (its module leaves sys.modules again, as the import
    system does, and the import that needs it runs it again and raises there, in the action's own
    error handling: nothing is lost or doubled)."""
    modules = sys.modules
    verbose = sys.flags.verbose
    # -X importtime's line per module too (the C import code writes it, and it is not run here)
    clock: Callable[[], int] | None = None
    if "importtime" in sys._xoptions or (
        not sys.flags.ignore_environment and posix.environ.get(b"PYTHONPROFILEIMPORTTIME")
    ):
        from time import perf_counter_ns as clock
    # a snapshot: nothing of sections 0 and 1 imports the last section's modules at its top level
    # (they are outside ROOTS' closure), but a dict that grew during the loop would stop it
    for name, entry in tuple(_codes.items()):
        if name == skip or name in modules:
            continue
        parent, _, child = name.rpartition(".")
        if parent and parent not in modules:
            return
        try:
            for builtin in entry[4]:
                if builtin not in modules:
                    _builtin(builtin, verbose, clock)
        except Exception:
            return  # the import system tries it again where the body imports it, and raises there
        began = 0 if clock is None else clock()
        spec = _spec(name, entry)
        module = _module(spec)
        modules[name] = module
        spec._initializing = True  # type: ignore[attr-defined]  # what _bootstrap sets while a body runs
        try:
            exec(entry[0], module.__dict__)
        except BaseException as exc:
            del modules[name]
            if not isinstance(exc, Exception):
                raise  # an interrupt stops the script here as it would stop any import
            return
        finally:
            spec._initializing = False  # type: ignore[attr-defined]
        if parent:
            setattr(modules[parent], child, module)
        if verbose:
            print(f"import {name!r} # {_BundleLoader!r}", file=sys.stderr)
        if clock is not None:
            took = (clock() - began) // 1000  # its own imports' lines come from the C code
            print(f"import time: {took:9} | {took:10} | {name}", file=sys.stderr)


def _builtin(name: str, verbose: int, clock: "Callable[[], int] | None") -> None:
    """Import the built-in module `name` as the import system does (BuiltinImporter's spec, the
    module in sys.modules while it executes, python -v's and -X importtime's lines) without its
    per-module Python work: the module lock and the meta-path search, which found nothing in the
    bundle before asking BuiltinImporter. ~14 us a module; an add and a remove import seven
    (errno, _socket, select, fcntl, _struct, _stat, _operator; bench/README.md, issue 18, start18)."""
    began = 0 if clock is None else clock()
    module = module_from_spec(ModuleSpec(name, BuiltinImporter, origin="built-in"))  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        BuiltinImporter.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    if verbose:
        print(f"import {name!r} # {BuiltinImporter!r}", file=sys.stderr)
    if clock is not None:
        took = (clock() - began) // 1000
        print(f"import time: {took:9} | {took:10} | {name}", file=sys.stderr)


def parts(
    data: bytes, magic: bytes
) -> tuple[str, tuple[tuple[str, int, int], ...], tuple[str, ...], list[memoryview]]:
    """A bundle's package directory, (source, size, mtime_ns) of every module, the names in its
    last section and its three sections still marshalled (views into `data`);
    ValueError/EOFError/TypeError for anything else."""
    head = FORMAT + magic
    if not data.startswith(head):
        raise ValueError("another interpreter's or format's header")
    view = memoryview(data)
    at = len(head) + 4
    size = int.from_bytes(view[len(head) : at], "little")
    written_for, stats, lengths, later = marshal.loads(view[at : at + size])
    if len(lengths) != 3:
        raise ValueError(f"{len(lengths)} sections, not 3")
    at += size
    sections = []
    for length in lengths:
        sections.append(view[at : at + length])
        at += length
    if at != len(data):
        raise ValueError(f"{len(data)} bytes, not {at}")  # truncated, or more than was written
    return written_for, stats, later, sections


def start(directory: str, packages: str, argv: "Sequence[str]") -> None:
    """The laid script's first step: use the bundle, or import normally and have a fresh one
    written (by a background writer for an add or a remove, which are on libxl's critical path;
    here for anything else). With WRITE or RENEW the process ends here, its status saying which."""
    action = argv[1] if len(argv) == 2 else None
    why = use(directory, packages, action)
    if why is None and action in ("add", "remove"):
        # every module of the action's graph is imported by main anyway: run them all now
        preload(skip=REMOVE_ROOTS[-1] if action == "add" else None)
    written = False
    if why is not None:
        from xenblockctl.blockscript import bundlewriter  # the writer: only on a miss

        if action in ("add", "remove"):
            bundlewriter.renew_later(directory, argv[0], action, why)
        else:
            written = bundlewriter.renew(directory, packages, why, background=action == RENEW)
    if action in (WRITE, RENEW):
        sys.stderr.flush()
        posix._exit(USED if why is None else WRITTEN if written else UNWRITTEN)
