"""The sharing rules on in-memory claims (blockscript/sharing.py conflicts, mount_claims): which
user of a file or block device forbids which attach. Pure: the claims are built here; the host
lane (tests/flows/test_sharing_devices.py) proves the same rules end to end on real loop devices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xenblockctl.blockscript.sharing import Claim, Wanted, conflicts, mount_claims

FILE = (0xFE00, 0x20C0F6)
OTHER_FILE = (0xFE00, 0x20C0F7)
DEVT = os.makedev(7, 3)
SEQ = 0x1DB


def wanted_file(writable: bool) -> Wanted:
    return Wanted(writable=writable, file_id=FILE)


def wanted_device(writable: bool, diskseq: int | None = SEQ) -> Wanted:
    return Wanted(writable=writable, devt=DEVT, diskseq=diskseq)


@pytest.mark.parametrize(("want_w", "claim_w", "refused"), [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)])
def test_a_file_is_shared_only_read_only(want_w: int, claim_w: int, refused: int) -> None:
    claim = Claim("/dev/loop3 (xenblockctl:5:51712)", bool(claim_w), file_id=FILE)
    assert conflicts(wanted_file(bool(want_w)), claim) is bool(refused)


@pytest.mark.parametrize(("want_w", "claim_w", "refused"), [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)])
def test_a_device_is_shared_only_read_only(want_w: int, claim_w: int, refused: int) -> None:
    claim = Claim("backend/vbd/6/51712", bool(claim_w), devt=DEVT, diskseq=SEQ)
    assert conflicts(wanted_device(bool(want_w)), claim) is bool(refused)


def test_another_file_or_device_never_conflicts() -> None:
    assert not conflicts(wanted_file(True), Claim("/dev/loop4", True, file_id=OTHER_FILE))
    assert not conflicts(
        wanted_device(True), Claim("backend/vbd/6/51712", True, devt=os.makedev(7, 4), diskseq=SEQ)
    )
    # a file is not its loop device: a claim on the device number says nothing about the file
    assert not conflicts(wanted_file(True), Claim("backend/vbd/6/51712", True, devt=DEVT, diskseq=SEQ))


def test_a_claim_on_an_older_binding_of_the_number_is_not_ours() -> None:
    """Device numbers are re-used; a claim naming another diskseq names someone else's disk."""
    assert not conflicts(wanted_device(True), Claim("backend/vbd/6/51712", True, devt=DEVT, diskseq=SEQ - 1))


def test_a_claim_whose_diskseq_is_unknown_counts() -> None:
    """Stock script backends (no luid) and mounts cannot be proven stale: they forbid a writer."""
    assert conflicts(wanted_device(True), Claim("backend/vbd/6/51712", True, devt=DEVT))
    assert conflicts(wanted_device(True), Claim("mount /srv", False, devt=DEVT))
    assert conflicts(
        wanted_device(True, diskseq=None), Claim("backend/vbd/6/51712", True, devt=DEVT, diskseq=SEQ)
    )
    assert not conflicts(wanted_device(False), Claim("mount /srv", False, devt=DEVT))


def test_mount_claims_read_major_minor_and_rw(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 7:3 / /srv rw,relatime shared:1 - ext4 /dev/loop3 rw\n"
        "23 1 7:4 / /mnt/ro ro,relatime shared:2 - ext4 /dev/loop4 ro\n"
        "24 1 0:21 / /proc rw,nosuid - proc proc rw\n"  # major 0: not a block device
        "25 1 7:x / /bad rw - ext4 /dev/x rw\n"  # malformed: skipped, never guessed
        "short line\n"
    )
    claims = list(mount_claims(str(mountinfo)))
    assert [(c.where, c.writable, c.devt, c.diskseq) for c in claims] == [
        ("mount /srv", True, os.makedev(7, 3), None),
        ("mount /mnt/ro", False, os.makedev(7, 4), None),
    ]


def test_unreadable_mountinfo_gives_no_claims(tmp_path: Path) -> None:
    assert list(mount_claims(str(tmp_path / "missing"))) == []
