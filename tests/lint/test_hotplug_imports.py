"""The hotplug entry point is on every VM start's critical path: its import graph stays small."""

from __future__ import annotations

import ast
import marshal
import site
import subprocess
import sys
from pathlib import Path

from xenblockctl.blockscript import bundle
from xenblockctl.toolstack import hostfiles

ROOT = Path(__file__).resolve().parents[2]
# Run with -S: site.py itself (and a development venv's editable-install finder, which imports
# pathlib) would otherwise hide what our own graph pulls in. The paths site would add come in argv.
# The roots are the hotplug bundle's (hotplug.main, add, remove, and the link main connects with,
# which XenStore.connect imports): the graph budgeted here is the one the bundle holds, plus the
# bundle's reader, which the laid script imports normally before everything else.
READER = f"import {bundle.__name__}; "
PROBE = (
    f"import sys; sys.path[:0] = sys.argv[1:]; {READER}"
    f"import {', '.join(bundle.ROOTS)}; "
    "print(sorted(sys.modules))"
)
#: The lazily-importing steps a file add and a remove run, called for real where that needs no
#: root and changes nothing: target parsing and the dm test of a file path, the bound-loop scan
#: (unreadable devices are skipped), and remove's proof for a loop number that does not exist.
EXERCISE = (
    "import sys, posix; sys.path[:0] = sys.argv[1:]; "
    "from xenblockctl.blockscript import add, remove, sharing, target; from xenblockctl.kernel import loop; "
    "t = target.parse_target('/srv/images/disk.img'); assert not target.maybe_dm(t); "
    "list(sharing.loop_claims()); "
    "r = loop.detach_with_proof(posix.makedev(7, 1048000), diskseq=1, tag='xenblockctl:1:2'); "
    "assert r is loop.DetachResult.ALREADY_GONE, r; "
    "print(sorted(sys.modules))"
)
FORBIDDEN = (
    "click",
    "pyudev",
    "xenblockctl.cli",
    "xenblockctl.backend",
    # the warm server (its unit runs it): an add or remove in process never starts one
    "xenblockctl.blockscript.warm",
    "xenblockctl.kernel.dm",  # only for dm targets (lazily)
    "tomllib",  # only when a config file exists
    "asyncio",
    "subprocess",
    # dataclasses imports inspect, ast, dis, tokenize and execs code per class: the largest avoidable
    # share of start-up, so records on this path are NamedTuples
    "dataclasses",
    "inspect",
    # pathlib pulls in fnmatch, urllib.parse and ipaddress (~5 ms); sysfs lookups (which use it)
    # are imported lazily, only for block-device and dm targets and for remove
    "pathlib",
    "urllib",
    "ipaddress",
    # random (hashlib's sha512, bisect) only on a lost race or a transaction conflict
    "random",
    # the hotplug path talks to xenstored over the synchronous link (xenstore/synchronous.py):
    # `socket` alone costs ~4.6 ms in a fresh process (its IntEnums), pyxs's threaded link pulls
    # in threading, queue, selectors and platform; `_socket` and `select` are what it needs
    "socket",
    "selectors",
    "threading",
    "queue",
    "platform",
    "pyxs",
    # typing (which imports re, contextlib, warnings) and re: records on this path are
    # xenblockctl.records.NamedTuple, typing-only names sit under TYPE_CHECKING, and the identity
    # and path grammars are character-set checks (xenstore/numbers.py is_hex / is_decimal)
    "typing",
    "re",
    # enum (functools, collections, operator, types, keyword, reprlib with it) and contextlib: the
    # path's enums come from xenblockctl.enums, suppress() is try/except, the target lock a class,
    # and collections.abc names are TYPE_CHECKING-only
    "enum",
    "contextlib",
    "collections",
    "functools",
    # struct.py only re-exports the C `_struct`, but it was the one module of the path the import
    # system had to find and read from a file: ~0.2 ms of every start (bench/README.md, issue 18
    # round 9); the path imports `_struct` (as struct) instead
    "struct",
    # os (with _collections_abc, posixpath, genericpath and stat) cost ~1.0 ms of every start in a
    # fresh `python -S`, most of it _collections_abc's ABCs, for functions that are posix's: the path
    # calls posix and _stat, which the interpreter has loaded (or are built in), and spells the few
    # os.path steps it needs itself (bench/README.md, issue 18 round 10)
    "os",
    "_collections_abc",
    "posixpath",
    "genericpath",
    "stat",
    # itertools (built in, but its ~20 types are set up at import: ~0.06 ms) was imported by the
    # xenstore client for its request-id counter alone; a range's iterator counts as well
    # (bench/README.md, issue 18, rm18)
    "itertools",
)
#: Modules of other target kinds, which a file add (EXERCISE; a real add through the laid script in
#: tests/cli/test_install.py) never imports: each is imported where its kind is handled. A trace of a
#: real file add (2026-12-05) found no module of the path whose functions the add does not call.
OTHER_KINDS = (
    "xenblockctl.kernel.dm_abi",  # dm names and uuids
    "xenblockctl.blockscript.dmtargets",
    "xenblockctl.kernel.sysfs",  # block devices and dm: holders, partitions, mountinfo
    "xenblockctl.kernel.nbd",
    "xenblockctl.nbd",
    "xenblockctl.blockscript.nbdexport",
    "hashlib",  # the NBD export name
    # vdev names <-> numbers: the CLI's and the toolstack's; vbd spells the devid bound itself
    "xenblockctl.xenstore.vdev",
)
#: What `remove` imports (bundle.REMOVE_ROOTS: hotplug.main's imports, run_remove's, the link):
#: nothing of add's graph. remove runs on every VM stop and cannot afford add's modules.
REMOVE_PROBE = (
    "import sys; sys.path[:0] = sys.argv[1:]; "
    f"{READER}import {', '.join(bundle.REMOVE_ROOTS)}; "
    "print(sorted(sys.modules))"
)
#: What `add` imports (hotplug.main's imports, run_add's, the link), in the order a fresh start
#: finishes them: the bundle's reader preloads exactly these for an add (bundle.preload).
ADD_PROBE = (
    "import sys; sys.path[:0] = sys.argv[1:]; "
    f"{READER}import {', '.join(bundle.MAIN_ROOTS)}, {bundle.ROOTS[-1]}; "
    "print(list(sys.modules))"
)
#: The lookups a block-device add adds (sharing's holders, blockdev's and target's attributes) and
#: the walk of every backend its sharing check makes: the bundle's last section (bundle.LATER_ROOTS).
BLOCK_DEVICE_STEPS = (
    "import sys; sys.path[:0] = sys.argv[1:]; from xenblockctl.kernel import sysfs; "
    "sysfs.holders(7, 0); sysfs.read_attr(7, 0, 'dev'); sysfs.dm_name(7, 0); "
    "from xenblockctl.xenstore import backends; "
    "print(sorted(sys.modules))"
)
#: The kernel-blkback path's hand-off (AUTOCLEAR off in a forked child: blockscript/autoclear.py),
#: imported by an add whose consumer is kernel blkback: the bundle's last section too.
KERNEL_PATH_STEPS = (
    "import sys; sys.path[:0] = sys.argv[1:]; from xenblockctl.blockscript import autoclear; "
    "print(sorted(sys.modules))"
)
ADD_ONLY = (
    "xenblockctl.blockscript.add",
    "xenblockctl.blockscript.claim",
    "xenblockctl.blockscript.sharing",
    "xenblockctl.blockscript.target",
    "xenblockctl.blockscript.handoff",
    "xenblockctl.blockscript.owner",
    "xenblockctl.blockscript.autoclear",
)
#: Modules the hotplug path (PROBE, then EXERCISE) may add to a bare `python -S` interpreter.
#: Measured at 53 when this budget was set (54 before vbd stopped importing vdev, 89 before the
#: synchronous link, 75 before xenblockctl.records, xenblockctl.enums and the re-free grammars;
#: bench/README.md, issue 18). Every module costs at least ~0.05 ms at each VM start (finding and
#: reading its file, before its body runs; round 5) and most ~0.1-0.3 ms: raise the budget only
#: with a measurement in bench/README.md that says what the new module buys. 54 since the hotplug
#: bundle's reader (blockscript/bundle.py): it serves the other 37 of ours from one file, ~1.2 ms
#: less CPU per start (issue 18 round 6), and as a module it costs ~0.6 ms less than as script text.
#: 53 since `_struct` replaced `struct` (round 9); 47 since the path stopped importing os (its
#: os.path, posixpath, genericpath, stat and _collections_abc went with it; round 10). 48 since
#: xenblockctl.pathsteps: the path's os.path steps, spelled in five modules before (one concept, one
#: module; the udev hook uses them too), cost one module: +0.00 to +0.03 ms of the add's import
#: segment with the bundle, +0.01 to +0.06 ms of remove's (four alternating runs against main,
#: within their noise; round 11). 47 since the xenstore client's request ids stopped needing
#: itertools (session 13, rm18). 48 since xenblockctl.backoff: the loop's and the store's retry
#: jitter in one place, and one that never blocks (os.urandom slept until a fresh driver domain's
#: random pool was ready, past libxl's 40 s; session 21): the import segment with the bundle, p50
#: of 40 alternating runs against main, add 6.98 vs 6.98 ms, remove 6.21 vs 6.10 (noise).
MODULE_BUDGET = 48
#: The same for REMOVE_PROBE: 47 when set (remove's graph is add's minus add's own modules); 48
#: with the bundle's reader, 47 again without `struct`, 41 without os, 42 with pathsteps, 41
#: without itertools, 42 with backoff.
REMOVE_MODULE_BUDGET = 42

