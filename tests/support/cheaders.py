"""Ask the C compiler what the installed kernel UAPI headers say.

Our ioctl numbers and struct offsets are written by hand in Python; this compiles a tiny program
against linux-libc-dev so a wrong number fails a test instead of a guest's disk."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def require_compiler(headers: list[str]) -> None:
    """Skip (with the reason) when gcc or the headers are missing; ./dev setup installs them."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (./dev setup installs it)")
    for header in headers:
        if not Path("/usr/include", header).is_file():
            pytest.skip(f"/usr/include/{header} missing (package linux-libc-dev)")


def c_values(headers: list[str], exprs: dict[str, str]) -> dict[str, int]:
    """Evaluate each C expression (e.g. `LOOP_CONFIGURE`, `offsetof(struct loop_info64, lo_flags)`,
    `sizeof(struct dm_ioctl)`) with the given headers and return name -> value."""
    require_compiler(headers)
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <sys/ioctl.h>"]
    lines += [f"#include <{h}>" for h in headers]
    lines.append("int main(void) {")
    for name, expr in exprs.items():
        lines.append(f'    printf("%s %llu\\n", "{name}", (unsigned long long)({expr}));')
    lines += ["    return 0;", "}"]
    with tempfile.TemporaryDirectory(prefix="xbc-cabi-") as tmp:
        src = Path(tmp, "probe.c")
        exe = Path(tmp, "probe")
        src.write_text("\n".join(lines) + "\n")
        subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        name, value = line.rsplit(" ", 1)
        values[name] = int(value)
    return values
