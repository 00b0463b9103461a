"""Target parsing (blockscript/target.py): every `params` form, and what is refused before anything
is opened. Pure: nothing here touches the kernel or xenstore."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xenblockctl.blockscript.target import (
    PATH_MAX,
    Target,
    TargetSyntaxError,
    has_target_prefix,
    parse_target,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("/srv/images/disk.img", Target("/srv/images/disk.img")),
        ("/dev/loop3", Target("/dev/loop3")),
        ("raw:/srv/disk.img", Target("/srv/disk.img")),
        ("aio:/dev/vg0/lv", Target("/dev/vg0/lv")),
        ("/dev/disk/by-diskseq/29", Target("/dev/disk/by-diskseq/29", expect_diskseq=29)),
        (
            "/dev/disk/by-diskseq/18446744073709551615",
            Target("/dev/disk/by-diskseq/18446744073709551615", expect_diskseq=(1 << 64) - 1),
        ),
        ("/dev/mapper/vg0-lv--data", Target("/dev/mapper/vg0-lv--data", expect_dm_name="vg0-lv--data")),
        ("uuid:LVM-abc123", Target("uuid:LVM-abc123", dm_uuid="LVM-abc123")),
        ("snapshot:/srv/base.img", Target("/srv/base.img", snapshot=True)),
        # a file under /dev (tmpfs) is a valid base: the regular-file check happens on the fd
        ("snapshot:/dev/shm/base.img", Target("/dev/shm/base.img", snapshot=True)),
        # only one format prefix is stripped: the rest is a path like any other
        ("raw:/raw:x", Target("/raw:x")),
    ],
)
def test_target_forms(params: str, expected: Target) -> None:
    assert parse_target(params) == expected


@pytest.mark.parametrize(
    "params",
    [
        "",
        "disk.img",
        "raw:disk.img",
        "./disk.img",
        "/srv/../etc/shadow",
        "/srv/./disk.img",
        "/srv/..",
        "/srv/disk\n.img",
        "/srv/disk\x7f.img",
        "/srv/" + "n" * 256,
        "/" + "d/" * (PATH_MAX // 2),
        "qcow2:/srv/disk.qcow2",  # a format we do not serve is not an absolute path
        # by-diskseq: a decimal diskseq, 1..2^64-1, nothing else
        "/dev/disk/by-diskseq/0",
        "/dev/disk/by-diskseq/029",
        "/dev/disk/by-diskseq/1d",
        "/dev/disk/by-diskseq/+5",
        "/dev/disk/by-diskseq/18446744073709551616",
        "/dev/disk/by-diskseq/",
        "/dev/disk/by-diskseq/\u0663",  # a non-ASCII digit
        # dm forms
        "uuid:",
        "uuid:has space",
        "uuid:with/slash",
        "uuid:" + "u" * 129,
        "snapshot:",
        "snapshot:relative.img",
        "snapshot:/a/../b.img",
        "snapshot:/a\nb",
        "/dev/mapper/control",
        "/dev/mapper/" + "n" * 128,
        "/dev/mapper/sp ace",
    ],
)
def test_bad_params_are_syntax_errors(params: str) -> None:
    with pytest.raises(TargetSyntaxError) as caught:
        parse_target(params)
    assert caught.value.code == "bad-params"
    assert "\n" not in caught.value.one_line()  # shown with repr: one line for hotplug-error


def test_prefixes_are_known() -> None:
    assert [
        p for p in ("raw:x", "aio:x", "uuid:x", "snapshot:x", "/x", "x", "nbd:x") if has_target_prefix(p)
    ] == [
        "raw:x",
        "aio:x",
        "uuid:x",
        "snapshot:x",
    ]


def test_plain_targets_do_not_import_the_dm_code() -> None:
    """The dm modules cost ~25 ms of imports: only dm targets pay for them (every VM start runs us)."""
    probe = (
        "import json, sys\n"
        "import xenblockctl.blockscript.hotplug, xenblockctl.blockscript.add\n"
        "import xenblockctl.blockscript.remove\n"
        "from xenblockctl.blockscript.target import maybe_dm, parse_target\n"
        "for p in ('/var/lib/xen/disk.img', '/dev/loop0', '/dev/shm/disk.img', '/dev/disk/by-diskseq/9'):\n"
        "    assert not maybe_dm(parse_target(p)), p\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('xenblockctl'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert not [m for m in loaded if m.endswith((".dm", ".dm_abi", ".dmtargets"))], loaded


def test_target_module_imports_nothing_of_the_blockscript() -> None:
    """target.py only parses: the opening side (claim.py, dmtargets.py) imports it, never the other
    way round, so they cannot form an import cycle again (target and dmtargets once did)."""
    tree = ast.parse((REPO / "xenblockctl/blockscript/target.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
    }
    assert not [m for m in imported if m and m.startswith("xenblockctl.blockscript")], imported
