"""The kind=nbd owner record (xenstore/identity.py NbdOwnerRecord): what identifies an NBD export
the engine serves. Strict like every owner record: one we cannot parse exactly proves nothing, so
the engine refuses it and readers touch nothing. Pure: no kernel, no xenstore."""

from __future__ import annotations

import pytest

from xenblockctl.xenstore.identity import (
    NbdOwnerRecord,
    OwnerRecord,
    OwnerRecordError,
    parse_owner,
)

UNIX = "nbd+unix:///disk?socket=/run/x.sock"
TEXT = f"v1 kind=nbd mode=w size=1000000 flags=d6d socket=fe00:20c0f6:187e0c1a2b3c4d5e uri={UNIX}"


def test_round_trips_and_is_told_from_device_records() -> None:
    rec = NbdOwnerRecord(UNIX, 16 << 20, 0xD6D, "w", (0xFE00, 0x20C0F6, 0x187E0C1A2B3C4D5E))
    assert rec.format() == TEXT
    assert parse_owner(TEXT) == rec
    assert rec.kind == "nbd"
    tcp = NbdOwnerRecord("nbd://127.0.0.1:10809/disk", 512, 0x56D, "r")
    assert parse_owner(tcp.format()) == tcp
    loop = "v1 kind=loop dev=7:3 seq=1db mode=w autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712"
    assert isinstance(parse_owner(loop), OwnerRecord)


def test_a_device_reader_never_takes_an_nbd_record_for_a_device() -> None:
    with pytest.raises(OwnerRecordError, match="names no device"):
        OwnerRecord.parse(TEXT)


@pytest.mark.parametrize(
    "text",
    [
        TEXT.replace("size=1000000", "size=0"),  # an empty export is never published
        TEXT.replace("size=1000000", "size=01000000"),  # leading zero
        TEXT.replace("flags=d6d", "flags=10000"),  # 16-bit field
        TEXT.replace("flags=d6d", "flags=D6D"),
        TEXT.replace("mode=w", "mode=rw"),
        TEXT.replace(" socket=fe00:20c0f6:187e0c1a2b3c4d5e", ""),  # unix without the socket's identity
        TEXT.replace("socket=fe00:20c0f6:187e0c1a2b3c4d5e", "socket=fe00:20c0f6"),  # no ctime
        "v1 kind=nbd mode=w size=200 flags=1 socket=1:2 uri=nbd://h:10809/d",  # tcp with one
        TEXT.replace(f"uri={UNIX}", "uri=/dev/sda"),
        TEXT.replace(f"uri={UNIX}", "uri=nbd://h/d\x01"),
        TEXT + " tag=xenblockctl:1:2",  # unknown field
        TEXT.replace("v1 ", "v2 "),
        TEXT.replace(" size=1000000", ""),
    ],
)
def test_malformed_records_are_refused(text: str) -> None:
    with pytest.raises(OwnerRecordError):
        parse_owner(text)
