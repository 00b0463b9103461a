"""The owner record (blockscript/owner.py; its grammar: xenstore/identity.py) and the published
luid: strict parsing, because a record we cannot parse exactly is one whose ownership we cannot
prove. Pure: no kernel, no xenstore."""

from __future__ import annotations

import os

import pytest

from xenblockctl.blockscript.owner import OwnerRecord, OwnerRecordError
from xenblockctl.kernel import dm
from xenblockctl.kernel.blockdev import BlockIdentity
from xenblockctl.xenstore.identity import IdentityError, parse_luid

IDENT = BlockIdentity(254, 3, 0x1DD, 8 << 20, 512, 512, False)


def test_dm_owner_record_round_trips() -> None:
    uuid = dm.make_owned_uuid("snap")
    rec = OwnerRecord.for_dm(IDENT, uuid=uuid, backing=(0xFE00, 0x20C0F6), writable=True)
    text = rec.format()
    assert text == f"v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 backing=fe00:20c0f6 uuid={uuid}"
    assert OwnerRecord.parse(text) == rec
    assert rec.devt == os.makedev(254, 3)


def test_records_written_before_kind_dm_still_parse() -> None:
    text = "v1 kind=loop dev=7:3 seq=1db mode=w autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712"
    rec = OwnerRecord.parse(text)
    assert (rec.kind, rec.uuid, rec.tag) == ("loop", None, "xenblockctl:5:51712")
    assert OwnerRecord.parse("v1 kind=device dev=fe:0 seq=5 mode=r autoclear=0").kind == "device"


@pytest.mark.parametrize(
    "text",
    [
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1",  # no uuid: ownership unprovable
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 uuid=LVM-someone-elses",
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 uuid=XENBLOCKCTL-",
        "v1 kind=dm dev=fe:3 seq=1dd mode=w autoclear=1 uuid=XENBLOCKCTL-1-2-3 tag=xenblockctl:5:1",
        "v1 kind=device dev=fe:3 seq=1dd mode=w autoclear=0 uuid=XENBLOCKCTL-1-2-3",
        "v1 kind=dmx dev=fe:3 seq=1dd mode=w autoclear=1 uuid=XENBLOCKCTL-1-2-3",
    ],
)
def test_malformed_dm_records_are_refused(text: str) -> None:
    with pytest.raises(OwnerRecordError):
        OwnerRecord.parse(text)


def test_owner_record_knows_our_dm_uuid_prefix() -> None:
    """owner.py repeats the prefix so the hotplug path need not import the dm module: keep in step."""
    uuid = dm.make_owned_uuid("snap")
    assert uuid.startswith(dm.OWNED_UUID_PREFIX)
    OwnerRecord.parse(f"v1 kind=dm dev=fe:3 seq=1 mode=w autoclear=1 uuid={uuid}")
    with pytest.raises(OwnerRecordError):
        OwnerRecord.parse(f"v1 kind=dm dev=fe:3 seq=1 mode=w autoclear=1 uuid=X{uuid}")


LOOP_RECORD = "v1 kind=loop dev=7:3 seq=1db mode=w autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712"


@pytest.mark.parametrize(
    ("field", "padded"),
    [
        ("dev=7:3", "dev=07:3"),
        ("dev=7:3", "dev=7:03"),
        ("seq=1db", "seq=01db"),
        ("backing=fe00", "backing=0fe00"),
    ],
)
def test_leading_zeros_are_refused(field: str, padded: str) -> None:
    """Numbers are written one way only (lowercase hex, no leading zero), as physical-device is: a
    record with another spelling was not written by us, and string comparisons of records (remove's
    newer-owner guard) rely on there being one spelling."""
    OwnerRecord.parse(LOOP_RECORD)
    with pytest.raises(OwnerRecordError):
        OwnerRecord.parse(LOOP_RECORD.replace(field, padded))


@pytest.mark.parametrize("text", ["01db", "0", "1DB", "", "1db ", "x1", "1" * 17])
def test_bad_luids_are_refused(text: str) -> None:
    with pytest.raises(IdentityError):
        parse_luid(text)


def test_luid_round_trips() -> None:
    assert parse_luid("1db") == 0x1DB
    assert parse_luid("f" * 16) == (1 << 64) - 1
