"""dm ABI codecs without a kernel: round-trips, table packing, and parsers fed with real kernel
replies captured in the dm lane (tests/unit/dm_replies.json)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.kernel import dm_abi
from xenblockctl.kernel.dm_abi import (
    DM_DATA_START,
    DM_TARGET_SPEC,
    Cmd,
    DmIoctl,
    Flag,
    NameListEntry,
    Target,
    align8,
    pack_table,
    parse_deps,
    parse_name_list,
    parse_table,
    parse_target_versions,
)

REPLIES = json.loads((Path(__file__).parent / "dm_replies.json").read_text())


def reply(name: str) -> tuple[DmIoctl, bytes]:
    raw = bytes.fromhex(REPLIES[name])
    hdr = DmIoctl.unpack(raw)
    return hdr, raw[hdr.data_start : hdr.data_size] if hdr.data_size > hdr.data_start else b""


names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/"),
    min_size=1,
    max_size=127,
).filter(lambda s: s not in ("control", ".", ".."))
uuids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/"), max_size=128
)
u32 = st.integers(0, 2**32 - 1)


headers = st.builds(
    DmIoctl,
    name=names,
    uuid=uuids,
    flags=u32,
    dev=st.integers(0, 2**64 - 1),
    version=st.tuples(u32, u32, u32),
    data_size=u32,
    data_start=u32,
    target_count=u32,
    open_count=st.integers(-(2**31), 2**31 - 1),
    event_nr=u32,
)


@given(headers)
def test_dm_ioctl_round_trip(hdr: DmIoctl) -> None:
    raw = hdr.pack()
    assert len(raw) == 312
    assert DmIoctl.unpack(raw) == hdr


def test_dm_ioctl_rejects_overlong_fields() -> None:
    with pytest.raises(ValueError, match="name too long"):
        DmIoctl(name="a" * 128).pack()
    with pytest.raises(ValueError, match="uuid too long"):
        DmIoctl(uuid="u" * 129).pack()
    assert len(DmIoctl(name="a" * 127, uuid="u" * 128).pack()) == 312


def test_request_numbers_match_the_reference_table() -> None:
    # kernel-devices.md §11.2: _IOWR(0xFD, nr, struct dm_ioctl) == 0xC138FD00 | nr on x86-64.
    for cmd in Cmd:
        assert dm_abi.request(cmd) == 0xC138FD00 | cmd.value
    assert dm_abi.request(Cmd.GET_TARGET_VERSION) == 0xC138FD11


params_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
target_types = st.text(
    alphabet=st.characters(min_codepoint=0x61, max_codepoint=0x7A), min_size=1, max_size=15
)


@given(st.lists(st.tuples(st.integers(1, 2**40), target_types, params_text), min_size=1, max_size=12))
def test_table_packing_round_trips_and_aligns(rows: list[tuple[int, str, str]]) -> None:
    targets: list[Target] = []
    start = 0
    for length, ttype, params in rows:
        targets.append(Target(start, length, ttype, params))
        start += length
    payload, count = pack_table(targets)
    assert count == len(targets)
    assert len(payload) % 8 == 0
    # walk the input-form `next` chain: relative to each spec, every spec 8-aligned (6.5+ checks it)
    pos = 0
    for i, t in enumerate(targets):
        assert pos % 8 == 0
        s_start, s_len, status, nxt, ttype = DM_TARGET_SPEC.unpack_from(payload, pos)
        assert (s_start, s_len, status) == (t.start, t.length, 0)
        assert ttype.rstrip(b"\0").decode() == t.type
        params_end = payload.index(b"\0", pos + DM_TARGET_SPEC.size)
        assert nxt == align8(params_end + 1 - pos)
        pos += nxt
        if i == len(targets) - 1:
            assert pos == len(payload)
    assert parse_table(payload, count, status_output=False) == targets


def test_one_linear_target_is_the_documented_360_byte_buffer() -> None:
    payload, count = pack_table([Target(0, 131072, "linear", "7:0 0")])
    assert (count, DM_DATA_START + len(payload)) == (1, 360)
    assert payload[:40] == struct.pack("=QQiI16s", 0, 131072, 0, 48, b"linear")
    assert payload[40:] == b"7:0 0\0\0\0"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (Target(0, 8, "", "x"), "target type"),
        (Target(0, 8, "a" * 16, "x"), "target type"),
        (Target(0, 0, "linear", "x"), "extent"),
        (Target(-1, 8, "linear", "x"), "extent"),
        (Target(0, 8, "linear", "a\0b"), "NUL"),
    ],
)
def test_table_packing_refuses_bad_targets(target: Target, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_table([target])


def test_parse_table_refuses_a_next_that_does_not_advance() -> None:
    spec = DM_TARGET_SPEC.pack(0, 8, 0, 0, b"linear") + b"7:0 0\0\0\0"
    with pytest.raises(ValueError, match="does not advance"):
        parse_table(spec + spec, 2, status_output=True)


def test_kernel_version_reply() -> None:
    hdr, data = reply("VERSION")
    assert hdr.version == (4, 47, 0)
    assert data == b""


def test_kernel_device_list_reply_with_uuids() -> None:
    _, data = reply("LIST_DEVICES")
    entries = parse_name_list(data)
    assert entries == [
        NameListEntry("xbc-cap-a", os.makedev(254, 0), 0, "CAP-UUID-A"),
        NameListEntry("xbc-cap-bb", os.makedev(254, 1), 0, ""),
    ]


def test_kernel_buffer_full_reply() -> None:
    hdr, _ = reply("LIST_DEVICES_SMALL")
    assert hdr.flags & Flag.BUFFER_FULL


def test_kernel_dev_status_reply() -> None:
    hdr, data = reply("DEV_STATUS")
    assert (hdr.name, hdr.uuid, hdr.dev, hdr.target_count, hdr.open_count) == (
        "xbc-cap-a",
        "CAP-UUID-A",
        os.makedev(254, 0),
        2,
        0,
    )
    assert hdr.flags & Flag.ACTIVE_PRESENT
    assert not hdr.flags & Flag.SUSPEND
    assert data == b""


def test_kernel_table_status_reply() -> None:
    hdr, data = reply("TABLE_STATUS")
    assert parse_table(data, hdr.target_count, status_output=True) == [
        Target(0, 4096, "linear", "7:0 0"),
        Target(4096, 4096, "linear", "7:0 4096"),
    ]
    hdr, data = reply("TABLE_STATUS_STATUSLINES")
    assert [(t.type, t.params) for t in parse_table(data, hdr.target_count, status_output=True)] == [
        ("linear", ""),
        ("linear", ""),
    ]


def test_kernel_deps_reply() -> None:
    _, data = reply("TABLE_DEPS")
    assert parse_deps(data) == [os.makedev(7, 0)]


def test_kernel_target_versions_reply() -> None:
    _, data = reply("LIST_VERSIONS")
    versions = {v.name: v.version for v in parse_target_versions(data)}
    assert versions["linear"] == (1, 4, 0)
    assert versions["snapshot"] == (1, 16, 0)
    assert list(versions) == ["snapshot-merge", "snapshot-origin", "snapshot", "striped", "linear", "error"]


def _name_list(entries: list[tuple[int, str, int | None, str | None]]) -> bytes:
    """Build dm_name_list records as the kernel does (old form when event_nr is None)."""
    out = bytearray()
    starts = []
    for dev, name, event, uuid in entries:
        starts.append(len(out))
        rec = bytearray(struct.pack("=QI", dev, 0) + name.encode() + b"\0")
        if event is not None:
            rec += bytes(align8(len(out) + len(rec)) - len(out) - len(rec))
            flags = 0 if uuid is None else (1 if uuid else 2)
            rec += struct.pack("=II", event, flags)
            if uuid:
                rec += bytes(align8(len(out) + len(rec)) - len(out) - len(rec)) + uuid.encode() + b"\0"
        rec += bytes(align8(len(out) + len(rec)) - len(out) - len(rec))
        out += rec
    for i in range(len(starts) - 1):
        struct.pack_into("=I", out, starts[i] + 8, starts[i + 1] - starts[i])
    return bytes(out)


entry_rows = st.lists(
    st.tuples(st.integers(1, 2**32), names, st.one_of(st.none(), u32), st.one_of(st.none(), uuids)),
    min_size=1,
    max_size=8,
)


@given(entry_rows)
def test_name_list_parser_handles_old_and_new_records(
    rows: list[tuple[int, str, int | None, str | None]],
) -> None:
    rows = [(d, n, e, (u if e is not None else None)) for d, n, e, u in rows]
    parsed = parse_name_list(_name_list(rows))
    assert [(e.dev, e.name) for e in parsed] == [(d, n) for d, n, _, _ in rows]
    for entry, (_, _, event, uuid) in zip(parsed, rows, strict=True):
        assert entry.event_nr == event
        assert entry.uuid == uuid


def test_name_list_empty() -> None:
    assert parse_name_list(struct.pack("=QI", 0, 0) + bytes(4)) == []
    assert parse_name_list(b"") == []


@pytest.mark.parametrize("name", ["vg0-lv--data", "a", "x" * 127, "with.dots_and+plus", "A:B"])
def test_valid_names(name: str) -> None:
    assert dm_abi.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "control", ".", "..", "x" * 128, "sp ace", "tab\t", "ü"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError):
        dm_abi.validate_name(name)


def test_uuid_limits() -> None:
    assert dm_abi.validate_uuid("u" * 128)
    for bad in ("", "u" * 129, "has space"):
        with pytest.raises(ValueError):
            dm_abi.validate_uuid(bad)


@pytest.mark.parametrize(
    ("vg", "lv", "name"),
    [("vg0", "root", "vg0-root"), ("my-vg", "lv-a", "my--vg-lv--a"), ("v", "a--b", "v-a----b")],
)
def test_lvm_names(vg: str, lv: str, name: str) -> None:
    assert dm_abi.lvm_dm_name(vg, lv) == name
