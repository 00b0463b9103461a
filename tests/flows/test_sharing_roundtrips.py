"""The block-device sharing check reads every other backend's physical-device: streamed with
the listings, so its round trips do not grow one per backend (bench/README.md, issue 18: the
128-backend block-device add). A file's sharing check looks at every bound loop device, and pays
the identity ioctls only for those backed by the file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Libxl
from xenblockctl.blockscript import sharing
from xenblockctl.kernel import loop
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.client import XenStore

BACKENDS = 130
TARGET = os.makedev(7, 77)


def _counted(store: XenStore) -> dict[str, int]:
    """How often the store's link is asked for an exchange and for a stream, from now on."""
    calls = {"exchange": 0, "exchange_stream": 0}
    link = store._link
    for name in calls:
        real = getattr(link, name)

        def counting(*args: object, _real: object = real, _name: str = name, **kwargs: object) -> object:
            calls[_name] += 1
            return _real(*args, **kwargs)  # type: ignore[operator]

        setattr(link, name, counting)
    return calls


@pytest.mark.parametrize("per_domain", [16, 1])
def test_block_device_claims_cost_a_few_round_trips_for_many_backends(libxl: Libxl, per_domain: int) -> None:
    """16 disks for each of 9 guests, and one disk for each of 130 guests: the walk lists the
    frontend domains' directories in batches too (before: one round trip per domain, 130 here)."""
    for i in range(BACKENDS):
        be = libxl.create_backend(
            100 + i // per_domain, 51712 + 16 * (i % per_domain), f"/srv/existing-{i}.img", "w"
        )
        # two of them publish the target: both must still be found
        physical = "7:4d" if i in (5, 129) else f"fd:{i:x}"
        libxl.store.write_many({be.node("physical-device"): physical})
    own = libxl.create_backend(7, 51712, "/dev/loop77", "w")
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10, synchronous=True) as store:
        calls = _counted(store)
        home = store.home()
        claims = list(sharing.backend_claims(store, home, store.absolute(own.relative), devt=TARGET))
    assert len({c.where.split(" ")[0] for c in claims}) == 2, claims
    assert all(c.devt == TARGET for c in claims)
    # home(): one exchange; the walk: one stream (the kinds' listings, every frontend domain's, every
    # physical-device read, each sent as soon as the reply naming it is read); then the two matches'
    # records (the owner record, the public nodes). Before batching the reads this was ~150
    # exchanges (one READ per backend), before batching the listings 130 + 9 + 3 + 8 with one backend
    # per domain, before one pipeline per phase (issue 18, the 128-backend add) 2 + 3 + 3 + 4, and
    # before the stream (round 6) 1 + 1 + 1 + 1 + 2 * 2.
    assert calls["exchange_stream"] == 1, calls
    assert calls["exchange"] <= 1 + 2 * 2, calls


def test_publishers_are_found_in_walk_order_whatever_the_others_publish(libxl: Libxl) -> None:
    """identity.backends_publishing compares every physical-device text with the one spelling of
    the device (tests/unit/test_sharing_match.py): a malformed spelling, an unpublished backend
    and other devices are not matches, and the matches come in walk order (vbd, then vbd3)."""
    nodes = {}
    paths = []
    for d in range(120):
        be = f"/local/domain/0/backend/vbd/{300 + d}/51712"
        paths.append(be)
        nodes[f"{be}/physical-device"] = f"fd:{d:x}"
    for d in (0, 6, 7, 119):
        nodes[f"{paths[d]}/physical-device"] = "7:4d"
    nodes[f"{paths[8]}/physical-device"] = "7:4D"  # malformed: names no device
    del nodes[f"{paths[9]}/physical-device"]  # not published yet
    nodes[f"{paths[9]}/state"] = "2"
    vbd3 = "/local/domain/0/backend/vbd3/300/768"
    nodes[f"{vbd3}/physical-device"] = "7:4d"
    libxl.store.write_many(nodes)
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10, synchronous=True) as store:
        found = identity.backends_publishing(store, store.home(), TARGET, skip=paths[6])
    assert [entry.path for entry in found] == [paths[0], paths[7], paths[119], vbd3]


#: BLKGETDISKSEQ, _IOR(0x12, 128, __u64): the ioctl that reads a device's diskseq.
BLKGETDISKSEQ = "0x80081280"
STRACE = ("strace", "-f", "-X", "raw", "-e", "trace=ioctl")
SCAN = (
    "import sys; from xenblockctl.blockscript import sharing; "
    "w = sharing.Wanted(writable=True, file_id=(int(sys.argv[1]), int(sys.argv[2]))); "
    "print(len(list(sharing._all_claims(None, '', '', w))))"  # a file's claims need no xenstore
)


