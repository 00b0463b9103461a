"""The laid block script's hotplug bundle (xenblockctl/blockscript/bundle.py, the shim's loader).

Each test lays the block script as `install-hooks` does, for a copy of the package in a temporary
directory (so sources can be edited) and a bundle directory of its own, and runs it as a process.
The action is a usage error (exit 2, `usage: <IDENTIFIER> ...`): the bundle is read or written
before any action runs, and the line shows which code ran (tests/cli/test_install.py runs a real
add and remove through a bundle). Whether the bundle was used is read from the import system's
own trace (PYTHONVERBOSE names each module's loader), not from timing."""

from __future__ import annotations

import ast
import fcntl
import importlib.util
import marshal
import os
import shutil
import signal
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.fixtures.libxl import wait_gone
from xenblockctl.blockscript import bundle, hotplug
from xenblockctl.toolstack import hostfiles

REPO = Path(__file__).resolve().parents[2]
HEAD = len(bundle.FORMAT) + 4  # the format tag and the interpreter's magic number
#: Imported from its own file (by name, before its packages: they come from the bundle).
READER = {bundle.__name__}


class Laid(NamedTuple):
    script: Path
    packages: Path
    cache: Path

    @property
    def bundle(self) -> Path:
        return self.cache / bundle.NAME


class Ran(NamedTuple):
    returncode: int
    stderr: str

    @property
    def from_bundle(self) -> set[str]:
        """The modules the bundle's loader imported (python -v: `import 'name' # <loader>`)."""
        return {
            line.split("'")[1]
            for line in self.stderr.splitlines()
            if line.startswith("import '") and "_BundleLoader" in line
        }

    @property
    def bundle_order(self) -> list[str]:
        """from_bundle in the order the modules were imported."""
        return [
            line.split("'")[1]
            for line in self.stderr.splitlines()
            if line.startswith("import '") and "_BundleLoader" in line
        ]

    @property
    def ours_imported(self) -> set[str]:
        return {
            line.split("'")[1] for line in self.stderr.splitlines() if line.startswith("import 'xenblockctl")
        }

    @property
    def log(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "hotplug bundle" in line]


@pytest.fixture
def laid(tmp_path: Path) -> Laid:
    packages = tmp_path / "packages"
    shutil.copytree(
        REPO / "xenblockctl", packages / "xenblockctl", ignore=shutil.ignore_patterns("__pycache__")
    )
    cache = tmp_path / "cache"
    where = hostfiles.local_layout()._replace(packages=str(packages), cache_dir=str(cache))
    script = tmp_path / hostfiles.SCRIPT_NAME
    script.write_text(hostfiles.block_script((REPO / "hotplug" / hostfiles.SCRIPT_NAME).read_text(), where))
    script.chmod(0o755)
    return Laid(script, packages, cache)


