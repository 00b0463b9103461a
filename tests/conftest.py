"""Shared fixtures live in tests/fixtures/* as plugins, one module per kind of real part."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.kernel",
    "tests.fixtures.backend",
    "tests.fixtures.cxenstored",
    "tests.fixtures.dm_vm",
    "tests.fixtures.xenstore",
    "tests.fixtures.libxl",
    "tests.fixtures.warm",
    "tests.fixtures.engine",
    "tests.fixtures.fdstore",
    "tests.fixtures.cli",
    "tests.fixtures.nbd",
    "tests.fixtures.ceph",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Root-only tests say why they skip; CI runs as root, so there they run.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real loop devices / mknod); CI runs as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
