"""The dm lane's harness pieces that need no VM: module ordering, the initramfs archive, reaping."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.dm import vm


def _module(root: Path, rel: str, depends: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")


def test_modules_load_dependencies_first(tmp_path: Path) -> None:
    _module(tmp_path, "kernel/drivers/md/dm-snapshot.ko", "dm-mod,dm-bufio")
    _module(tmp_path, "kernel/drivers/md/dm-bufio.ko", "")
    _module(tmp_path, "kernel/drivers/md/dm-mod.ko", "")
    _module(tmp_path, "kernel/fs/9p/9p.ko", "9pnet,netfs")
    _module(tmp_path, "kernel/net/9p/9pnet.ko", "")
    _module(tmp_path, "kernel/fs/netfs/netfs.ko", "")
    order = [p.name for p in vm.resolve_modules(tmp_path, ("9p", "dm_snapshot", "dm_mod"))]
    assert order == ["9pnet.ko", "netfs.ko", "9p.ko", "dm-mod.ko", "dm-bufio.ko", "dm-snapshot.ko"]


def test_missing_module_makes_the_lane_unavailable(tmp_path: Path) -> None:
    _module(tmp_path, "kernel/a.ko", "b")
    with pytest.raises(vm.LaneUnavailable, match="no module b"):
        vm.resolve_modules(tmp_path, ("a",))


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        body_at = name_at + namesize + (-(110 + namesize) % 4)
        body = data[body_at : body_at + filesize]
        pos = body_at + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_initramfs_archive_is_valid_newc(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").write_bytes(b"BB" * 1001)
    (tmp_path / "bin" / "busybox").chmod(0o755)
    (tmp_path / "init").write_text("#!/bin/busybox sh\n")
    (tmp_path / "bin" / "sh").symlink_to("busybox")
    entries = _read_newc(vm._cpio_newc(tmp_path))
    assert set(entries) == {"bin", "bin/busybox", "bin/sh", "init"}
    assert entries["bin/busybox"] == (0o100755, b"BB" * 1001)
    assert entries["bin/sh"][1] == b"busybox"
    assert entries["bin"][0] & 0o170000 == 0o040000


def test_reap_kills_the_whole_session() -> None:
    # QEMU must never outlive a test: _reap kills the process group QEMU leads.
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 300 & sleep 300; wait"], start_new_session=True, stdout=subprocess.DEVNULL
    )
    time.sleep(0.2)
    vm._reap(proc)
    assert proc.returncode is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("a child of the reaped session survived")


def test_init_script_parses() -> None:
    result = subprocess.run(["sh", "-n"], input=vm.INIT, text=True, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