def run(laid: Laid, *argv: str, env: dict[str, str] | None = None) -> Ran:
    done = subprocess.run(
        [str(laid.script), *(argv or ("bogus",))],
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONVERBOSE": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Ran(done.returncode, done.stderr)


def usage_ok(ran: Ran, identifier: str = "block-xenblockctl") -> None:
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert f"{identifier}: usage: {identifier} add|remove (got 'bogus')" in ran.stderr, ran.stderr[-2000:]


def logged_once(ran: Ran, text: str) -> None:
    assert len(ran.log) == 1, ran.log
    assert text in ran.log[0], ran.log


def missed(laid: Laid, text: str = "hotplug bundle written", identifier: str = "block-xenblockctl") -> Ran:
    """A run that did not use the bundle, did its action all the same, and logged `text` once."""
    ran = run(laid)
    usage_ok(ran, identifier)
    assert not ran.from_bundle, "this bundle must not be used"
    logged_once(ran, text)
    return ran


def ours_alone(path: Path, mode: int) -> None:
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (os.geteuid(), mode)


def test_first_run_writes_the_bundle_and_the_second_uses_it(laid: Laid) -> None:
    first = missed(laid, "hotplug bundle written: 42 modules")
    ours_alone(laid.bundle, 0o644)
    ours_alone(laid.cache, 0o755)
    st = laid.bundle.stat()

    second = run(laid)
    usage_ok(second)
    assert second.log == [], "a good bundle is used silently"
    # every module of ours the run imported came from the bundle but its reader, loaded from its
    # file before the bundle is open; its packages too (no path finder lists their directory); the
    # miss imported the whole graph
    assert second.from_bundle == second.ours_imported - READER
    assert {"xenblockctl", "xenblockctl.blockscript"} <= second.from_bundle
    assert second.from_bundle < first.ours_imported
    assert "xenblockctl.blockscript.hotplug" in second.from_bundle
    assert laid.bundle.stat().st_mtime_ns == st.st_mtime_ns, "a used bundle is not rewritten"


def test_the_bundle_holds_the_code_without_docstrings_and_function_annotations(laid: Laid) -> None:
    """Unmarshalling is the bundle's largest cost at every start and grows with its bytes, of which
    docstrings and function annotations were ~22 % (bench/README.md, issue 18 round 7): the bundle
    holds each module's code without them, and without its __future__ import (a flag instead).
    What runs is the same: the same functions and classes at the same source lines, records keep
    their fields (class annotations stay), asserts stay."""
    usage_ok(run(laid))
    data = laid.bundle.read_bytes()
    _, _, _, sections = bundle.parts(data, data[len(bundle.FORMAT) : HEAD])
    codes = {name: entry[0] for section in sections for name, entry in marshal.loads(section).items()}
    namespace: dict[str, object] = {"__name__": "probe"}
    exec(codes["xenblockctl.blockscript.hotplug"], namespace)
    main = namespace["main"]
    assert isinstance(main, types.FunctionType)
    assert namespace.get("__doc__") is None  # a module run without a docstring sets none
    assert main.__doc__ is None
    assert main.__annotations__ == {}
    assert main.__code__.co_firstlineno == hotplug.main.__code__.co_firstlineno
    exec(codes["xenblockctl.blockscript.remove"], namespace)
    result = namespace["RemoveResult"]
    assert result._fields == ("detached",)  # type: ignore[attr-defined]
    # `from __future__ import annotations` is a compiler flag there: the same (string) annotations,
    # and a start from the bundle never loads the __future__ module
    assert result.__annotations__ == {"detached": "str"}
    assert "annotations" not in namespace
    used = run(laid)
    assert "xenblockctl.blockscript.hotplug" in used.from_bundle
    assert "import '__future__'" not in used.stderr
    # the bundle is smaller than the .pyc code it stands for by about that share
    assert len(data) < 0.85 * sum(len(marshal.dumps(get_code(name))) for name in codes)


def get_code(name: str) -> types.CodeType:
    spec = importlib.util.find_spec(name)
    assert spec is not None
    assert spec.loader is not None
    code = spec.loader.get_code(name)  # type: ignore[attr-defined]
    assert isinstance(code, types.CodeType)
    return code


def test_a_start_from_the_bundle_unmarshals_no_writer(laid: Laid) -> None:
    """The reader's own .pyc is read and unmarshalled at every start, before the bundle: it holds
    the format and the reader only; the writer is a module of its own, imported on a miss only."""
    usage_ok(run(laid))
    used = run(laid)
    usage_ok(used)
    assert "xenblockctl.blockscript.hotplug" in used.from_bundle
    assert "xenblockctl.blockscript.bundlewriter" not in used.ours_imported
    assert not {"collect", "encode", "lean_code", "renew", "write"} & set(vars(bundle))


@pytest.mark.parametrize("change", ["size", "mtime"])
def test_an_edited_source_falls_back_rewrites_and_runs_the_new_code(laid: Laid, change: str) -> None:
    usage_ok(run(laid))
    source = laid.packages / "xenblockctl" / "blockscript" / "hotplug.py"
    text = source.read_text()
    if change == "size":
        source.write_text(text.replace('IDENTIFIER = "block-xenblockctl"', 'IDENTIFIER = "block-edited"'))
        identifier = "block-edited"
    else:  # same size, other code: only the mtime tells (as for a .pyc)
        source.write_text(
            text.replace('IDENTIFIER = "block-xenblockctl"', 'IDENTIFIER = "block-xenblockctX"')
        )
        identifier = "block-xenblockctX"
        st = source.stat()
        assert st.st_size == len(text.encode())
    missed(laid, f"{source} changed", identifier)  # a changed source is never served from the bundle
    again = run(laid)
    usage_ok(again, identifier)
    assert "xenblockctl.blockscript.hotplug" in again.from_bundle, "the rewritten bundle has the new code"


def _sections(data: bytes) -> list[bytes]:
    return [bytes(section) for section in bundle.parts(data, data[len(bundle.FORMAT) : HEAD])[3]]


def _rebuilt(data: bytes, *, packages: str | None = None, sections: list[bytes] | None = None) -> bytes:
    """The bundle `data` with its package directory or sections replaced (the layout at bundle.FORMAT)."""
    old_packages, stats, later, _ = bundle.parts(data, data[len(bundle.FORMAT) : HEAD])
    blobs = _sections(data) if sections is None else sections
    index = marshal.dumps((packages or old_packages, stats, tuple(len(blob) for blob in blobs), later))
    return data[:HEAD] + len(index).to_bytes(4, "little") + index + b"".join(blobs)


def _naming_a_file_module(data: bytes) -> bytes:
    """The first section with its first module's built-in imports naming a module that is not built
    in (json: a file), which BuiltinImporter would turn into an empty module."""
    first, *rest = _sections(data)
    entries = marshal.loads(first)
    name = next(iter(entries))
    entries[name] = (*entries[name][:4], ("json",))
    return _rebuilt(data, sections=[marshal.dumps(entries), *rest])


def _corrupt(data: bytes) -> bytes:
    return data[:HEAD] + bytes(b ^ 0x5A for b in data[HEAD : HEAD + 4096]) + data[HEAD + 4096 :]


BAD: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "header only": lambda data: data[:HEAD],
    "wrong magic": lambda data: data[: len(bundle.FORMAT)] + b"\x00\x00\r\n" + data[HEAD:],
    "other format": lambda data: b"xenblockctl-bundle 0 " + data[len(bundle.FORMAT) :],
    "corrupt": _corrupt,
    "not a bundle's structure": lambda data: data[:HEAD] + marshal.dumps(("x", (1, 2))),
    "not a bundle's entries": lambda data: _rebuilt(
        data, sections=[marshal.dumps({"xenblockctl": (1, 2, 3)}), *_sections(data)[1:]]
    ),
    "a module not built in named as built in": _naming_a_file_module,
    "more than was written": lambda data: data + b"\0",
    "other package directory": lambda data: _rebuilt(data, packages="/elsewhere"),
    "add's section corrupt": lambda data: _rebuilt(
        data, sections=[_sections(data)[0], b"\xff" * 99, _sections(data)[2]]
    ),
    "two sections": lambda data: _rebuilt(data, sections=_sections(data)[:2]),
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_a_bad_bundle_falls_back_and_is_rewritten(laid: Laid, damage: str) -> None:
    usage_ok(run(laid))
    laid.bundle.write_bytes(BAD[damage](laid.bundle.read_bytes()))
    missed(laid)
    assert "xenblockctl.blockscript.hotplug" in run(laid).from_bundle


def test_remove_unmarshals_only_its_own_section(laid: Laid) -> None:
    """remove imports nothing of add's (tests/lint), so it reads only the bundle's first section:
    with add's section unreadable, a remove still runs from the bundle, and an add falls back."""
    usage_ok(run(laid))
    laid.bundle.write_bytes(BAD["add's section corrupt"](laid.bundle.read_bytes()))
    remove = run(laid, "remove")  # no XENBUS_PATH: main's coded error, after remove's imports
    assert remove.returncode == 1, remove.stderr[-2000:]
    assert "xenbus-path-invalid" in remove.stderr
    assert remove.log == []
    assert "xenblockctl.blockscript.hotplug" in remove.from_bundle
    add = run(laid, "add")
    assert add.returncode == 1, add.stderr[-2000:]
    assert not add.from_bundle
    finished(writer_of(add))
    assert "xenblockctl.blockscript.hotplug" in run(laid, "add").from_bundle


def writer_of(ran: Ran) -> int:
    """The pid of the background writer an add's or a remove's miss started (its one log line)."""
    logged_once(ran, "normal imports; writer ")
    return int(ran.log[0].split("writer ")[1].split()[0])


def policy(pid: int) -> int | None:
    """The scheduling policy of `pid` (/proc/PID/stat field 41), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else int(fields[38])


def finished(pid: int, timeout: float = 60) -> None:
    """Wait for a writer (not our child: the script that started it has exited) to be gone. It
    runs at SCHED_IDLE, which a host busy with other tests (CI runs a Xen lane beside them) may
    starve for minutes: its policy is put back to the normal one first, so the wait is bounded."""
    try:
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    except ProcessLookupError:
        return
    wait_gone(pid, timeout)


@pytest.mark.parametrize("action", ["add", "remove"])
def test_an_add_or_remove_miss_imports_normally_and_leaves_the_writing_to_an_idle_writer(
    laid: Laid, action: str
) -> None:
    """An add and a remove are on libxl's critical path (40 s, then SIGKILL): on a miss they import
    normally and a writer of their own session compiles the bundle at SCHED_IDLE, after them
    (two first adds each compiling the graph ran past libxl's timeout on a driver domain's one
    vCPU: scenario 21, stop 37). The run compiles nothing (no ast, no writer's code) and does not
    wait for the writer: its stderr pipe is not the writer's."""
    ran = run(laid, action)
    assert ran.returncode == 1, ran.stderr[-2000:]
    assert "xenbus-path-invalid" in ran.stderr, "the action ran"
    assert not ran.from_bundle
    assert "import 'ast'" not in ran.stderr, "nothing was compiled on the action's path"
    pid = writer_of(ran)
    assert "FileNotFoundError" in ran.log[0], "the reason it was not used"
    seen: set[int | None] = set()
    deadline = time.monotonic() + 30
    while (now := policy(pid)) is not None and now != os.SCHED_IDLE and time.monotonic() < deadline:
        seen.add(now)
    seen.add(now)  # SCHED_IDLE, or None if it was gone before it was seen so
    assert os.SCHED_IDLE in seen, f"the writer ran with policies {seen}"
    finished(pid)
    assert not (laid.cache / f".{bundle.NAME}.{pid}.tmp").exists()
    used = run(laid, action)
    assert used.log == [], "a good bundle is used silently"
    assert "xenblockctl.blockscript.hotplug" in used.from_bundle


def test_one_background_writer_at_a_time(laid: Laid) -> None:
    """The writers' lock: a background writer leaves the bundle to one already at it (exit 1,
    logged); `--write-bundle` (install-hooks, the postinst) writes regardless, at once, rather than
    wait for a writer at SCHED_IDLE that a busy host may starve (each renames a whole file over)."""
    laid.cache.mkdir(mode=0o755)
    lock = os.open(laid.cache, os.O_RDONLY | os.O_DIRECTORY)  # the writers' lock: the directory
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        renew = run(laid, bundle.RENEW)
        assert renew.returncode == bundle.UNWRITTEN, renew.stderr[-2000:]
        held = f"another writer holds the lock on {laid.cache}"
        assert renew.log == [f"block-xenblockctl: hotplug bundle not written here: {held}"]
        assert not laid.bundle.exists()
        wrote = run(laid, bundle.WRITE)
        assert wrote.returncode == bundle.WRITTEN, wrote.stderr[-2000:]
    finally:
        os.close(lock)
    assert "xenblockctl.blockscript.hotplug" in run(laid).from_bundle


def _held(laid: Laid) -> list[list[str]]:
    """The names in each section of the laid bundle, in its order."""
    return [list(marshal.loads(section)) for section in _sections(laid.bundle.read_bytes())]


def test_an_action_imports_its_whole_graph_from_the_bundle_before_main_runs(laid: Laid) -> None:
    """bundle.preload: main imports every module of its action's graph, so the reader runs them
    all before main, in the bundle's order (the order a fresh import finished them), without the
    import system's per-module work. Without XENBUS_PATH main fails before its lazy imports (the
    client, the action's module), yet the whole graph came from the bundle: an add's is the
    bundle less remove's own module, a remove's its own section (nothing of add's)."""
    usage_ok(run(laid))
    first, second, _later = _held(laid)
    assert first[:2] == ["xenblockctl", "xenblockctl.blockscript"], first
    assert first.index("xenblockctl.errors") < first.index("xenblockctl.blockscript.hotplug")
    expected = {
        "add": [name for name in first if name != bundle.REMOVE_ROOTS[-1]] + second,
        "remove": first,
    }
    for action, graph in expected.items():
        ran = run(laid, action)
        assert ran.returncode == 1, ran.stderr[-2000:]
        assert "xenbus-path-invalid" in ran.stderr, ran.stderr[-2000:]
        assert ran.log == []
        assert ran.bundle_order == graph, action
        assert ran.ours_imported - READER == set(graph), action


@pytest.mark.parametrize("package", [True, False])
def test_a_preloaded_module_gets_what_the_import_system_gives_it(package: bool) -> None:
    """preload makes a module without module_from_spec's generic checks: the same attributes, in
    the same order, for the spec our finder gives."""
    name = "xenblockctl.xenstore" if package else "xenblockctl.xenstore.wire"
    origin = f"/srv/packages/{name.replace('.', '/')}{'/__init__' if package else ''}.py"
    entry = (get_code(name), package, origin, f"{origin}c", ())
    spec = bundle._spec(name, entry)
    ours, theirs = bundle._module(spec), importlib.util.module_from_spec(spec)
    assert list(vars(ours).items()) == list(vars(theirs).items())


#: Run in a fresh `python -S` (argv: the laid packages and bundle directory, the action): the
#: reader's use() and preload() as the laid script calls them, with a finder after the bundle's
#: that records every name the import system searches sys.meta_path for (the bundle's finder
#: answers for our modules, BuiltinImporter for built-in ones; extension modules in files, as
#: _socket is in some builds, are still found by the path finder); it prints the built-in ones.
PRELOAD_SPY = """
import sys
packages, cache, action = sys.argv[1:]
sys.path.append(packages)
from xenblockctl.blockscript import bundle
asked = []
class Spy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        asked.append(name)
assert bundle.use(cache, packages, action) is None
sys.meta_path.insert(1, Spy)
bundle.preload(skip=bundle.REMOVE_ROOTS[-1] if action == "add" else None)
built_in = sys.builtin_module_names
print(repr(([n for n in asked if n in built_in], [n for n in sys.modules if n in built_in])))
"""


def test_an_action_imports_its_built_in_modules_without_searching_for_them(laid: Laid) -> None:
    """The bundle names, for each module, the built-in modules its top level imports (errno, _stat,
    _operator, and with Debian's python3 _socket, _struct, select, fcntl: ~14 us each through the
    import system's lock and meta-path search); preload imports them itself before the body that
    needs them. So no built-in module is searched for while an action's graph is preloaded, and
    those its bodies import are there afterwards. Before: each one was searched for."""
    usage_ok(run(laid))
    for action in ("add", "remove"):
        done = subprocess.run(
            [
                hostfiles.local_layout().python,
                "-S",
                "-c",
                PRELOAD_SPY,
                str(laid.packages),
                str(laid.cache),
                action,
            ],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        asked, builtins = ast.literal_eval(done.stdout)
        assert asked == [], f"{action}: the import system searched for {asked}"
        assert {"errno", "_stat", "_operator"} <= set(builtins), builtins


#: Run in a fresh `python -S` (argv: the laid packages and bundle directory): an add's use() and
#: preload(), then the modules of the bundle's last section imported as a block-device add imports
#: them; prints which of them were there before, the loader each came from and whether the last
#: section was still undecoded before the import.
LATER_SPY = """
import sys
packages, cache = sys.argv[1:]
sys.path.append(packages)
from xenblockctl.blockscript import bundle
assert bundle.use(cache, packages, "add") is None
bundle.preload(skip=bundle.REMOVE_ROOTS[-1])
before = [name for name in bundle.LATER_ROOTS if name in sys.modules]
pending = len(bundle._later)
for name in bundle.LATER_ROOTS:
    __import__(name)
# our loader is the class itself (bundle._spec); the path finder's is an instance
loaders = [getattr(loader, "__name__", type(loader).__name__)
           for loader in (sys.modules[name].__loader__ for name in bundle.LATER_ROOTS)]
print(repr((before, pending, loaders, len(bundle._later))))
"""


def _later_spy(laid: Laid) -> tuple[tuple[list[str], int, list[str], int], str]:
    """LATER_SPY's findings, and its stderr."""
    done = subprocess.run(
        [hostfiles.local_layout().python, "-S", "-c", LATER_SPY, str(laid.packages), str(laid.cache)],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found: tuple[list[str], int, list[str], int] = ast.literal_eval(done.stdout.splitlines()[-1])
    return found, done.stderr


def test_the_last_section_is_decoded_only_when_a_block_device_add_imports_it(laid: Laid) -> None:
    """bundle.LATER_ROOTS (the sysfs lookups, the walk of every backend, the kernel path's
    AUTOCLEAR hand-off) are imported lazily by a block-device or kernel-path add only: a file add
    handed to the engine and a remove neither unmarshal nor run them, yet when they are imported
    they come from the bundle (its last section, decoded then), not from their .pyc."""
    usage_ok(run(laid))
    (before, pending, loaders, left), _ = _later_spy(laid)
    assert before == [], "nothing of the last section is imported before its own import"
    assert pending == 1, "the last section is still marshalled after an add's preload"
    assert loaders == ["_BundleLoader"] * len(bundle.LATER_ROOTS), loaders
    assert left == 0


def test_a_last_section_that_does_not_decode_is_logged_imported_normally_and_the_bundle_removed(
    laid: Laid,
) -> None:
    """The last section is checked only when it is decoded: if it is bad then, its modules are
    imported from their files, the reason is logged, and the bundle removed so the next start
    writes a fresh one."""
    usage_ok(run(laid))
    first, second, _later = _sections(laid.bundle.read_bytes())
    laid.bundle.write_bytes(_rebuilt(laid.bundle.read_bytes(), sections=[first, second, b"\xff" * 99]))
    (before, pending, loaders, left), stderr = _later_spy(laid)
    assert (before, pending, left) == ([], 1, 0)
    assert "_BundleLoader" not in loaders, loaders
    assert "hotplug bundle's last section unusable (ValueError: bad marshal data" in stderr, stderr
    assert not laid.bundle.exists()
    missed(laid)  # the next start writes a fresh one
    usage_ok(run(laid))


def test_a_preloaded_built_in_module_gets_what_the_import_system_gives_it() -> None:
    """bundle._builtin makes a built-in module as the import system does: the same attributes (the
    spec BuiltinImporter.find_spec gives, its loader, package), in sys.modules. Compared in fresh
    processes, since a built-in module is made once per process."""
    show = "print(sorted((k, repr(v)) for k, v in vars(sys.modules['errno']).items() if k.startswith('__')))"
    python = hostfiles.local_layout().python
    imported = subprocess.run(
        [python, "-S", "-c", f"import sys, errno; {show}"], capture_output=True, text=True, check=True
    )
    preloaded = subprocess.run(
        [
            python,
            "-S",
            "-c",
            f"import sys; sys.path.append({str(REPO)!r}); from xenblockctl.blockscript import bundle; "
            f"bundle._builtin('errno', 0, None); {show}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "ModuleSpec(name='errno'" in imported.stdout
    assert preloaded.stdout == imported.stdout


def test_the_bundle_names_only_the_built_in_modules_a_body_imports_at_its_top_level(tmp_path: Path) -> None:
    """What preload imports before a body must be what the body would import anyway: its own
    top-level import statements, not one under `if TYPE_CHECKING`, `try` or in a function, and
    no module that is not built in."""
    from xenblockctl.blockscript import bundlewriter

    source = tmp_path / "mod.py"
    source.write_text(
        "import errno, marshal as m\n"
        "import _stat\n"
        "from _operator import itemgetter\n"
        "from errno import ENOENT\n"
        "import json\n"
        "from . import sibling\n"
        "TYPE_CHECKING = False\n"
        "if TYPE_CHECKING:\n"
        "    import _thread\n"
        "try:\n"
        "    import _signal\n"
        "except ImportError:\n"
        "    pass\n"
        "def f():\n"
        "    import _abc\n"
    )
    _code, builtins = bundlewriter.lean_code(str(source))
    assert builtins == ("errno", "marshal", "_stat", "_operator")


def test_a_module_that_raises_during_preload_raises_where_it_is_imported(laid: Laid) -> None:
    """A body that raises while the reader preloads (here only when the run's environment says
    so: the bundle itself was written by a run that imported it) hands the rest to the import
    system: the module leaves sys.modules, the import that needs it (hotplug's, here) runs the
    body again, and its error ends the run there, once, as without a bundle."""
    source = laid.packages / "xenblockctl" / "environment.py"
    text = source.read_text()
    broken_body = 'if posix.environ.get(b"BREAK_ENVIRONMENT"):\n    raise RuntimeError("broken body")\n'
    source.write_text(f"{text}\n{broken_body}")
    usage_ok(run(laid))
    usage_ok(run(laid))
    broken = run(laid, "add", env={"BREAK_ENVIRONMENT": "1"})
    assert broken.returncode == 1, broken.stderr[-2000:]
    assert broken.stderr.count("RuntimeError: broken body") == 1, broken.stderr[-2000:]
    assert "from xenblockctl.blockscript.hotplug import main" in broken.stderr, broken.stderr[-2000:]
    assert broken.log == [], "the bundle was good: used, not rewritten"
    first = _held(laid)[0]
    assert broken.bundle_order == first[: first.index("xenblockctl.environment")], "preloaded up to it"


@pytest.mark.root
@pytest.mark.parametrize("how", ["directory group-writable", "directory other-writable", "directory foreign"])
def test_a_directory_others_can_write_is_refused_and_logged(laid: Laid, how: str) -> None:
    usage_ok(run(laid))
    before = laid.bundle.stat().st_mtime_ns
    if how == "directory foreign":
        os.chown(laid.cache, 65534, 65534)
    else:
        laid.cache.chmod(0o775 if "group" in how else 0o757)
    missed(laid, "hotplug bundle refused, not written")  # one others could have written: code injection
    assert laid.bundle.stat().st_mtime_ns == before, "nothing is written where it would be refused"


@pytest.mark.root
@pytest.mark.parametrize("how", ["file foreign", "file group-writable"])
def test_a_bundle_others_can_write_is_not_used_and_replaced(laid: Laid, how: str) -> None:
    usage_ok(run(laid))
    if how == "file foreign":
        os.chown(laid.bundle, 65534, 65534)
    else:
        laid.bundle.chmod(0o664)
    missed(laid)
    ours_alone(laid.bundle, 0o644)
    assert "xenblockctl.blockscript.hotplug" in run(laid).from_bundle


def test_a_failed_write_is_logged_once_and_the_action_goes_on(laid: Laid) -> None:
    laid.cache.parent.mkdir(exist_ok=True)
    laid.cache.write_text("a file where the directory should be\n")
    for _ in range(2):
        ran = missed(laid, "hotplug bundle not written")
        assert "FileExistsError" in ran.log[0], ran.log


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (to kill the writer mid-write)")
@pytest.mark.parametrize("syscall", ["write", "rename"])
def test_a_writer_killed_mid_write_leaves_no_half_bundle(laid: Laid, syscall: str) -> None:
    """SIGKILL (strace's fault injection) at the bundle's write(2), or at its rename, when the
    whole bundle is written but not in place: nothing is ever under the bundle's name but a whole
    bundle, the next run falls back and writes one, and the dead writer's file is swept. A writer
    straight into the bundle's name fails this (an empty bundle is left)."""
    strace = shutil.which("strace")
    assert strace is not None
    usage_ok(run(laid))  # the .pyc files are written: the bundle's are the only write and rename left
    laid.bundle.unlink()
    syscalls = "write" if syscall == "write" else "rename,renameat,renameat2"
    killed = subprocess.run(
        [
            strace,
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            f"inject={syscalls}:signal=SIGKILL:when=1",
            str(laid.script),
            "bogus",
        ],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed
    assert "usage" not in killed.stderr, "killed before the action"
    assert not laid.bundle.exists(), "a killed writer left something under the bundle's name"
    (left,) = laid.cache.glob(f".{bundle.NAME}.*.tmp")
    assert (left.stat().st_size == 0) == (syscall == "write")

    missed(laid)
    assert not left.exists(), "a dead writer's temporary file is swept"
    assert "xenblockctl.blockscript.hotplug" in run(laid).from_bundle
