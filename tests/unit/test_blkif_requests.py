"""Request validation: every rule answers with the right status; nothing raises for any input."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import DiscardRequest, IndirectRequest, Segment, SegmentRequest, UnknownRequest
from xenblockctl.backend.requests import DeviceLimits, IoPlan, IoSegment, Kind, Rejection, validate

LIMITS = DeviceLimits(sectors=2048, discard=True, barrier=True)
FULL = (Segment(9, 0, 7),)


def rw(op: int, sector: int = 0, segs: tuple[Segment, ...] = FULL, nr: int | None = None) -> SegmentRequest:
    return SegmentRequest(op, len(segs) if nr is None else nr, 0, 77, sector, segs)


def rejected(verdict: object, status: int = blkif.RSP_ERROR) -> Rejection:
    assert isinstance(verdict, Rejection), verdict
    assert verdict.status == status
    assert verdict.id == 77
    return verdict


def test_read_plan() -> None:
    segs = (Segment(1, 0, 7), Segment(2, 2, 3))
    plan = validate(rw(blkif.OP_READ, 8, segs), LIMITS)
    assert plan == IoPlan(77, blkif.OP_READ, Kind.READ, 8 * 512, 10 * 512, (1, 2), ((0, 4096), (1024, 1024)))
    assert plan.segments == (IoSegment(1, 0, 4096), IoSegment(2, 1024, 1024))
    # whole pages only: no per-segment extents are built
    plan = validate(rw(blkif.OP_WRITE, 8, (Segment(5, 0, 7), Segment(4, 0, 7))), LIMITS)
    assert plan == IoPlan(77, blkif.OP_WRITE, Kind.WRITE, 8 * 512, 8192, (5, 4), None)
    assert plan.segments == (IoSegment(5, 0, 4096), IoSegment(4, 0, 4096))


def test_unknown_op_is_eopnotsupp_with_id() -> None:
    for op in (blkif.OP_RESERVED_1, 7, 200):
        v = rejected(validate(UnknownRequest(op, 77), LIMITS), blkif.RSP_EOPNOTSUPP)
        assert v.operation == op


@pytest.mark.parametrize("nr", [0, 12, 255])
def test_segment_count_bounds(nr: int) -> None:
    rejected(validate(rw(blkif.OP_WRITE, nr=nr, segs=FULL * min(nr, 11)), LIMITS))


def test_flush_without_segments_is_fine_and_flush_with_data_is_a_write() -> None:
    plan = validate(rw(blkif.OP_FLUSH_DISKCACHE, segs=()), LIMITS)
    assert isinstance(plan, IoPlan)
    assert plan.kind is Kind.FLUSH
    assert plan.length == 0
    plan = validate(rw(blkif.OP_FLUSH_DISKCACHE, 16), LIMITS)
    assert isinstance(plan, IoPlan)
    assert (plan.kind, plan.offset, plan.length) == (Kind.FLUSH, 16 * 512, 4096)


def test_unadvertised_features_are_eopnotsupp() -> None:
    bare = DeviceLimits(sectors=2048, flush=False, barrier=False, discard=False, max_indirect_segments=0)
    rejected(validate(rw(blkif.OP_FLUSH_DISKCACHE, segs=()), bare), blkif.RSP_EOPNOTSUPP)
    rejected(validate(rw(blkif.OP_WRITE_BARRIER, segs=()), bare), blkif.RSP_EOPNOTSUPP)
    rejected(validate(DiscardRequest(0, 0, 77, 0, 8), bare), blkif.RSP_EOPNOTSUPP)
    ind = IndirectRequest(blkif.OP_READ, 1, 77, 0, 0, (1,) * 8)
    v = rejected(validate(ind, bare, lambda refs: bytes(4096)), blkif.RSP_EOPNOTSUPP)
    assert v.operation == blkif.OP_READ  # indirect answers carry the indirect_op, as Linux does


@pytest.mark.parametrize(("first", "last"), [(3, 2), (0, 8), (8, 8), (255, 255)])
def test_bad_segment_sectors(first: int, last: int) -> None:
    rejected(validate(rw(blkif.OP_READ, segs=(Segment(1, first, last),)), LIMITS))


def test_range_checks() -> None:
    assert isinstance(validate(rw(blkif.OP_READ, 2040), LIMITS), IoPlan)  # the last 8 sectors
    rejected(validate(rw(blkif.OP_READ, 2041), LIMITS))
    rejected(validate(rw(blkif.OP_READ, 2**64 - 1), LIMITS))


def test_read_only_refuses_all_writes() -> None:
    ro = DeviceLimits(sectors=2048, read_only=True, discard=True, barrier=True)
    assert isinstance(validate(rw(blkif.OP_READ), ro), IoPlan)
    rejected(validate(rw(blkif.OP_WRITE), ro))
    rejected(validate(rw(blkif.OP_FLUSH_DISKCACHE, segs=()), ro))
    rejected(validate(rw(blkif.OP_WRITE_BARRIER), ro))
    rejected(validate(DiscardRequest(0, 0, 77, 0, 8), ro))
    ind = IndirectRequest(blkif.OP_WRITE, 1, 77, 0, 0, (1,) * 8)
    rejected(validate(ind, ro, lambda refs: blkif.encode_indirect_segments([Segment(5, 0, 7)])))


def test_alignment_to_logical_block_size() -> None:
    big = DeviceLimits(sectors=2048, logical_block_size=4096, discard=True)
    assert isinstance(validate(rw(blkif.OP_READ, 8), big), IoPlan)
    rejected(validate(rw(blkif.OP_READ, 4), big))
    rejected(validate(rw(blkif.OP_READ, 8, (Segment(1, 0, 3),)), big))
    rejected(validate(DiscardRequest(0, 0, 77, 4, 8), big))


def test_discard() -> None:
    plan = validate(DiscardRequest(blkif.DISCARD_SECURE, 0, 77, 8, 16), LIMITS)
    assert plan == IoPlan(77, blkif.OP_DISCARD, Kind.DISCARD, 4096, 8192, secure=False)  # not advertised
    sec = DeviceLimits(sectors=2048, discard=True, discard_secure=True)
    plan = validate(DiscardRequest(blkif.DISCARD_SECURE, 0, 77, 8, 16), sec)
    assert isinstance(plan, IoPlan)
    assert plan.secure
    rejected(validate(DiscardRequest(0, 0, 77, 2040, 9), LIMITS))
    rejected(validate(DiscardRequest(0, 0, 77, 2**63, 2**63), LIMITS))


def test_indirect() -> None:
    segs = [Segment(100 + i, 0, 7) for i in range(20)]
    pages: list[Sequence[int]] = []

    def reader(refs: Sequence[int]) -> bytes:
        pages.append(tuple(refs))
        return blkif.encode_indirect_segments(segs).ljust(4096, b"\0")

    plan = validate(IndirectRequest(blkif.OP_WRITE, 20, 77, 80, 0, (55, 0, 0, 0, 0, 0, 0, 0)), LIMITS, reader)
    assert isinstance(plan, IoPlan)
    assert pages == [(55,)]  # only the pages needed for 20 segments
    assert plan.operation == blkif.OP_WRITE
    assert plan.length == 20 * 4096
    assert [s.gref for s in plan.segments] == [100 + i for i in range(20)]


def test_indirect_bounds() -> None:
    def reader(refs: Sequence[int]) -> bytes:
        return bytes(4096 * len(refs))  # zero segments: gref 0, sectors 0..0

    ok = IndirectRequest(blkif.OP_READ, 256, 77, 0, 0, (1,) * 8)
    assert isinstance(validate(ok, LIMITS, reader), IoPlan)
    rejected(validate(IndirectRequest(blkif.OP_READ, 257, 77, 0, 0, (1,) * 8), LIMITS, reader))
    rejected(validate(IndirectRequest(blkif.OP_READ, 0, 77, 0, 0, (1,) * 8), LIMITS, reader))
    v = rejected(validate(IndirectRequest(blkif.OP_DISCARD, 1, 77, 0, 0, (1,) * 8), LIMITS, reader))
    assert v.operation == blkif.OP_DISCARD


def test_indirect_unmappable_page_is_an_error_answer() -> None:
    def reader(refs: Sequence[int]) -> bytes:
        raise OSError("not granted")

    rejected(validate(IndirectRequest(blkif.OP_READ, 3, 77, 0, 0, (1,) * 8), LIMITS, reader))


@given(raw=st.binary(min_size=112, max_size=112), abi=st.sampled_from([blkif.X86_64, blkif.X86_32]))
def test_any_slot_validates_without_raising(raw: bytes, abi: blkif.Abi) -> None:
    req = abi.decode_request(raw)
    verdict = validate(req, LIMITS, lambda refs: bytes(raw * 40)[: 4096 * len(refs)])
    if isinstance(verdict, IoPlan) and verdict.segments:
        assert verdict.offset + verdict.length <= LIMITS.sectors * 512
        for s in verdict.segments:
            assert 0 <= s.offset < s.offset + s.length <= 4096
