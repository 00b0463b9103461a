"""Ceph RBD through qemu-storage-daemon's rbd driver over NBD, served to a guest by the engine.

A real single-node Ceph (tests/fixtures/ceph.py), a real RBD image, QSD exporting it over NBD on a
unix socket, the engine's NBD data plane, and a simulated guest on the local transport. What the
guest wrote is read back with the `rbd` CLI (librbd), not through any path of ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.backend import PairFactory
from tests.fixtures.ceph import CephCluster
from tests.fixtures.nbd import wait_connectable
from xenblockctl.backend import blkif
from xenblockctl.backend.nbdio import NbdTarget
from xenblockctl.nbd import client, uri

MiB = 1 << 20


def test_guest_writes_land_in_an_rbd_image(
    ceph_cluster: CephCluster, make_pair: PairFactory, tmp_path: Path
) -> None:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        pytest.skip("qemu-storage-daemon not installed (Debian package qemu-system-common)")
    if not any(Path("/usr/lib/x86_64-linux-gnu/qemu").glob("block-rbd.so")):
        pytest.skip("QEMU's rbd block driver not installed (Debian package qemu-block-extra)")
    ceph_cluster.run("rbd", "create", "--size", "64M", "rbd/guest")
    sock = tmp_path / "rbd.sock"
    proc = subprocess.Popen(
        [
            qsd,
            f"--blockdev=driver=rbd,node-name=rbd0,pool=rbd,image=guest,conf={ceph_cluster.conf}",
            f"--nbd-server=addr.type=unix,addr.path={sock}",
            "--export=type=nbd,id=exp0,node-name=rbd0,name=guest,writable=on",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        started = time.monotonic()
        wait_connectable(sock, proc)
        ready = time.monotonic() - started
        parsed = uri.parse(f"nbd+unix:///guest?socket={sock}")
        with client.NbdClient.connect(parsed, timeout=10) as c:
            info = c.info
        assert info.size == 64 * MiB
        pair = make_pair(target=NbdTarget(parsed, info, True), data_pages=512, indirect_pages=8)
        data = os.urandom(MiB)
        tail = os.urandom(4096)
        assert pair.frontend.write(2048, data) == blkif.RSP_OKAY
        assert pair.frontend.write(64 * MiB // 512 - 8, tail) == blkif.RSP_OKAY  # the last 4 KiB
        assert pair.frontend.flush() == blkif.RSP_OKAY
        assert pair.frontend.read(2048, MiB) == data
        image = ceph_cluster.export_image("rbd/guest", tmp_path / "exported.raw")
        assert image[2048 * 512 : 2048 * 512 + MiB] == data
        assert image[-4096:] == tail
        print(f"qemu-storage-daemon rbd export ready in {ready * 1000:.0f} ms")
    finally:
        proc.kill()
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()
