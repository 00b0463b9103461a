"""blkif codecs: byte offsets as in xen-block-protocol.md §6.2, round trips, ring geometry."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import (
    DiscardRequest,
    IndirectRequest,
    Response,
    Segment,
    SegmentRequest,
    UnknownRequest,
)

ABIS = [blkif.X86_64, blkif.X86_32]
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


def test_constants_match_reference() -> None:
    assert (blkif.OP_READ, blkif.OP_WRITE, blkif.OP_WRITE_BARRIER, blkif.OP_FLUSH_DISKCACHE) == (0, 1, 2, 3)
    assert (blkif.OP_RESERVED_1, blkif.OP_DISCARD, blkif.OP_INDIRECT) == (4, 5, 6)
    assert (blkif.RSP_OKAY, blkif.RSP_ERROR, blkif.RSP_EOPNOTSUPP) == (0, -1, -2)
    assert blkif.MAX_SEGMENTS_PER_REQUEST == 11
    assert blkif.MAX_INDIRECT_PAGES_PER_REQUEST == 8
    assert blkif.SEGMENTS_PER_INDIRECT_PAGE == 512
    assert (blkif.VDISK_CDROM, blkif.VDISK_REMOVABLE, blkif.VDISK_READONLY) == (1, 2, 4)
    assert blkif.DISCARD_SECURE == 1
    assert blkif.SECTOR_SIZE == 512


@pytest.mark.parametrize(
    ("abi", "entry", "response", "indirect", "discard", "id_off", "sector_off", "seg_off"),
    [(blkif.X86_64, 112, 16, 64, 32, 8, 16, 24), (blkif.X86_32, 108, 12, 64, 28, 4, 12, 20)],
    ids=["x86_64", "x86_32"],
)
def test_sizes_and_offsets(  # noqa: PLR0917 (one parameter per reference column)
    abi: blkif.Abi,
    entry: int,
    response: int,
    indirect: int,
    discard: int,
    id_off: int,
    sector_off: int,
    seg_off: int,
) -> None:
    assert abi.entry_size == entry
    assert abi.response_size == response
    assert abi.indirect_size == indirect
    assert abi.discard_size == discard
    assert abi.id_offset == id_off
    assert abi.segments_offset == seg_off
    # Build a request with distinctive values and find each field at its reference offset.
    segs = tuple(Segment(0x11223344 + i, i % 8, 7) for i in range(11))
    raw = abi.encode_request(SegmentRequest(1, 11, 0xBEEF, 0x0102030405060708, 0x1112131415161718, segs))
    assert raw[0] == 1
    assert raw[1] == 11
    assert struct.unpack_from("<H", raw, 2)[0] == 0xBEEF
    assert struct.unpack_from("<Q", raw, id_off)[0] == 0x0102030405060708
    assert struct.unpack_from("<Q", raw, sector_off)[0] == 0x1112131415161718
    for i in range(11):
        gref, first, last = struct.unpack_from("<IBB", raw, seg_off + 8 * i)
        assert (gref, first, last) == (0x11223344 + i, i % 8, 7)


@pytest.mark.parametrize(("abi", "handle_off", "grefs_off"), [(blkif.X86_64, 24, 28), (blkif.X86_32, 20, 24)])
def test_indirect_offsets(abi: blkif.Abi, handle_off: int, grefs_off: int) -> None:
    req = IndirectRequest(blkif.OP_WRITE, 300, 0xA1A2A3A4A5A6A7A8, 99, 0x5151, tuple(range(1000, 1008)))
    raw = abi.encode_request(req)
    assert raw[0] == blkif.OP_INDIRECT
    assert raw[1] == blkif.OP_WRITE
    assert struct.unpack_from("<H", raw, 2)[0] == 300  # nr_segments is u16 here
    assert struct.unpack_from("<Q", raw, abi.id_offset)[0] == 0xA1A2A3A4A5A6A7A8
    assert struct.unpack_from("<H", raw, handle_off)[0] == 0x5151
    assert list(struct.unpack_from("<8I", raw, grefs_off)) == list(range(1000, 1008))
    assert raw[abi.indirect_size :] == bytes(abi.entry_size - abi.indirect_size)


@pytest.mark.parametrize(("abi", "nr_off"), [(blkif.X86_64, 24), (blkif.X86_32, 20)])
def test_discard_offsets(abi: blkif.Abi, nr_off: int) -> None:
    raw = abi.encode_request(DiscardRequest(blkif.DISCARD_SECURE, 3, 77, 4096, 0xDEADBEEF))
    assert raw[0] == blkif.OP_DISCARD
    assert raw[1] == blkif.DISCARD_SECURE
    assert struct.unpack_from("<Q", raw, nr_off)[0] == 0xDEADBEEF


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
def test_response_layout_zeroes_padding(abi: blkif.Abi) -> None:
    # Pre-fill with 0xFF: every byte that is not id/op/status must come back zero (XSA-216).
    buf = bytearray(b"\xff" * 32)
    abi.pack_response_into(buf, 0, Response(0x0102030405060708, 0x33, -2))
    assert struct.unpack_from("<Q", buf, 0)[0] == 0x0102030405060708
    assert buf[8] == 0x33
    assert buf[9] == 0  # pad
    assert struct.unpack_from("<h", buf, 10)[0] == -2
    assert buf[12 : abi.response_size] == bytes(abi.response_size - 12)
    assert buf[abi.response_size :] == b"\xff" * (32 - abi.response_size)  # nothing beyond the struct


@pytest.mark.parametrize(("pages", "entries"), [(1, 32), (2, 64), (4, 128), (8, 256), (16, 512), (32, 1024)])
@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
def test_ring_size(abi: blkif.Abi, pages: int, entries: int) -> None:
    assert blkif.ring_size(pages, abi) == entries


def test_ring_order_bounded_by_advertised() -> None:
    assert [blkif.ring_pages_for_order(o) for o in range(5)] == [1, 2, 4, 8, 16]
    for bad in (-1, 5, 30):
        with pytest.raises(blkif.BlkifError) as exc:
            blkif.ring_pages_for_order(bad)
        assert exc.value.code == "blkif-invalid"
    with pytest.raises(blkif.BlkifError):
        blkif.ring_pages_for_order(3, max_order=2)


def test_protocol_strings_and_default() -> None:
    assert blkif.abi_for_protocol("x86_64-abi") is blkif.X86_64
    assert blkif.abi_for_protocol("x86_32-abi") is blkif.X86_32
    # missing protocol: Linux blkback's x86 default
    assert blkif.abi_for_protocol(None) is blkif.X86_32
    assert blkif.abi_for_protocol("") is blkif.X86_32
    for bad in ("arm-abi", "x86_64", "x86_64-abi\x00junk", "\xff" * 100):
        with pytest.raises(blkif.BlkifError) as exc:
            blkif.abi_for_protocol(bad)
        assert exc.value.code == "blkif-invalid"
        assert len(str(exc.value)) < 200


def test_info_bits() -> None:
    assert blkif.info_bits(read_only=False) == 0
    assert blkif.info_bits(read_only=True, cdrom=True, removable=True) == 7


def test_indirect_pages_needed() -> None:
    assert [blkif.indirect_pages_needed(n) for n in (1, 511, 512, 513, 4096)] == [1, 1, 1, 2, 8]


# --- round trips under hypothesis -------------------------------------------------------------
segment = st.builds(Segment, u32, u8, u8)


@st.composite
def segment_requests(draw: st.DrawFn) -> SegmentRequest:
    op = draw(st.sampled_from(sorted(blkif.SEGMENT_OPS)))
    nr = draw(u8)
    segs = tuple(draw(st.lists(segment, min_size=min(nr, 11), max_size=min(nr, 11))))
    return SegmentRequest(op, nr, draw(u16), draw(u64), draw(u64), segs)


requests = st.one_of(
    segment_requests(),
    st.builds(DiscardRequest, u8, u16, u64, u64, u64),
    st.builds(IndirectRequest, u8, u16, u64, u64, u16, st.tuples(*[u32] * 8)),
    st.builds(UnknownRequest, st.integers(7, 255) | st.just(blkif.OP_RESERVED_1), u64),
)


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@given(req=requests)
def test_request_round_trip(abi: blkif.Abi, req: blkif.Request) -> None:
    raw = abi.encode_request(req)
    assert len(raw) == abi.entry_size
    assert abi.decode_request(raw) == req


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@given(rsp=st.builds(Response, u64, u8, st.integers(-0x8000, 0x7FFF)))
def test_response_round_trip(abi: blkif.Abi, rsp: Response) -> None:
    assert abi.decode_response(abi.encode_response(rsp)) == rsp


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@given(raw=st.binary(min_size=112, max_size=112))
def test_any_slot_decodes(abi: blkif.Abi, raw: bytes) -> None:
    """Whatever the guest writes decodes to some request; nothing raises."""
    req = abi.decode_request(raw)
    assert req.operation == raw[0]
    if isinstance(req, SegmentRequest):
        assert len(req.segments) == min(req.nr_segments, 11)


@given(segs=st.lists(segment, max_size=600))
def test_indirect_segments_round_trip(segs: list[Segment]) -> None:
    data = blkif.encode_indirect_segments(segs)
    assert len(data) == 8 * len(segs)
    assert blkif.decode_indirect_segments(data, len(segs)) == tuple(segs)
    with pytest.raises(ValueError, match="shorter"):
        blkif.decode_indirect_segments(data, len(segs) + 1)


@given(grefs=st.lists(u32, max_size=600))
def test_whole_page_descriptors_equal_packed_segments(grefs: list[int]) -> None:
    """The strided fast path writes exactly what one descriptor per page would."""
    expected = blkif.encode_indirect_segments([Segment(g, 0, 7) for g in grefs])
    assert blkif.whole_page_descriptors(grefs) == expected
    assert blkif.pack_descriptors([(g, 0, 7) for g in grefs]) == expected


def test_descriptor_packers_refuse_out_of_range_fields() -> None:
    with pytest.raises(OverflowError):
        blkif.whole_page_descriptors([2**32])
    with pytest.raises(struct.error):
        blkif.pack_descriptors([(1, 256, 7)])
    with pytest.raises(struct.error):
        blkif.pack_descriptors([(-1, 0, 7)])


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
def test_segment_header_is_the_slot_prefix(abi: blkif.Abi) -> None:
    req = SegmentRequest(blkif.OP_WRITE, 3, 0xBEEF, 2**64 - 2, 2**40 + 5, (Segment(7, 1, 2),))
    raw = abi.encode_request(req)
    assert abi.segment_header.size == abi.segments_offset
    assert abi.segment_header.unpack_from(raw) == (blkif.OP_WRITE, 3, 0xBEEF, 2**64 - 2, 2**40 + 5)
    assert blkif.SEGMENT_STRUCT.unpack_from(raw, abi.segments_offset) == (7, 1, 2)