#: Classes an add's imports build (ADD_PROBE's graph, the bundle's reader excluded), and a remove's.
#: In a fresh process a class costs ~6-30 us to build (type()'s slot and MRO work, the records' and
#: enums' machinery; ~1 ms of every add's CPU for ~100 of them, bench/README.md issue 18, rm18,
#: start18, class18): a class on this path is built at every VM start whether or not the action
#: uses it, so a concept an add does not use lives in a module the add does not import. Set at
#: 102 and 79 (main had 104 and 79: the backend walk's record and domain classes left for
#: xenstore/backends.py, imported by a block-device add only; session 17, class18).
CLASS_BUDGET = 102
REMOVE_CLASS_BUDGET = 79
#: Counts the class statements run while `roots` are imported (nested ones included).
CLASS_PROBE = (
    "import sys, builtins; sys.path[:0] = sys.argv[1:]; {reader}"
    "built = []; build = builtins.__build_class__; "
    "builtins.__build_class__ = lambda f, n, *a, **k: built.append(f.__qualname__) or build(f, n, *a, **k); "
    "import {roots}; print(repr(built))"
)


def _modules(probe: str) -> list[str]:
    paths = [str(ROOT), *site.getsitepackages()]
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, *paths], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    modules: list[str] = ast.literal_eval(out)
    return modules


