"""Layers import downward only; click stays in the CLI; the kernel layer is stdlib only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "xenblockctl"

# Each layer may import what the one below it may, plus that layer: spelling the sets out in
# full repeated the whole stack at every level and hid what each level adds.
#: the hotplug path's NamedTuple and enums (built without typing, exec or enum), its path steps
#: without os and its retry jitter: leaves every layer may use
_LEAVES = {"errors", "records", "enums", "pathsteps", "backoff"}
#: what the engine and the block script share: the bottom layers and the process plumbing
_SERVICES = _LEAVES | {"kernel", "xenstore", "nbd", "config", "environment", "journal"}
_TOOLSTACK = _SERVICES | {"blockscript"}
_SANDBOX = _TOOLSTACK | {"backend", "toolstack"}

#: layer -> xenblockctl layers it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "records": set(),
    "enums": set(),
    "pathsteps": set(),
    "backoff": set(),
    "kernel": _LEAVES,
    "xenstore": _LEAVES,
    "nbd": _LEAVES,
    "blockscript": _SERVICES,
    "backend": _SERVICES,
    "config": _LEAVES,
    "environment": set(),
    "journal": _LEAVES,
    "toolstack": _TOOLSTACK,
    "cli": _SANDBOX | {"sandbox"},
    "sandbox": _SANDBOX,
}
#: third-party modules per layer: the kernel layer is stdlib only.
THIRD_PARTY_ALLOWED: dict[str, set[str]] = {
    "kernel": set(),
    "nbd": set(),
    "xenstore": {"pyxs"},
    "cli": {"click", "pyxs"},
}
DEFAULT_THIRD_PARTY = {"pyxs"}


def _layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.suffix == ".py" else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if _layer_of(p) not in ("", "__init__", "__main__")]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path: Path) -> None:
    layer = _layer_of(path)
    allowed = ALLOWED.get(layer)
    assert allowed is not None, f"{layer} is not a known layer: add it to ALLOWED with its rules"
    third_party = THIRD_PARTY_ALLOWED.get(layer, DEFAULT_THIRD_PARTY)
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "xenblockctl":
            parts = name.split(".")
            if len(parts) == 1:
                continue
            target = parts[1]
            assert target == layer or target in allowed, f"{path.name}: {layer} must not import {name}"
        elif top in sys.stdlib_module_names or top == "__future__":
            continue
        else:
            assert top in third_party, f"{path.name}: {layer} must not import third-party {name}"
