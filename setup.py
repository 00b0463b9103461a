"""Build glue pyproject.toml cannot express (all other metadata is in pyproject.toml).

The licence: setuptools >= 77 records an SPDX expression as `License-Expression` (PEP 639) and
deprecates the `project.license` table; Debian 12's setuptools 66.1 rejects the string form that
replaces it. Passing the expression here, in the keyword the building setuptools knows, gives an
SPDX string in the metadata on both without a deprecation warning.

The host files: the block script, udev rules and hook, units (hotplug/), the roff man pages (man/)
and the completions (completions/) live at the top of the source tree, where admins and the Xen
lane use them in place; the build copies them into the package as xenblockctl/share/ so an
installed wheel carries them (xenblockctl/toolstack/hostfiles.py finds either).

The native fast paths (issue 20): xenblockctl/backend/_fastpass.c and _grantcopy.c, OPTIONAL
extensions. Where one cannot be built (no compiler, no Python headers) the build says so and goes
on: the engine then runs its pure-Python path, which is complete on its own (backend/fastpath.py,
backend/grantcopy.py).

The hotplug client (issue 18): hotplug/block-xenblockctl.c, the small C program libxl execs for
`script=block-xenblockctl` when the warm hotplug server runs (block-xenblockctl(8)), is compiled into
the package as xenblockctl/libexec/block-xenblockctl by the same build_ext step (so an editable
install's `build_ext --inplace` makes it too), and is as OPTIONAL as the extensions: where it cannot
be built the build says so and goes on, and install-hooks lays the Python script at the script path
as before (xenblockctl/toolstack/hostfiles.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import setuptools
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, ExecError, PlatformError

#: GPL-3.0-or-later: pyxs is LGPL-3.0 (not combinable with GPL-2.0-only code), click is
#: BSD-3-Clause; the full text is in LICENSE.
LICENSE = "GPL-3.0-or-later"
HERE = Path(__file__).resolve().parent
#: checkout directory -> which of its files ship (roff pages only: the Markdown is the source).
SHARED = {
    "hotplug": re.compile(r"^[\w.-]+(?<!\.c)$"),  # the client's C source is built, not shipped
    "man": re.compile(r"^[\w.-]+\.[1-8]$"),
    "completions": re.compile(r"^xenblockctl\.(bash|zsh|fish)$"),
}


class BuildWithHostFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads them from the checkout
        share = Path(self.build_lib) / "xenblockctl" / "share"
        for directory, wanted in SHARED.items():
            source = HERE / directory
            if not source.is_dir():  # building from an sdist that lacks them: fail loudly
                raise FileNotFoundError(f"{source} missing: the wheel would lack its host files")
            (share / directory).mkdir(parents=True, exist_ok=True)
            for path in sorted(source.iterdir()):
                if path.is_file() and wanted.match(path.name):
                    shutil.copy2(path, share / directory / path.name)


#: the blkif slot's validation rules, included by both native passes (written once: they are the
#: guest-facing rules, and two copies would drift)
SLOT_RULES = "xenblockctl/backend/blkif_slot.h"
#: ring.py's answer journal, written once for both native passes
RING_ANSWER = "xenblockctl/backend/ring_answer.h"
#: the wait-and-serve loop's skeleton, written once for both native passes
RING_LOOP = "xenblockctl/backend/ring_loop.h"
#: the ring group's write gate (issue 20, wiso20): _fastpass only
WRITE_GATE = "xenblockctl/backend/write_gate.h"

FASTPASS = setuptools.Extension(
    "xenblockctl.backend._fastpass",
    sources=["xenblockctl/backend/_fastpass.c"],
    depends=[SLOT_RULES, RING_ANSWER, RING_LOOP, WRITE_GATE],
    # warnings are bugs here: tests/unit/test_fastpass.py also builds it with -Werror
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    optional=True,
)

#: the native grant-copy pass for frontends without persistent grants (pvgrub's GRUB): its own
#: module, as optional as _fastpass (backend/grantcopy.py falls back to the pure-Python path)
GRANTCOPY = setuptools.Extension(
    "xenblockctl.backend._grantcopy",
    sources=["xenblockctl/backend/_grantcopy.c"],
    depends=[SLOT_RULES, RING_ANSWER, RING_LOOP],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    optional=True,
)

#: the hotplug client's source and where the build puts the program, relative to the package's root
#: (hostfiles.CLIENT finds it there, in the checkout of an editable install or an installed package)
CLIENT_SOURCE = "hotplug/block-xenblockctl.c"
CLIENT_PROGRAM = "xenblockctl/libexec/block-xenblockctl"


class BuildExtWithClient(build_ext):
    """The extensions, then the hotplug client: a program, not a Python module, so not an
    Extension; built with the compiler and flags the extensions use (CC, CFLAGS, LDFLAGS)."""

    def run(self) -> None:
        super().run()
        source = HERE / CLIENT_SOURCE
        if not source.is_file():
            self.warn(f"{CLIENT_SOURCE} missing: no hotplug client (the Python block script is laid instead)")
            return
        target = (HERE if self.inplace else Path(self.build_lib)) / CLIENT_PROGRAM
        try:
            self._compile_client(source, target)
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            self.warn(
                f"building the hotplug client {CLIENT_PROGRAM} failed ({exc}): the Python block script "
                "is laid at the script path instead (slower VM starts; block-xenblockctl(8))"
            )

    def _compile_client(self, source: Path, target: Path) -> None:
        compiler = self.compiler  # build_ext.run() made and customised it for the extensions
        if compiler is None or isinstance(compiler, str):
            raise PlatformError("no C compiler was set up")
        objects = compiler.compile(
            [str(source.relative_to(HERE))],
            output_dir=self.build_temp,
            # warnings are bugs here, as in the extensions (the client runs at every VM start)
            extra_postargs=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        # Linked dynamically: -static saved ~0.1 ms of an exec's ~0.6 (bench/README.md, issue 18,
        # pack18), and Debian refuses statically linked programs (lintian: an error).
        compiler.link_executable(objects, target.name, output_dir=str(target.parent))


_major = int(setuptools.__version__.split(".")[0])
_licence = {"license_expression": LICENSE} if _major >= 77 else {"license": LICENSE}

setuptools.setup(
    cmdclass={"build_py": BuildWithHostFiles, "build_ext": BuildExtWithClient},
    ext_modules=[FASTPASS, GRANTCOPY],
    **_licence,
)
