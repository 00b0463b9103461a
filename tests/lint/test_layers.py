"""Layers import downward only; click stays in the CLI; the kernel layer is stdlib only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "xenblockctl"

#: layer -> xenblockctl layers it may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    # the hotplug path's NamedTuple and enums (built without typing, exec or enum): leaves every layer may use
    "records": set(),
    "enums": set(),
    "kernel": {"errors", "records", "enums"},
    "xenstore": {"errors", "records", "enums"},
    "nbd": {"errors", "records", "enums"},
    "blockscript": {
        "errors",
        "records",
        "enums",
        "kernel",
        "xenstore",
        "nbd",
        "config",
        "environment",
        "journal",
    },
    "backend": {
        "errors",
        "records",
        "enums",
        "kernel",
        "xenstore",
        "nbd",
        "config",
        "environment",
        "journal",
    },
    "config": {"errors", "records", "enums"},
    "environment": set(),
    "journal": {"errors", "records", "enums"},
    "toolstack": {
        "errors",
        "records",
        "enums",
        "kernel",
        "xenstore",
        "nbd",
        "blockscript",
        "config",
        "environment",
        "journal",
    },
    "cli": {
        "errors",
        "records",
        "enums",
        "kernel",
        "xenstore",
        "nbd",
        "blockscript",
        "backend",
        "config",
        "environment",
        "journal",
        "sandbox",
        "toolstack",
    },
    "sandbox": {
        "errors",
        "records",
        "enums",
        "kernel",
        "xenstore",
        "nbd",
        "blockscript",
        "backend",
        "config",
        "environment",
        "journal",
        "toolstack",
    },
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
