"""Where the hotplug path's import time goes: finding and reading files, unmarshalling, running bodies.

    .venv/bin/python -m bench.hotplug_import_anatomy [--runs 30] [--python PY] [--action add|remove]

Fresh `python -S` processes (GC off, as the laid script runs), interleaved; the CPU time of
importing what `add` (or `remove`) imports (bench.hotplug_startup.ACTION_IMPORTS), three ways:

  normal            the import system as the laid script uses it (path search, one .pyc per module:
                    stat, open, read, validate, unmarshal, then the body);
  one-file bundle   every module's code object in one marshalled file, read and unmarshalled
                    inside the timing, served by a meta-path finder (no per-module file work);
  pre-unmarshalled  the same finder, the code unmarshalled before the timing starts: what is left
                    is running the module bodies (and the import system's per-module bookkeeping).

normal - bundle is the per-module file work; bundle - pre-unmarshalled the unmarshalling (of one
blob); pre-unmarshalled the bodies. Then what one class of each kind the path builds costs at
import (20 per module, one module each, against a module of one assignment). Nothing here is a
production code path: the bundle is a measurement of what a one-file loader could save."""

from __future__ import annotations

import argparse
import importlib.util
import marshal
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.hotplug_startup import ACTION_IMPORTS, child_env

ROOT = Path(__file__).resolve().parents[1]

#: The child serving xenblockctl from a bundle. argv: bundle, root, pre (0/1), modules.
SERVE = r"""
import gc, marshal, os, sys, time
gc.disable()
import importlib.machinery
bundle, root, pre, modules = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
if pre:
    with open(bundle, "rb") as f:
        codes = marshal.loads(f.read())
start = time.process_time_ns()
if not pre:
    with open(bundle, "rb") as f:
        codes = marshal.loads(f.read())

class Loader:
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        exec(codes[module.__name__][0], module.__dict__)

LOADER = Loader()

class Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        entry = codes.get(name)
        if entry is None:
            return None
        code, is_package, origin = entry
        spec = importlib.machinery.ModuleSpec(name, LOADER, origin=origin, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(origin)]
        spec.has_location = True
        return spec

sys.meta_path.insert(0, Finder)
sys.path.append(root)
exec(modules)
print(time.process_time_ns() - start)
os._exit(0)
"""
NORMAL = r"""
import gc, os, sys, time
gc.disable()
start = time.process_time_ns()
sys.path.append(sys.argv[1])
exec(sys.argv[2])
print(time.process_time_ns() - start)
os._exit(0)
"""
#: Class kinds the path builds, 20 of each per module.
KINDS = {
    "module of one assignment (reference)": "x = 1\n",
    "records.NamedTuple, 3 fields": "from xenblockctl.records import NamedTuple\n"
    + "".join(f"class R{i}(NamedTuple):\n    a: int\n    b: str\n    c: int = 0\n" for i in range(20)),
    "plain class, __slots__, __init__/__repr__/__eq__": "".join(
        f"class R{i}:\n    __slots__ = ('a', 'b', 'c')\n"
        "    def __init__(self, a, b, c=0):\n        self.a = a\n        self.b = b\n        self.c = c\n"
        "    def __repr__(self):\n        return f'R({self.a!r}, {self.b!r}, {self.c!r})'\n"
        "    def __eq__(self, other):\n        return type(other) is type(self) and self.a == other.a\n"
        for i in range(20)
    ),
    "exception class with a code": "".join(f"class E{i}(Exception):\n    code = 'e{i}'\n" for i in range(20)),
    "enums.IntEnum, 4 members": "from xenblockctl.enums import IntEnum\n"
    + "".join(f"class N{i}(IntEnum):\n    A = 1\n    B = 2\n    C = 3\n    D = 4\n" for i in range(20)),
    "function (def, 2 args)": "".join(f"def f{i}(a, b='x'):\n    return a + len(b)\n" for i in range(20)),
}
KIND_CHILD = (
    "import gc, os, sys, time; gc.disable(); sys.path.append(sys.argv[1]); sys.path.append(sys.argv[2]); "
    "import xenblockctl.records, xenblockctl.enums; start = time.process_time_ns(); "
    "__import__(sys.argv[3]); print(time.process_time_ns() - start); os._exit(0)"
)


def build_bundle(py: str, imports: str, path: Path) -> None:
    """Every xenblockctl module `imports` loads, compiled as its .pyc holds it, in one file."""
    listing = subprocess.run(
        [
            py,
            "-S",
            "-c",
            f"import sys; sys.path.append({str(ROOT)!r}); {imports}; "
            "print('\\n'.join(f'{n} {m.__file__}' for n, m in sys.modules.items() "
            "if n.startswith('xenblockctl')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=child_env(),
    ).stdout.split("\n")
    codes: dict[str, tuple[object, bool, str]] = {}
    for line in filter(None, listing):
        name, file = line.split(" ", 1)
        cached = importlib.util.cache_from_source(file)
        with open(cached, "rb") as f:
            codes[name] = (marshal.loads(f.read()[16:]), file.endswith("__init__.py"), file)
    path.write_bytes(marshal.dumps(codes))


def cpu_ms(argv: list[str]) -> float:
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=child_env(), cwd="/")
    return int(out.stdout.split()[0]) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("--action", choices=tuple(ACTION_IMPORTS), default="add")
    args = parser.parse_args()
    py, imports = args.python, ACTION_IMPORTS[args.action]
    with tempfile.TemporaryDirectory(prefix="xbc-anatomy-") as tmp:
        bundle = Path(tmp) / "bundle.marshal"
        build_bundle(py, imports, bundle)
        ways = {
            "normal": [py, "-S", "-c", NORMAL, str(ROOT), imports],
            "one-file bundle": [py, "-S", "-c", SERVE, str(bundle), str(ROOT), "0", imports],
            "pre-unmarshalled": [py, "-S", "-c", SERVE, str(bundle), str(ROOT), "1", imports],
        }
        kinds_dir = Path(tmp) / "kinds"
        kinds_dir.mkdir()
        modules = {}
        for i, (label, body) in enumerate(KINDS.items()):
            (kinds_dir / f"kind{i}.py").write_text(body)
            modules[label] = f"kind{i}"
        kind_argv = {
            label: [py, "-S", "-c", KIND_CHILD, str(ROOT), str(kinds_dir), module]
            for label, module in modules.items()
        }
        for argv in [*ways.values(), *kind_argv.values()]:  # write the bytecode caches
            cpu_ms(argv)
        times: dict[str, list[float]] = {name: [] for name in [*ways, *kind_argv]}
        for _ in range(args.runs):
            for name, argv in [*ways.items(), *kind_argv.items()]:
                times[name].append(cpu_ms(argv))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.action}'s imports, CPU, p50 (min) of {args.runs} fresh `{py} -S` processes, load {load}")
    for name in ways:
        print(f"  {name:<20} {statistics.median(times[name]):6.2f} ms ({min(times[name]):.2f})")
    normal, bundled, pre = (statistics.median(times[name]) for name in ways)
    print(
        f"  => per-module file work {normal - bundled:.2f} ms, unmarshalling {bundled - pre:.2f} ms, "
        f"bodies and bookkeeping {pre:.2f} ms"
    )
    reference = statistics.median(times[next(iter(KINDS))])
    print("one class (or function) of each kind at import, CPU p50 over the reference module, per item:")
    for label in list(KINDS)[1:]:
        print(f"  {label:<50} {(statistics.median(times[label]) - reference) * 1e3 / 20:5.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