@pytest.mark.root
@pytest.mark.usefixtures("needs_loop")
def test_file_claims_read_the_identity_only_of_loops_backed_by_the_file(make_image: ImageFactory) -> None:
    """Before: LOOP_GET_STATUS64, the five identity ioctls and a sysfs read for every bound loop
    device on the host, on every file add (bench/README.md, issue 18 round 3: 32 parallel adds)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    target, other = make_image("target.img"), make_image("other.img")
    devices: list[loop.LoopDevice] = []
    try:
        for image, tag in ((target, "target"), (other, "other-1"), (other, "other-2")):
            devices.append(loop.attach_file(str(image), read_only=True, tag=f"xenblockctl:test-{tag}"))
        st = os.stat(target)
        log = Path(target).with_name("strace.txt")
        result = subprocess.run(
            [*STRACE, "-o", str(log), sys.executable, "-c", SCAN, str(st.st_dev), str(st.st_ino)],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        diskseq_reads = log.read_text().count(BLKGETDISKSEQ)
    finally:
        for dev in devices:
            dev.close()
    assert diskseq_reads == 1, f"{diskseq_reads} diskseq reads for one loop device backed by the file"
    assert result.stdout.strip() == "1", "claims: the one loop device backed by the target"


#: What a block-device target's sharing check (every backend's physical-device, mounts, dm/md
#: holders in sysfs) must not import: pathlib came with the sysfs lookup and brought fnmatch, re,
#: enum, urllib.parse and ipaddress, ~5 ms of CPU in every block-device add (bench/README.md,
#: issue 18 round 6).
HEAVY = ("pathlib", "fnmatch", "re", "enum", "urllib", "ipaddress")
BLOCK_CHECK = (
    "import os, sys; sys.path[:0] = sys.argv[2:]; "
    "from xenblockctl.blockscript import sharing; from xenblockctl.xenstore.client import XenStore; "
    "store = XenStore.connect(sys.argv[1], timeout=10, synchronous=True); "
    "w = sharing.Wanted(writable=True, devt=os.makedev(7, 1048000), diskseq=1); "
    "sharing.check(store, store.home(), store.absolute('backend/vbd/5/51712'), w); "
    "print(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(HEAVY) + "))"
)


def test_a_block_device_sharing_check_imports_nothing_heavy(libxl: Libxl) -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-S", "-c", BLOCK_CHECK, libxl.xenstored.socket_path, str(root)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the block-device sharing check imported {result.stdout}"


NBD_URI = "nbd+unix:///disk?socket=/run/x.sock"
NBD_RECORD = f"v1 kind=nbd mode=w size=1000000 flags=d6d socket=fe00:20c0f6:187e0c1a2b3c4d5e uri={NBD_URI}"
LOOP_RECORD = "v1 kind=loop dev=7:3 seq=1db mode=r autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712"


def test_claims_of_every_backend_cost_a_stream_and_a_batch(libxl: Libxl) -> None:
    """An NBD export's sharing check takes every other backend's claims (backend_claims without a
    devt): each backend's owner record is streamed with the listings, and the public nodes of
    those without a valid one are read in one batch. Before, that was two round trips per
    backend, one after the other (~260 here). The claims are what each backend's nodes say, in
    walk order: an NBD record's URI, a loop record's device, a stock-script backend's
    physical-device (mode unknown: writable), a malformed record's public nodes, nothing for a
    backend that publishes nothing."""
    nodes: dict[str, str] = {}
    paths = [f"/local/domain/0/backend/vbd/{300 + d}/51712" for d in range(130)]
    for d, be in enumerate(paths):
        kind = d % 5
        if kind == 0:
            nodes[f"{be}/xenblockctl-owner"] = NBD_RECORD
        elif kind == 1:
            nodes[f"{be}/xenblockctl-owner"] = LOOP_RECORD
        elif kind == 2:
            nodes[f"{be}/physical-device"] = f"8:{d:x}"
        elif kind == 3:
            nodes[f"{be}/xenblockctl-owner"] = "v1 kind=loop garbage"
            nodes[f"{be}/physical-device"] = f"8:{d:x}"
            nodes[f"{be}/physical-device-luid"] = "1f"
            nodes[f"{be}/mode"] = "r"
        else:
            nodes[f"{be}/state"] = "2"
    libxl.store.write_many(nodes)
    own = "/local/domain/0/backend/vbd/300/51712"
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10, synchronous=True) as store:
        calls = _counted(store)
        home = store.home()
        claims = list(sharing.backend_claims(store, home, own))
    assert calls == {"exchange": 1 + 1, "exchange_stream": 1}, calls  # home(), the public batch
    expected = []
    for d, be in enumerate(paths):
        if be == own:
            continue
        kind, frontend = d % 5, 300 + d
        if kind == 0:
            expected.append(sharing.Claim(be, True, frontend=frontend, nbd_uri=NBD_URI))
        elif kind == 1:
            expected.append(
                sharing.Claim(
                    be,
                    False,
                    file_id=(0xFE00, 0x20C0F6),
                    devt=os.makedev(7, 3),
                    diskseq=0x1DB,
                    frontend=frontend,
                )
            )
        elif kind == 2:
            expected.append(sharing.Claim(be, True, devt=os.makedev(8, d), frontend=frontend))
        elif kind == 3:
            expected.append(sharing.Claim(be, False, devt=os.makedev(8, d), diskseq=0x1F, frontend=frontend))
    assert claims == expected
