"""The published identity's one grammar (xenstore/identity.py): round trips and strict refusals."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.kernel import dm, loop
from xenblockctl.kernel.blockdev import BlockIdentity
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.identity import (
    DISKSEQ,
    LUID,
    OWNER,
    PHYSICAL_DEVICE,
    PUBLISHED,
    IdentityError,
    Liveness,
    OwnerRecord,
    OwnerRecordError,
    PublishedIdentity,
    judge,
)
from xenblockctl.xenstore.vbd import XenbusState

U32 = st.integers(0, 0xFFFFFFFF)
SEQ = st.integers(1, (1 << 64) - 1)


@given(U32, U32)
def test_physical_device_round_trip(major: int, minor: int) -> None:
    text = identity.format_physical_device(major, minor)
    assert identity.parse_physical_device(text) == (major, minor)


@given(SEQ)
def test_diskseq_round_trip_in_both_nodes(seq: int) -> None:
    text = identity.format_diskseq(seq)
    assert identity.parse_luid(text) == seq
    assert identity.parse_diskseq_node(text) == seq
    nodes = PublishedIdentity(7, 3, seq).nodes()
    assert nodes == {PHYSICAL_DEVICE: "7:3", LUID: text, DISKSEQ: text}
    assert PublishedIdentity.from_nodes(nodes) == PublishedIdentity(7, 3, seq)


@pytest.mark.parametrize(
    "bad",
    [
        "07:3",
        "7:03",
        "FE:0",
        "fe:1A",
        "0x7:0",
        "7",
        "7:",
        ":3",
        "7:0\n",
        " 7:0",
        "7-0",
        "١:٣",
        "123456789:0",
        "",
    ],
)
def test_physical_device_refusals(bad: str) -> None:
    with pytest.raises(IdentityError) as info:
        identity.parse_physical_device(bad)
    assert info.value.code == "backend-record-invalid"


@pytest.mark.parametrize(
    "bad", ["1A", "Ab", "01", "0", "", "0x1a", " 1a", "1a\n", "١", "ａ", "1" * 17, "-1", "1_0"]
)
def test_luid_refusals_uppercase_leading_zero_non_ascii_overlong(bad: str) -> None:
    with pytest.raises(IdentityError):
        identity.parse_luid(bad)


def test_diskseq_node_takes_the_kernel_patch_grammar_and_nothing_more() -> None:
    """[1-9a-fA-F][0-9a-fA-F]{0,15}: uppercase as the patch accepts it (Qubes-style writers)."""
    assert identity.parse_diskseq_node("1A") == 0x1A
    assert identity.parse_diskseq_node("f" * 16) == (1 << 64) - 1
    for bad in ("0", "01", "", "0x1a", "1" * 17, "١", "ａ", "1a ", "g"):
        with pytest.raises(IdentityError):
            identity.parse_diskseq_node(bad)


def test_from_nodes_checks_every_identity_node_present() -> None:
    assert PublishedIdentity.from_nodes({}) is None
    assert PublishedIdentity.from_nodes({LUID: "1a"}) is None  # nothing published without physical-device
    assert PublishedIdentity.from_nodes({PHYSICAL_DEVICE: "7:3"}) == PublishedIdentity(7, 3, None)
    assert PublishedIdentity.from_nodes({PHYSICAL_DEVICE: "7:3", DISKSEQ: "1A"}) == PublishedIdentity(
        7, 3, 0x1A
    )
    assert PublishedIdentity.from_nodes({PHYSICAL_DEVICE: "7:3", LUID: "1a", DISKSEQ: "1A"}) == (7, 3, 0x1A)
    with pytest.raises(IdentityError, match="disagree"):
        PublishedIdentity.from_nodes({PHYSICAL_DEVICE: "7:3", LUID: "1a", DISKSEQ: "1b"})
    with pytest.raises(IdentityError):
        PublishedIdentity.from_nodes({PHYSICAL_DEVICE: "7:3", LUID: "1A"})  # ours is strict
    # a reader that must still count the backend gets what physical-device names, unverified
    assert PublishedIdentity.named({PHYSICAL_DEVICE: "7:3", LUID: "1A"}) == (7, 3, None)
    assert PublishedIdentity.named({PHYSICAL_DEVICE: "07:3"}) is None


def test_published_is_everything_add_writes() -> None:
    assert set(PUBLISHED) == {PHYSICAL_DEVICE, LUID, DISKSEQ, identity.DEVICE_PATH, OWNER}
    assert OWNER == "xenblockctl-owner"


def test_kernel_spellings_agree_with_the_published_ones() -> None:
    """The prefixes are repeated in the xenstore layer (it cannot import the kernel's)."""
    assert identity.LOOP_TAG_PREFIX == loop.TAG_PREFIX
    assert identity.DM_UUID_PREFIX == dm.OWNED_UUID_PREFIX
    ident = BlockIdentity(259, 0x1869F, 0x2A, 512, 512, 512, False)
    assert ident.physical_device == identity.format_physical_device(259, 0x1869F)
    assert ident.luid == identity.format_diskseq(0x2A)


LOOP_RECORD = "v1 kind=loop dev=7:3 seq=1db mode=w autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712"


def test_owner_record_round_trip() -> None:
    record = OwnerRecord.parse(LOOP_RECORD)
    assert record.format() == LOOP_RECORD
    assert (record.major, record.minor, record.diskseq, record.backing) == (7, 3, 0x1DB, (0xFE00, 0x20C0F6))
    assert record.identity == PublishedIdentity(7, 3, 0x1DB)
    dm_record = OwnerRecord("dm", 254, 2, 0x1DD, "w", True, (1, 2), None, "XENBLOCKCTL-812-4711")
    assert OwnerRecord.parse(dm_record.format()) == dm_record


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("dev=7:3", "dev=07:3"),
        ("dev=7:3", "dev=7:03"),
        ("seq=1db", "seq=01db"),
        ("seq=1db", "seq=1DB"),
        ("seq=1db", "seq=0"),
        ("backing=fe00:20c0f6", "backing=0fe00:20c0f6"),
        ("backing=fe00:20c0f6", "backing=fe00:020c0f6"),
        ("dev=7:3", "dev=٧:3"),
        ("seq=1db", "seq=1" + "0" * 16),
        ("tag=xenblockctl:5:51712", "tag=losetup:5"),
    ],
)
def test_owner_record_refuses_leading_zeros_and_other_spellings(old: str, new: str) -> None:
    """Two spellings of one number would let a forged record pass a text comparison (remove's
    newer-owner guard compares the record's text), so only the one we write is accepted."""
    with pytest.raises(OwnerRecordError):
        OwnerRecord.parse(LOOP_RECORD.replace(old, new))


class _Now(NamedTuple):
    diskseq: int
    size_bytes: int


def test_judge_is_the_one_verdict() -> None:
    assert judge(5, None) is Liveness.GONE
    assert judge(None, None) is Liveness.GONE
    assert judge(None, _Now(5, 4096)) is Liveness.UNVERIFIED
    assert judge(5, _Now(5, 4096)) is Liveness.LIVE
    assert judge(5, _Now(5, 0)) is Liveness.LIVE, "same diskseq: the published device, even if empty"
    assert judge(5, _Now(6, 0)) is Liveness.EMPTY
    assert judge(5, _Now(6, 4096)) is Liveness.REPLACED
    assert [v for v in Liveness if v.holds] == [Liveness.LIVE, Liveness.UNVERIFIED]


def test_backend_states_by_name() -> None:
    assert XenbusState.of("5") is XenbusState.Closing
    assert XenbusState.of(None) is None
    assert XenbusState.of("05") is None
    assert XenbusState.of("9") is None
    assert [s for s in XenbusState if s.closing] == [XenbusState.Closing, XenbusState.Closed]
