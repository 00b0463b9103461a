"""Request validation: every rule answers with the right status; nothing raises for any input."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import DiscardRequest, IndirectRequest, Segment, SegmentRequest, UnknownRequest
from xenblockctl.backend.requests import (
    DeviceLimits,
    IoPlan,
    IoSegment,
    Kind,
    Rejection,
    validate,
    validate_slot,
)

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


# --- the raw-slot entry point (the data plane's) against the decoded one, and against the spec ---
LIMIT_VARIANTS = [
    LIMITS,
    DeviceLimits(sectors=2048, read_only=True, discard=True),
    DeviceLimits(sectors=4096, logical_block_size=4096, flush=False, max_indirect_segments=0),
    DeviceLimits(
        sectors=1 << 20, max_indirect_segments=4096, barrier=True, discard=True, discard_secure=True
    ),
]
# whole pages are the fast path; partial and invalid sector ranges the general one
sane_segment = st.one_of(
    st.builds(Segment, st.integers(0, 300), st.just(0), st.just(7)),
    st.builds(Segment, st.integers(0, 2**32 - 1), st.integers(0, 9), st.integers(0, 9)),
)
structured = st.one_of(
    st.builds(
        SegmentRequest,
        st.sampled_from([0, 1, 2, 3]),
        st.integers(0, 13),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**64 - 1),
        st.one_of(st.integers(0, 4200), st.integers(0, 2**64 - 1)),
        st.lists(sane_segment, max_size=11).map(tuple),
    ),
    st.builds(
        IndirectRequest,
        st.integers(0, 7),
        st.integers(0, 700),
        st.integers(0, 2**64 - 1),
        st.integers(0, 4200),
        st.just(0),
        st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=8).map(tuple),
    ),
    st.builds(
        DiscardRequest,
        st.integers(0, 255),
        st.just(0),
        st.integers(0, 2**64 - 1),
        st.integers(0, 5000),
        st.integers(0, 5000),
    ),
    st.builds(UnknownRequest, st.integers(7, 255), st.integers(0, 2**64 - 1)),
)


@given(
    abi=st.sampled_from([blkif.X86_64, blkif.X86_32]),
    req=st.one_of(structured, st.binary(min_size=112, max_size=112)),
    limits=st.sampled_from(LIMIT_VARIANTS),
    indirect=st.lists(sane_segment, max_size=700),
)
def test_validate_slot_agrees_with_validate(
    abi: blkif.Abi, req: blkif.Request | bytes, limits: DeviceLimits, indirect: list[Segment]
) -> None:
    """The data plane validates raw slot copies; it must decide exactly as validate() on the decoded
    request does, for any slot (both unpack the fields and share the rules)."""
    raw = req if isinstance(req, bytes) else abi.encode_request(req)
    page = blkif.encode_indirect_segments(indirect)

    def reader(refs: Sequence[int]) -> bytes:
        if refs and refs[0] % 97 == 13:
            raise OSError("not granted")  # some refs are unmappable
        return page.ljust(4096 * len(refs), b"\0")[: 4096 * len(refs)]

    padded = b"\xee" * 40 + raw[: abi.entry_size] + b"\xee" * 40  # at an offset in a batch copy
    fast = validate_slot(abi, padded, 40, limits, reader)
    assert fast == validate(abi.decode_request(raw), limits, reader)


def spec_plan(
    sector: int, segments: Sequence[Segment], limits: DeviceLimits
) -> tuple[int, int, list[IoSegment]] | None:
    """The segment rules written out one segment at a time: (offset, length, segments) or None."""
    out = []
    total = 0
    for s in segments:
        if not s.first_sect <= s.last_sect <= 7:
            return None
        n = s.last_sect - s.first_sect + 1
        out.append(IoSegment(s.gref, s.first_sect * 512, n * 512))
        total += n
    block = limits.logical_block_size // 512
    if sector + total > limits.sectors or sector % block or total % block:
        return None
    return sector * 512, total * 512, out


ODD_SECTORS = [(0, 3), (4, 7), (0, 6), (1, 7), (3, 3), (0, 8), (6, 5), (9, 9), (7, 8)]


@st.composite
def mostly_whole_pages(draw: st.DrawFn) -> list[Segment]:
    """Whole pages with at most a few odd segments anywhere: the cases where a scan that checks
    'all whole' too loosely would go wrong."""
    grefs = draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
    segments = [Segment(g, 0, 7) for g in grefs]
    for index, (first, last) in draw(
        st.lists(st.tuples(st.integers(0, len(grefs) - 1), st.sampled_from(ODD_SECTORS)), max_size=2)
    ):
        segments[index] = Segment(segments[index].gref, first, last)
    return segments


@given(
    segments=st.one_of(st.lists(sane_segment, min_size=1, max_size=300), mostly_whole_pages()),
    sector=st.integers(0, 5000),
    limits=st.sampled_from(
        [LIMIT_VARIANTS[0], LIMIT_VARIANTS[3], DeviceLimits(sectors=8192, logical_block_size=4096)]
    ),
)
def test_segment_fast_paths_match_the_rules(
    segments: list[Segment], sector: int, limits: DeviceLimits
) -> None:
    """One descriptor, all whole pages (byte scans) and the general loop all give the spec's answer."""
    page = blkif.encode_indirect_segments(segments)
    if len(segments) <= 11:
        verdict = validate(rw(blkif.OP_READ, sector, tuple(segments)), limits)
    else:
        ind = IndirectRequest(blkif.OP_READ, len(segments), 77, sector, 0, (1,) * 8)
        verdict = validate(ind, limits, lambda refs: page.ljust(4096 * len(refs), b"\0"))
    expected = spec_plan(sector, segments, limits)
    if len(segments) > limits.max_indirect_segments and len(segments) > 11:
        expected = None
    if expected is None:
        rejected(verdict)
        return
    assert isinstance(verdict, IoPlan), verdict
    assert (verdict.offset, verdict.length, list(verdict.segments)) == expected
    assert verdict.grefs == tuple(s.gref for s in segments)
    whole = all((s.first_sect, s.last_sect) == (0, 7) for s in segments)
    assert (verdict.extents is None) == whole  # whole pages never build per-segment extents


def test_kind_hashes_without_python_code() -> None:
    """io.Executor.run_now tests `plan.kind in set` per request: Enum's own __hash__ is a Python
    method (~0.14 µs), Kind's is the C identity hash, and sets and dicts of kinds still behave."""
    kind_hash: object = Kind.__hash__  # mypy types it as Enum's declared method: the identity is the check
    assert kind_hash is object.__hash__
    table = {kind: kind.value for kind in Kind}
    assert all(table[Kind(value)] == value for value in table.values())
    assert Kind("read") in {Kind.READ, Kind.WRITE}
