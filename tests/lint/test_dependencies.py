"""Declared dependencies are exactly what the package imports, in ranges Debian 12 satisfies.

The .deb depends on Debian's own python3-* packages and builds with Debian's setuptools, so a pin
or floor above what bookworm ships breaks the package build or its install, and a declared
dependency nothing imports is a package every admin installs for nothing."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: What Debian 12 (bookworm) ships, as each package's Python metadata states its version.
BOOKWORM = {
    "click": "8.1.3",  # python3-click 8.1.3-2
    "pyxs": "0.4.2.dev0",  # python3-pyxs 0.4.2~git20190115.97f14313-5
    "setuptools": "66.1.1",  # python3-setuptools 66.1.1-1+deb12u2
}


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "xenblockctl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def _import_names(distribution: str) -> set[str]:
    """The top-level modules a distribution provides (installed metadata), else its own name."""
    provided = {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(re.sub(r"[-_.]+", "-", d).lower() == distribution for d in dists)
    }
    return provided or {distribution.replace("-", "_")}


def _declared() -> list[Requirement]:
    return [Requirement(spec) for spec in PYPROJECT["project"]["dependencies"]]


def test_every_declared_dependency_is_imported() -> None:
    imported = _imported_top_levels()
    unused = [
        str(req)
        for req in _declared()
        if not _import_names(re.sub(r"[-_.]+", "-", req.name).lower()) & imported
    ]
    assert not unused, f"declared in pyproject.toml but imported nowhere in xenblockctl/: {unused}"


def test_every_third_party_import_is_declared() -> None:
    declared: set[str] = set()
    for req in _declared():
        declared |= _import_names(re.sub(r"[-_.]+", "-", req.name).lower())
    third_party = {
        name
        for name in _imported_top_levels()
        if name not in sys.stdlib_module_names and name not in ("xenblockctl", "__future__")
    }
    assert third_party <= declared, f"imported but not declared: {sorted(third_party - declared)}"


def test_ranges_accept_debian_bookworm_versions() -> None:
    for req in _declared():
        assert req.name in BOOKWORM, f"{req.name}: add the version Debian 12 ships to BOOKWORM"
        version = Version(BOOKWORM[req.name])
        assert req.specifier.contains(version, prereleases=True), f"{req} rejects Debian's {version}"
    (backend,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert backend.name == "setuptools"
    assert backend.specifier.contains(Version(BOOKWORM["setuptools"])), f"{backend} rejects bookworm's"


def test_license_is_an_spdx_expression_with_its_text() -> None:
    assert "license" not in PYPROJECT["project"], "the licence expression is passed by setup.py"
    assert "license" in PYPROJECT["project"]["dynamic"]
    match = re.search(r'^LICENSE = "([^"]+)"$', (ROOT / "setup.py").read_text(), flags=re.M)
    assert match is not None
    assert match.group(1) == "GPL-3.0-or-later"
    assert "GNU GENERAL PUBLIC LICENSE\n                       Version 3" in (ROOT / "LICENSE").read_text()
