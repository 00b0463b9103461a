"""A trial, not a design: the block script serving our modules from one marshalled bundle.

    .venv/bin/python -m bench.hotplug_bundle_trial OUT [--python /usr/bin/python3]
    sudo .venv/bin/python -m bench.blockscript_add --python /usr/bin/python3 --no-bash \
        --baseline-script OUT/hotplug/block-xenblockctl

Copies this checkout's committed xenblockctl/ and hotplug/ (`git archive HEAD`) into OUT, puts a
meta-path finder into OUT's shim after the lines install-hooks rewrites (so the laid copy keeps
it), and writes OUT/hotplug.bundle: the code of every xenblockctl module add and remove import,
with each source's mtime_ns and size, which the shim checks (one stat per module) before using it.
blockscript_add then runs the trial as its "baseline" contestant, in the same loop as ours, so the
"baseline (before)" rows are the bundle's. Issue 18 round 5 in bench/README.md has the numbers and
what a production version would have to decide."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench.hotplug_startup import ACTION_IMPORTS, child_env

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = "# <<< where the package is\n"
LOADER = """# <<< where the package is

# TRIAL (bench.hotplug_bundle_trial): xenblockctl's modules from one marshalled bundle, each
# source's (mtime_ns, size) checked as a .pyc's is; any mismatch or error: normal imports.
try:
    import marshal as _marshal
    from _frozen_importlib import ModuleSpec as _Spec

    with open(BUNDLE, "rb") as _f:
        _codes = _marshal.loads(_f.read())
    for _name, (_code, _pkg, _origin, _mtime, _size) in _codes.items():
        _st = os.stat(_origin)
        if _st.st_mtime_ns != _mtime or _st.st_size != _size:
            raise OSError("stale")

    class _Loader:
        @staticmethod
        def create_module(spec):
            return None

        @staticmethod
        def exec_module(module):
            exec(_codes[module.__name__][0], module.__dict__)

    class _Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            entry = _codes.get(name)
            if entry is None:
                return None
            spec = _Spec(name, _Loader, origin=entry[2], is_package=entry[1])
            if entry[1]:
                spec.submodule_search_locations = [os.path.dirname(entry[2])]
            spec.has_location = True
            return spec

    sys.meta_path.insert(0, _Finder)
except (OSError, ValueError, EOFError, TypeError):
    pass
"""
#: Run in OUT with `python -S`: imports add's and remove's graphs, then writes the bundle.
BUILD = r"""
import marshal, os, sys
sys.path.append(sys.argv[1])
exec(sys.argv[2])
exec(sys.argv[3])
codes = {}
for name, module in list(sys.modules.items()):
    if name.startswith("xenblockctl"):
        st = os.stat(module.__file__)
        with open(module.__cached__, "rb") as f:
            code = marshal.loads(f.read()[16:])
        package = module.__file__.endswith("__init__.py")
        codes[name] = (code, package, module.__file__, st.st_mtime_ns, st.st_size)
with open(os.path.join(sys.argv[1], "hotplug.bundle"), "wb") as f:
    f.write(marshal.dumps(codes))
print(len(codes), "modules")
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--python", default="/usr/bin/python3")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=False)
    archive = subprocess.run(
        ["git", "archive", "HEAD", "xenblockctl", "hotplug"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    shim = out / "hotplug" / "block-xenblockctl"
    text = shim.read_text()
    if ANCHOR not in text:
        print(f"{shim} lacks {ANCHOR.strip()!r}", file=sys.stderr)
        return 1
    shim.write_text(text.replace(ANCHOR, LOADER.replace("BUNDLE", repr(str(out / "hotplug.bundle"))), 1))
    built = subprocess.run(
        [args.python, "-S", "-c", BUILD, str(out), ACTION_IMPORTS["add"], ACTION_IMPORTS["remove"]],
        env=child_env(),  # the .pyc files the bundle is made of get written first
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"{out / 'hotplug.bundle'}: {built}; run bench.blockscript_add --baseline-script {shim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
