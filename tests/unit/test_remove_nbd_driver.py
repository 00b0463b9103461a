"""remove looks for never-published NBD devices only where the nbd driver is there at all: one
lookup of its sysfs directory instead of listing /sys/block (a few hundred loop minors on a busy
host) on every VM stop."""

from __future__ import annotations

import os
import posix
from pathlib import Path

import pytest

from xenblockctl.blockscript import remove
from xenblockctl.journal import Journal
from xenblockctl.xenstore.vbd import BackendPath


@pytest.mark.parametrize("driver", ["absent", "present"])
def test_block_devices_are_listed_only_with_the_nbd_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, driver: str
) -> None:
    if driver == "present":
        (tmp_path / driver).mkdir()
    monkeypatch.setattr(remove, "NBD_DRIVER", str(tmp_path / driver))
    listed: list[object] = []
    real_listdir = os.listdir

    def listdir(path: str) -> list[str]:
        listed.append(path)
        return [name for name in real_listdir(path) if not name.startswith("nbd")]  # no NBD device

    monkeypatch.setattr(posix, "listdir", listdir)
    remove._disconnect_unpublished_nbd(BackendPath("vbd", 5, 51712), None, Journal("test", stderr=False))
    assert listed == ([] if driver == "absent" else ["/sys/block"])