def _loaded_forbidden(probe: str) -> list[str]:
    return [m for m in _modules(probe) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def _added(probe: str) -> list[str]:
    bare = set(_modules("import sys; print(sorted(sys.modules))"))
    return [m for m in _modules(probe) if m not in bare]


def test_hotplug_path_imports_no_heavy_modules() -> None:
    loaded = _loaded_forbidden(PROBE)
    assert not loaded, f"the hotplug path must not import {loaded}"


def test_file_add_and_remove_steps_import_nothing_heavy_lazily() -> None:
    loaded = _loaded_forbidden(EXERCISE)
    assert not loaded, f"a file add or a remove must not import {loaded} on the way"


def test_kernel_path_steps_import_nothing_heavy() -> None:
    """autoclear imported os (~1 ms of every kernel-blkback add in a fresh process) until class18."""
    loaded = _loaded_forbidden(KERNEL_PATH_STEPS)
    assert not loaded, f"the kernel-blkback hand-off must not import {loaded}"


def test_block_device_steps_import_nothing_heavy() -> None:
    loaded = _loaded_forbidden(BLOCK_DEVICE_STEPS)
    assert not loaded, f"a block-device add must not import {loaded} for its sysfs lookups"


def test_file_add_imports_nothing_of_other_target_kinds() -> None:
    loaded = [m for m in _modules(EXERCISE) if any(m == k or m.startswith(k + ".") for k in OTHER_KINDS)]
    assert not loaded, f"a file add must not import {loaded}: import them where their kind is handled"


def test_hotplug_path_stays_within_its_module_budget() -> None:
    for probe in (PROBE, EXERCISE):
        added = _added(probe)
        assert len(added) <= MODULE_BUDGET, (
            f"the hotplug path imports {len(added)} modules (budget {MODULE_BUDGET}): {added}"
        )


def test_remove_imports_nothing_of_add_within_its_budget() -> None:
    modules = _modules(REMOVE_PROBE)
    loaded = [
        m for m in modules if any(m == k or m.startswith(k + ".") for k in ADD_ONLY + OTHER_KINDS + FORBIDDEN)
    ]
    assert not loaded, f"remove must not import {loaded}"
    added = _added(REMOVE_PROBE)
    assert len(added) <= REMOVE_MODULE_BUDGET, (
        f"remove imports {len(added)} modules (budget {REMOVE_MODULE_BUDGET}): {added}"
    )


def _ours(modules: list[str]) -> set[str]:
    return {m for m in modules if m == "xenblockctl" or m.startswith("xenblockctl.")}


def test_bundle_holds_exactly_the_budgeted_graph(tmp_path: Path) -> None:
    """The hotplug bundle (blockscript/bundle.py) serves modules without their files: it must not
    become a way around this budget. It holds exactly our part of the graph measured above, with
    the modules a file add or a remove imports lazily (EXERCISE), and nothing else; a module read
    from it still counts here, since this probe imports normally. Written by a laid script, as
    `install-hooks` does, for this checkout."""
    where = hostfiles.local_layout()._replace(packages=str(ROOT), cache_dir=str(tmp_path / "cache"))
    script = tmp_path / "block-xenblockctl"
    script.write_text(hostfiles.block_script((ROOT / "hotplug" / hostfiles.SCRIPT_NAME).read_text(), where))
    script.chmod(0o755)
    wrote = subprocess.run([str(script), "--write-bundle"], capture_output=True, text=True, check=False)
    assert wrote.returncode == 3, wrote.stderr
    data = (tmp_path / "cache" / bundle.NAME).read_bytes()
    _, _, later_names, (remove_section, add_section, later_section) = bundle.parts(
        data, data[len(bundle.FORMAT) : len(bundle.FORMAT) + 4]
    )
    first, second = set(marshal.loads(remove_section)), set(marshal.loads(add_section))
    assert first == _ours(_modules(REMOVE_PROBE)) - {bundle.__name__}, (
        "the first section is what a remove reads"
    )
    held = first | second
    graph = _ours(_modules(PROBE)) - {bundle.__name__}  # the reader cannot come from the bundle
    assert held == graph, (
        f"bundle but not graph: {sorted(held - graph)}; graph but not bundle: {sorted(graph - held)}"
    )
    lazy = _ours(_modules(EXERCISE)) - graph
    assert not lazy, f"a file add or remove imports {sorted(lazy)} lazily: add them to bundle.ROOTS"
    # bundle.preload runs every module of a section, in its order, before main: the order must be
    # one the import system finishes them in (each module after what it imports), and what an add
    # preloads (all but remove's own module) must be exactly add's graph
    order = [m for m in _modules(PROBE.replace("sorted(sys.modules)", "list(sys.modules)")) if m in held]
    assert [*marshal.loads(remove_section), *marshal.loads(add_section)] == order
    add_graph = _ours(_modules(ADD_PROBE)) - {bundle.__name__}
    assert held - {bundle.REMOVE_ROOTS[-1]} == add_graph, "an add preloads all but remove's module"
    # the last section: what a block-device add's and the kernel path's steps import lazily,
    # decoded only then
    later = list(marshal.loads(later_section))
    assert later == list(later_names)
    lazily = _ours(_modules(BLOCK_DEVICE_STEPS)) | _ours(_modules(KERNEL_PATH_STEPS))
    assert set(later) == lazily - graph - {bundle.__name__}


def _classes(roots: tuple[str, ...]) -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            CLASS_PROBE.format(reader=READER, roots=", ".join(roots)),
            str(ROOT),
            *site.getsitepackages(),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    classes: list[str] = ast.literal_eval(out)
    return classes


def test_an_add_and_a_remove_build_no_more_classes_than_their_budgets() -> None:
    add = _classes((*bundle.MAIN_ROOTS, bundle.ROOTS[-1]))
    assert len(add) <= CLASS_BUDGET, (
        f"an add's imports build {len(add)} classes (budget {CLASS_BUDGET}): {add}"
    )
    remove = _classes(bundle.REMOVE_ROOTS)
    assert len(remove) <= REMOVE_CLASS_BUDGET, (
        f"a remove's imports build {len(remove)} classes (budget {REMOVE_CLASS_BUDGET}): {remove}"
    )
