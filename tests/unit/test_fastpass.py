"""The native fast path (backend/_fastpass.c via backend/fastpath.py) against the pure-Python rules.

The C decoder is a second implementation of requests.validate_slot's READ/WRITE rules: the
agreement tests feed both arbitrary slot bytes (and well-formed requests with hostile fields) and
require the same verdict and, when accepted, the same range and segments. `serve` is then run on a
real file with pages held the way the grant cache holds them. The extension must build without
warnings (-Werror), and, where the toolchain has the sanitizers, the agreement runs under
AddressSanitizer + UBSan in a child interpreter.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.backend import PairFactory, on_disk, ring_params_of
from tests.fixtures.native import (
    compile_extension,
    compile_sanitized,
    limits_st,
    request_st,
    run_sanitized,
    sector_st,
)
from tests.fixtures.ring_thread import sleeping_in
from xenblockctl.backend import blkif, fastpath
from xenblockctl.backend.blkif import IndirectRequest, Segment, SegmentRequest
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.requests import READ, WRITE, DeviceLimits, IoPlan, validate_slot
from xenblockctl.backend.ring import BackRing
from xenblockctl.backend.transport.local import LocalEventChannel, LocalTransport

if not fastpath.available():
    pytest.skip(
        "the native fast path (xenblockctl/backend/_fastpass.c) is not built here", allow_module_level=True
    )

from xenblockctl.backend import _fastpass

SOURCE = Path(fastpath.__file__).with_name("_fastpass.c")
ABIS = [blkif.X86_64, blkif.X86_32]


def c_verdict(
    abi: blkif.Abi, slot: bytes, limits: DeviceLimits, entries: dict[int, memoryview] | None = None
) -> tuple[int, int, int, int, tuple[tuple[int, int, int], ...]] | None:
    return _fastpass.check(
        slot,
        0,
        abi.id_offset,
        limits.sectors,
        limits.sectors * 512,
        limits.logical_block_size,
        limits.read_only,
        limits.max_indirect_segments,
        entries if entries is not None else {},
    )


def assert_agree(
    abi: blkif.Abi, slot: bytes, limits: DeviceLimits, pages: dict[int, bytes] | None = None
) -> None:
    """C and validate_slot agree; `pages`: the granted pages (indirect descriptors), ref -> bytes."""
    pages = pages or {}
    memory = bytearray(b"".join(pages.values()) or b"\0")
    view = memoryview(memory)
    # what the C code reads: GrantCache.native_pages(), ref -> a view of that page
    entries = {ref: view[i * 4096 : (i + 1) * 4096] for i, ref in enumerate(pages)}

    def read_indirect(refs: Sequence[int]) -> bytes:
        return b"".join(pages[ref] for ref in refs)  # KeyError: not granted, as a failed map

    plan = validate_slot(abi, slot, 0, limits, read_indirect)
    got = c_verdict(abi, slot, limits, entries)
    for page in entries.values():
        page.release()
    view.release()
    simple = isinstance(plan, IoPlan) and plan.kind in (READ, WRITE) and slot[0] in (0, 1, 6)
    if not simple:
        assert got is None, (plan, got)
        return
    assert isinstance(plan, IoPlan)
    assert got is not None, plan
    assert got == (
        plan.id,
        plan.operation,
        plan.offset,
        plan.length,
        tuple((s.gref, s.offset, s.length) for s in plan.segments),
    )


@settings(max_examples=3000, deadline=None)
@given(abi=st.sampled_from(ABIS), slot=st.binary(min_size=112, max_size=112), limits=limits_st)
def test_agrees_with_validate_slot_on_any_bytes(abi: blkif.Abi, slot: bytes, limits: DeviceLimits) -> None:
    head = bytearray(slot)
    head[0] %= 3  # READ, WRITE or WRITE_BARRIER mostly: arbitrary bytes would rarely be a request
    head[1] %= 13
    assert_agree(abi, bytes(head[: abi.entry_size]), limits)


@settings(max_examples=3000, deadline=None)
@given(abi=st.sampled_from(ABIS), req=request_st, limits=limits_st)
def test_agrees_with_validate_slot_on_requests(
    abi: blkif.Abi, req: SegmentRequest, limits: DeviceLimits
) -> None:
    assert_agree(abi, abi.encode_request(req), limits)


def test_accepts_what_blkfront_sends() -> None:
    """Not vacuous: ordinary requests are accepted (so the agreement tests above compare plans)."""
    limits = DeviceLimits(sectors=1 << 20)
    for abi in ABIS:
        segs = tuple(Segment(100 + i, 0, 7) for i in range(11))
        for op in (blkif.OP_READ, blkif.OP_WRITE):
            slot = abi.encode_request(SegmentRequest(op, 11, 0, 7, 88, segs))
            assert c_verdict(abi, slot, limits) is not None
            assert_agree(abi, slot, limits)
        sub = abi.encode_request(SegmentRequest(0, 1, 0, 9, 3, (Segment(5, 2, 4),)))
        assert c_verdict(abi, sub, limits) == (9, 0, 3 * 512, 3 * 512, ((5, 1024, 1536),))


descriptor_st = st.binary(min_size=8, max_size=8).map(
    lambda b: b[:4] + bytes([b[4] % 10, b[5] % 10]) + b[6:]  # first/last_sect mostly in range
)


@settings(max_examples=1500, deadline=None)
@given(
    abi=st.sampled_from(ABIS),
    indirect_op=st.sampled_from([0, 1, 1, 2, 3, 9]),
    nseg=st.one_of(st.integers(0, 20), st.integers(500, 530), st.integers(0, 0xFFFF)),
    sector=sector_st,
    refs=st.lists(st.sampled_from([3, 4, 5, 77]), min_size=8, max_size=8),
    descriptors=st.lists(descriptor_st, min_size=1, max_size=40),
    whole=st.booleans(),
    limits=limits_st,
    max_indirect=st.sampled_from([0, 32, 256, 512, 4096]),
    edge=st.sampled_from([None, None, -1, 0, 1]),
)
def test_agrees_with_validate_slot_on_indirect_requests(
    *,
    abi: blkif.Abi,
    indirect_op: int,
    nseg: int,
    sector: int,
    refs: list[int],
    descriptors: list[bytes],
    whole: bool,
    limits: DeviceLimits,
    max_indirect: int,
    edge: int | None,
) -> None:
    """Indirect descriptor pages 3, 4, 5 are granted (77 is not); the pages repeat the drawn
    descriptors (or whole-page ones), so long requests have plausible segments too."""
    if edge is not None:  # nr_segments at the advertised maximum, or one off it
        nseg = max(0, max_indirect + edge)
    if whole:
        descriptors = [struct.pack("=IBBxx", 1000 + i, 0, 7) for i in range(len(descriptors))]
    page = (b"".join(descriptors) * (4096 // (8 * len(descriptors)) + 1))[:4096]
    pages = {3: page, 4: page[::-1], 5: page}
    slot = abi.encode_request(IndirectRequest(indirect_op, nseg, 7, sector, 0, tuple(refs)))
    limits = dataclasses.replace(limits, max_indirect_segments=max_indirect)
    assert_agree(abi, slot, limits, pages)


def test_accepts_indirect_requests_whose_pages_are_cached() -> None:
    limits = DeviceLimits(sectors=1 << 20, max_indirect_segments=512)
    descriptors = b"".join(struct.pack("=IBBxx", 100 + i, 0, 7) for i in range(300))
    pages = {40: descriptors.ljust(4096, b"\0")}
    for abi in ABIS:
        slot = abi.encode_request(IndirectRequest(blkif.OP_WRITE, 300, 5, 64, 0, (40,) * 8))
        assert_agree(abi, slot, limits, pages)
        memory = memoryview(bytearray(pages[40]))
        got = c_verdict(abi, slot, limits, {40: memory})
        assert got is not None
        assert got[:4] == (5, 1, 64 * 512, 300 * 4096)
        assert c_verdict(abi, slot, limits, {}) is None  # the descriptor page is not cached
        read_only = dataclasses.replace(limits, read_only=True)
        assert c_verdict(abi, slot, read_only, {40: memory}) is None  # a WRITE: refused
        assert_agree(abi, slot, read_only, pages)
        read = abi.encode_request(IndirectRequest(blkif.OP_READ, 300, 5, 64, 0, (40,) * 8))
        assert c_verdict(abi, read, read_only, {40: memory}) is not None
        for nseg in (511, 512, 513):  # the advertised maximum and either side of it
            edge = abi.encode_request(IndirectRequest(blkif.OP_READ, nseg, 5, 64, 0, (40,) * 8))
            assert (c_verdict(abi, edge, limits, {40: memory, 41: memory}) is not None) is (nseg <= 512)
        memory.release()


def test_check_refuses_a_short_slot() -> None:
    with pytest.raises(ValueError, match="shorter"):
        _fastpass.check(bytes(100), 0, 8, 100, 51200, 512, False, 0, {})
    with pytest.raises(ValueError, match="id_offset"):
        _fastpass.check(bytes(112), 0, 6, 100, 51200, 512, False, 0, {})
    with pytest.raises(ValueError, match="max_indirect"):
        _fastpass.check(bytes(112), 0, 8, 100, 51200, 512, False, 4097, {})


# --- serve() on a real file --------------------------------------------------------------------------
def test_serve_reads_writes_and_stops_where_python_must_take_over(tmp_path: Path) -> None:
    abi = blkif.X86_64
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(64 * 1024))
    before = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    memory = mmap.mmap(-1, 4 * 4096)
    view = memoryview(memory)
    try:
        entries = {10 + i: view[i * 4096 : (i + 1) * 4096] for i in range(3)}  # ref 13 not cached
        view[4096:8192] = b"w" * 4096
        slots = [
            SegmentRequest(0, 2, 0, 1, 0, (Segment(10, 0, 7), Segment(11, 0, 3))),  # 6 KiB read
            SegmentRequest(1, 1, 0, 2, 16, (Segment(11, 0, 7),)),  # 4 KiB write
            SegmentRequest(3, 0, 0, 3, 0, ()),  # FLUSH: Python's
            SegmentRequest(0, 1, 0, 4, 0, (Segment(12, 0, 7),)),
            SegmentRequest(0, 1, 0, 5, 0, (Segment(13, 0, 7),)),  # not cached: Python's
        ]
        data = b"".join(abi.encode_request(s) for s in slots)
        modes = (_fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK)
        args = (abi.id_offset, 128, 65536, 512, False, 0, fd, fd, *modes, mmap.PAGESIZE, entries)
        answers, stop, refs = _fastpass.serve(data, 0, len(slots), *args)
        assert answers == [(1, 0, 0), (2, 1, 0)]
        assert stop == 2
        assert memoryview(refs).cast("I").tolist() == [10, 11, 11]
        assert bytes(view[:6144]) == before[:6144]
        assert path.read_bytes()[16 * 512 : 16 * 512 + 4096] == before[4096:6144] + b"w" * 2048
        answers, stop, refs = _fastpass.serve(data, 3, len(slots), *args)
        assert answers == [(4, 0, 0)]
        assert stop == 4
        # WRITE refused on a read-only device, READ with NOWAIT refused where run_now would submit
        args_ro = (abi.id_offset, 128, 65536, 512, True, 0, fd, fd, *modes, mmap.PAGESIZE, entries)
        assert _fastpass.serve(data, 1, 2, *args_ro)[:2] == ([], 1)
        stop_reads = (
            abi.id_offset,
            128,
            65536,
            512,
            False,
            0,
            fd,
            fd,
            _fastpass.MODE_STOP,
            _fastpass.MODE_BLOCK,
        )
        assert _fastpass.serve(data, 0, 2, *stop_reads, mmap.PAGESIZE, entries)[:2] == ([], 0)
        # a read past the end of the file is short: Python's path runs it (and reports the error)
        past = abi.encode_request(SegmentRequest(0, 1, 0, 6, 127, (Segment(10, 0, 7),)))
        big = (abi.id_offset, 1 << 20, 1 << 29, 512, False, 0, fd, fd, *modes, mmap.PAGESIZE, entries)
        assert _fastpass.serve(past, 0, 1, *big)[:2] == ([], 0)
        with pytest.raises(ValueError, match="outside"):
            _fastpass.serve(data, 0, len(slots) + 1, *args)
        for page in entries.values():
            page.release()
    finally:
        view.release()
        memory.close()
        os.close(fd)


# --- Pages: the cache's dict indexed for C -----------------------------------------------------------
#: serve() untyped here: its fd arguments depend on the build (_device_fds)
_serve: Any = _fastpass.serve


def _device_fds(fd: int) -> tuple[int, ...]:
    """serve()'s device fd argument(s): `fd`, or `fd, write_fd` where serve() takes a second fd for
    WRITEs (issue 20's O_DIRECT writes); found by an empty call, so these tests run on either."""
    try:
        _serve(b"", 0, 0, 8, 0, 0, 512, False, 0, fd, fd, 0, 0, mmap.PAGESIZE, {})
    except TypeError:
        return (fd,)
    return (fd, fd)


def test_pages_index_follows_every_change_to_the_dict(tmp_path: Path) -> None:
    """serve() through a Pages finds exactly the pages the dict holds, after growth, collisions and
    removals in any order (a model dict decides what must be found), and the index holds an export
    on each page it found until the dict drops that page: the view cannot be released before."""
    import random

    abi = blkif.X86_64
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(64 * 4096))
    fd = os.open(path, os.O_RDONLY)
    n = 700  # past several growths of the table (64 slots first)
    memory = mmap.mmap(-1, n * 4096)
    view = memoryview(memory)
    rnd = random.Random(5)
    # refs far apart and close together: home slots collide, runs wrap round the table's end
    refs = rnd.sample(range(2**32), n // 2) + list(range(1000, 1000 + n - n // 2))
    page = {ref: view[i * 4096 : (i + 1) * 4096] for i, ref in enumerate(refs)}
    pages = _fastpass.Pages()
    model: dict[int, memoryview] = {}
    modes = (_fastpass.MODE_BLOCK,) * 2
    args = (abi.id_offset, 64 * 8, 64 * 4096, 512, False, 0, *_device_fds(fd), *modes, mmap.PAGESIZE)

    def read_into(ref: int, block: int) -> bool:
        slot = abi.encode_request(SegmentRequest(0, 1, 0, 7, block * 8, (Segment(ref, 0, 7),)))
        answers, _stop, _refs = _serve(slot, 0, 1, *args, pages)
        return bool(answers == [(7, 0, 0)])

    try:
        for step in range(6000):
            ref = rnd.choice(refs)
            action = rnd.random()
            if action < 0.3:
                pages[ref] = model[ref] = page[ref]
            elif action < 0.5:
                assert (pages.pop(ref, None) is None) == (model.pop(ref, None) is None)
            else:
                block = rnd.randrange(64)
                assert read_into(ref, block) == (ref in model), step
                if ref in model:
                    assert bytes(page[ref]) == path.read_bytes()[block * 4096 : (block + 1) * 4096]
            assert pages == model
            assert pages.indexed <= len(pages)
        assert pages.indexed > 100
        # an indexed page's view is exported: releasing it under the index is refused ...
        found = next(ref for ref in model if read_into(ref, 0))
        with pytest.raises(BufferError):
            model[found].release()
        # ... and every way of taking it out of the dict drops the export first
        del pages[found]
        assert found not in pages
        model[found].release()
        assert all(read_into(ref, 0) for ref in list(pages))
        assert pages.indexed == len(pages)
        other = next(iter(pages))
        pages[other] = page[other]  # assignment over an indexed ref: re-indexed at the next lookup
        assert pages.indexed == len(pages) - 1
        for change in (pages.popitem, lambda: pages.update({}), lambda: pages.setdefault(1, page[refs[0]])):
            assert all(read_into(ref, 0) for ref in list(pages))
            assert pages.indexed == len(pages)
            change()
            assert pages.indexed == 0
        pages |= {}
        pages.clear()
        assert pages.indexed == 0
        assert not pages
    finally:
        pages.clear()
        for v in page.values():
            v.release()  # refused (BufferError) if the index still held any of them
        view.release()
        memory.close()
        os.close(fd)


# --- respond(): answers written into the ring, ring.py's journal protocol in C ----------------------
def _ring_pair(abi: blkif.Abi, pages: int, start: int, outstanding: int, seed: bytes) -> list[BackRing]:
    """Two back rings over identical buffers (random bytes, `outstanding` requests from `start`),
    each having taken every request: one answers in Python, the other through respond()."""
    size = blkif.ring_size(pages, abi)
    rings = []
    for _ in range(2):
        buf = bytearray((seed * (pages * blkif.PAGE_SIZE // len(seed) + 1))[: pages * blkif.PAGE_SIZE])
        struct.pack_into("=IIII", buf, 0, (start + outstanding) & 0xFFFFFFFF, 0, start, 0)
        buf[32:64] = bytes(32)  # no journal yet: the ring starts its own at `start`
        ring = BackRing(memoryview(buf), abi, pages)
        _data, n = ring.take_slots(size)
        assert n == outstanding
        rings.append(ring)
    return rings


@settings(max_examples=400, deadline=None)
@given(
    abi=st.sampled_from(ABIS),
    pages=st.sampled_from([1, 2]),
    start=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 70, 2**32 - 1)),
    seed=st.binary(min_size=1, max_size=64),
    data=st.data(),
)
def test_respond_writes_what_respond_all_writes(
    abi: blkif.Abi, pages: int, start: int, seed: bytes, data: st.DataObject
) -> None:
    """Runs of answers through BackRing.respond_run with the C writer leave the ring — slots,
    padding, journal words and journalled response — byte for byte as respond_all leaves it,
    after every run: in ring order (written by C) and out of it (held: respond_all's path)."""
    size = blkif.ring_size(pages, abi)
    outstanding = data.draw(st.integers(1, size))
    python, native = _ring_pair(abi, pages, start, outstanding, seed)
    ids = list(python._order)
    assert ids == list(native._order)
    statuses = st.sampled_from([blkif.RSP_OKAY, blkif.RSP_ERROR, blkif.RSP_EOPNOTSUPP])
    answers = [(rid, data.draw(st.sampled_from([0, 1, 3, 6, 255])), data.draw(statuses)) for rid in ids]
    # cut the answers into runs and answer the runs in a drawn order (early runs are held)
    cuts = sorted(
        set(data.draw(st.lists(st.integers(1, outstanding - 1), max_size=4)) if outstanding > 1 else [])
    )
    runs = list(zip([0, *cuts], [*cuts, outstanding], strict=True))
    runs = data.draw(st.permutations(runs)) if data.draw(st.booleans()) else runs
    try:
        for first, end in runs:
            python.respond_all(answers[first:end])
            native.respond_run(answers[first:end], (start + first) & 0xFFFFFFFF, _fastpass.respond)
            assert bytes(native._buf) == bytes(python._buf)
            assert (native.rsp_prod_pvt, native.held, list(native._order)) == (
                python.rsp_prod_pvt,
                python.held,
                list(python._order),
            )
        assert native.rsp_prod_pvt == (start + outstanding) & 0xFFFFFFFF
    finally:
        python.release()
        native.release()


def test_respond_refuses_bad_answers_and_geometry_with_the_ring_untouched() -> None:
    abi = blkif.X86_64
    python, native = _ring_pair(abi, 1, 5, 4, b"\xa5")
    ring = native._buf
    before = bytes(ring)
    size = native.size
    good = [(1, 0, 0)] * 3
    bad: list[tuple[list[Any], int, int, type[Exception]]] = [
        ([*good, (1, 0)], size, 8, TypeError),
        ([*good, [1, 0, 0]], size, 8, TypeError),
        ([*good, (1, 256, 0)], size, 8, ValueError),
        ([*good, (1, 0, 40000)], size, 8, ValueError),
        ([*good, (1, 0, -40000)], size, 8, ValueError),
        ([*good, (-1, 0, 0)], size, 8, OverflowError),
        ([*good, (2**64, 0, 0)], size, 8, OverflowError),
        ([*good, ("1", 0, 0)], size, 8, TypeError),
        (good, size, 6, ValueError),  # no such ABI
        (good, size - 1, 8, ValueError),  # not a power of two
        (good, 64, 8, ValueError),  # more slots than the buffer holds
        ([(1, 0, 0)] * (size + 1), size, 8, ValueError),  # more answers than slots
    ]
    try:
        for answers, ring_size, id_offset, error in bad:
            with pytest.raises(error):
                _fastpass.respond(answers, ring, 5, ring_size, id_offset)
            assert bytes(ring) == before
        with pytest.raises(ValueError):
            _fastpass.respond(good, ring, 2**32, size, 8)
        with pytest.raises(ValueError, match="alignment"):  # the index words' atomic stores
            _fastpass.respond(good, ring[1:], 5, size, 8)
        with pytest.raises(TypeError):
            _fastpass.respond(good, memoryview(bytes(ring)), 5, size, 8)  # read-only
        assert bytes(ring) == before
    finally:
        python.release()
        native.release()


# --- the build ---------------------------------------------------------------------------------------
def test_builds_without_warnings(tmp_path: Path) -> None:
    compile_extension(SOURCE, tmp_path, "-O2")


def test_agreement_under_sanitizers(tmp_path: Path) -> None:
    """The decoder, serve() and respond() on random bytes with ASan + UBSan (any report aborts the
    child)."""
    built, lib = compile_sanitized(SOURCE, tmp_path)
    script = textwrap.dedent(
        f"""
        import mmap, os, random, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import _fastpass
        from xenblockctl.backend import blkif
        from xenblockctl.backend.blkif import IndirectRequest
        from xenblockctl.backend.requests import DeviceLimits, IoPlan, validate_slot
        rnd = random.Random(20)
        fd = os.open({str(tmp_path / "disk")!r}, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 1 << 16)
        memory = mmap.mmap(-1, 8 * 4096)
        view = memoryview(memory)
        for i in range(8):  # descriptor pages for indirect requests: grefs 0..15, sectors 0..9
            for at in range(i * 4096, (i + 1) * 4096, 8):
                first, last = rnd.randrange(10), rnd.randrange(10)
                view[at:at + 8] = bytes([rnd.randrange(16), 0, 0, 0, first, last, 0, 0])
        entries = {{g: view[(g % 8) * 4096:(g % 8 + 1) * 4096] for g in range(16)}}
        pages = _fastpass.Pages(entries)
        try:  # serve()'s device fd, or fd and write fd (see _device_fds)
            _fastpass.serve(b"", 0, 0, 8, 0, 0, 512, False, 0, fd, fd, 0, 0, mmap.PAGESIZE, {{}})
            fds = (fd, fd)
        except TypeError:
            fds = (fd,)
        def read_indirect(refs):
            return b"".join(bytes(entries[g]) if g < 16 else 1 / 0 for g in refs)
        for n in range(20000):
            abi = rnd.choice([blkif.X86_64, blkif.X86_32])
            slot = bytearray(rnd.randbytes(abi.entry_size))
            slot[0] = rnd.choice([0, 1, 2, 6, 6]); slot[1] %= 13
            for i in range(11):
                at = abi.segments_offset + 8 * i
                slot[at + 1:at + 4] = b"\\0\\0\\0"; slot[at + 4] %= 9; slot[at + 5] %= 9
            if n % 2:
                slot[abi.id_offset + 8:abi.id_offset + 16] = rnd.randrange(140).to_bytes(8, "little")
            if slot[0] == 6:
                slot[2:4] = rnd.choice([rnd.randrange(600), rnd.randrange(65536)]).to_bytes(2, "little")
                for k in range(8):
                    at = abi.id_offset + 20 + 4 * k
                    ref = rnd.choice([rnd.randrange(17), rnd.randrange(2**32)])
                    slot[at:at + 4] = ref.to_bytes(4, "little")
            slot = bytes(slot)
            sectors = rnd.choice([0, 8, 128, 2**40])
            limits = DeviceLimits(sectors=sectors, logical_block_size=rnd.choice([512, 4096]),
                                  max_indirect_segments=rnd.choice([0, 256, 512, 4096]))
            lbs, mi = limits.logical_block_size, limits.max_indirect_segments
            got = _fastpass.check(slot, 0, abi.id_offset, sectors, sectors * 512, lbs, False, mi, entries)
            plan = validate_slot(abi, slot, 0, limits, read_indirect)
            # the engine's indexed dict, changed under it as the cache changes it
            _fastpass.serve(slot * 3, 0, 3, abi.id_offset, min(sectors, 128), 65536,
                            lbs, False, mi, *fds, 2, 2, mmap.PAGESIZE, pages)
            g = rnd.randrange(16)
            if rnd.random() < 0.5:
                pages.pop(g, None)
            else:
                pages[g] = entries[g]
            simple = isinstance(plan, IoPlan) and slot[0] in (0, 1, 6) and plan.operation in (0, 1)
            assert (got is not None) == simple, (slot, plan, got)
            _fastpass.serve(slot * 3, 0, 3, abi.id_offset, min(sectors, 128), 65536,
                            lbs, False, mi, fd, fd, 2, 2, mmap.PAGESIZE, entries)
        ring = bytearray(2 * 4096)  # respond(): any answers, any start index, both layouts
        for n in range(3000):
            size = rnd.choice([32, 64])
            answers = [(rnd.randrange(2**64), rnd.randrange(256), rnd.randrange(-32768, 32768))
                       for _ in range(rnd.randrange(size + 1))]
            _fastpass.respond(answers, ring, rnd.randrange(2**32), size, rnd.choice([4, 8]))
        # large indirect requests, every descriptor valid (whole pages of refs 0..15), through the
        # Pages as pages come and go: the heap-allocated iovecs of 12..512-segment requests
        os.ftruncate(fd, 4 << 20)
        pages.update(entries)
        served = 0
        for n in range(200):
            for i in range(8):
                view[i * 4096:(i + 1) * 4096] = b"".join(
                    bytes([rnd.randrange(16), 0, 0, 0, 0, 7, 0, 0]) for _ in range(512))
            abi = rnd.choice([blkif.X86_64, blkif.X86_32])
            nseg = rnd.choice([12, 100, 256, 511, 512])
            refs = tuple(rnd.randrange(8) for _ in range(8))
            op = rnd.choice([0, 1])
            slot = abi.encode_request(IndirectRequest(op, nseg, n, rnd.randrange(4096), 0, refs))
            args = (abi.id_offset, 8192, 4 << 20, 512, False, 512, *fds, 2, 2, mmap.PAGESIZE, pages)
            served += len(_fastpass.serve(slot * 2, 0, 2, *args)[0])
            g = rnd.randrange(16)  # one page gone: the request stops if it names it, else runs
            pages.pop(g, None)
            _fastpass.serve(slot * 2, 0, 2, *args)
            pages[g] = entries[g]
        assert served > 50, served  # not vacuous: most of them ran
        print("ok")
        pages.clear()  # every export the index holds released (ASan sees that too)
        """
    )
    run_sanitized(script, lib)
    assert built.exists()


# --- inside the data plane ---------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 4])
def test_data_plane_serves_cached_requests_natively(make_pair: PairFactory, workers: int) -> None:
    """Persistent grants (Linux blkfront's case): once a page is cached, its READs and WRITEs go
    through the native pass; the data is right on the disk and in the frontend's pages."""
    pair = make_pair(persistent=True, data_pages=32, workers=workers)
    fe, dp = pair.frontend, pair.dataplane
    fast = dp._fast
    assert fast is not None
    for i in range(20):
        data = os.urandom(4096 * (1 + i % 11))
        assert fe.write(8 * i, data) == blkif.RSP_OKAY
        assert on_disk(pair.path, 8 * i * 512, len(data)) == data
        assert fe.read(8 * i, len(data)) == data
        assert fe.read(8 * i + 1, 1024) == data[512:1536]  # a sub-page segment
    sleeping_in(dp)  # the native loop counts its passes when it sleeps (after its poll for a refill)
    assert fast.served > 20  # the first use of each page maps it (Python), later ones are native
    assert dp.stats.errors == 0
    assert dp.stats.requests == 60
    cache = dp.grant_cache
    assert cache is not None
    assert cache.stats.hits > fast.served  # the native pass counts its pages as hits too


def test_native_off_or_not_applicable(make_pair: PairFactory, local_transport: LocalTransport) -> None:
    assert make_pair(persistent=False).dataplane._fast is None  # no grant cache: Python's path
    pair = make_pair(persistent=True)
    assert pair.dataplane._fast is not None
    fe = LocalFrontend(local_transport.socket_path, 7, persistent=True)
    try:
        target = pair.target
        dp = DataPlane(local_transport, 7, ring_params_of(fe), target, target.limits(), native=False)
        assert dp._fast is None
        assert dp.stop()
    finally:
        fe.close()


def test_native_pass_under_eviction_keeps_the_cache_consistent(
    local_transport: LocalTransport, disk_file: tuple[Path, int]
) -> None:
    """A cache of 6 pages and requests of 1 to 11 pages: evictions between native passes. The
    pages the native pass may read are always exactly the cached ones, the data is right, and
    the recency it reports keeps the small requests' pages cached."""
    path, fd = disk_file
    target = DeviceTarget.from_fd(fd)
    with LocalFrontend(local_transport.socket_path, 41, data_pages=16, persistent=True) as fe:
        params = ring_params_of(fe)
        dp = DataPlane(
            local_transport, 41, params, target, target.limits(), workers=0, max_persistent_grants=6
        )
        dp.start()
        try:
            cache, fast = dp.grant_cache, dp._fast
            assert cache is not None
            assert fast is not None
            for i in range(120):
                n = 1 if i % 3 else 1 + i % 11
                data = os.urandom(n * 4096)
                assert fe.write(8 * i, data) == blkif.RSP_OKAY
                assert fe.read(8 * i, len(data)) == data
                assert on_disk(path, 8 * i * 512, len(data)) == data
                assert set(cache.native_pages()) == set(cache._entries)
                assert cache.mapped <= 6
            assert cache.stats.evictions > 0
            assert fast.served > 60
            assert dp.stats.errors == 0
            pages = cache.native_pages()
            assert isinstance(pages, _fastpass.Pages)
            assert 0 < pages.indexed <= 6
        finally:
            assert dp.stop()
        assert cache.native_pages() == {}
        assert pages.indexed == 0


def test_a_native_pass_writes_its_answers_into_the_ring_itself(make_pair: PairFactory) -> None:
    """Once its pages are cached, a pass the native path serves whole is answered by the C writer
    (respond_run): ring.py's per-answer Python loop (respond_all) does not run, the answers are
    right and the journal says every published slot is committed."""
    pair = make_pair(persistent=True, data_pages=32, workers=0)
    fe, dp = pair.frontend, pair.dataplane
    ring = dp.ring
    expected = pair.path.read_bytes()
    for _ in range(2):  # the first round maps the pages (Python), the second is native
        ids = {fe.submit_read(8 * i, 4096): i for i in range(32)}
        done = fe.collect(32)
        assert {rid: c.data for rid, c in done.items()} == {
            rid: expected[8 * i * 512 : (8 * i + 8) * 512] for rid, i in ids.items()
        }
    calls: list[int] = []
    python_loop = ring.respond_all

    def counted(answers: Sequence[tuple[int, int, int]]) -> None:
        calls.append(len(answers))
        python_loop(answers)

    ring.respond_all = counted  # type: ignore[method-assign]
    fast = dp._fast
    assert fast is not None
    sleeping_in(dp)  # the native loop counts a run just after its answers are out: settled first
    served = fast.served
    for _ in range(3):
        ids = {fe.submit_read(8 * i, 4096): i for i in range(32)}
        done = fe.collect(32)
        assert all(c.response.status == blkif.RSP_OKAY for c in done.values())
        assert {rid: c.data for rid, c in done.items()} == {
            rid: expected[8 * i * 512 : (8 * i + 8) * 512] for rid, i in ids.items()
        }
    assert dp.stop()  # the loop hands the ring's indices back to ring.py when it returns
    assert fast.served == served + 96
    assert calls == []
    hdr = memoryview(bytes(fe.ring._buf[:64])).cast("I")
    assert hdr[9] == ring.rsp_prod_pvt == hdr[2]  # journal COMMITTED: all published
    assert dp.stats.requests == dp.stats.ok == 160


def test_native_answers_are_published_before_a_barrier_blocks_the_ring_thread(make_pair: PairFactory) -> None:
    """A pass of native READs then a WRITE_BARRIER: the READs' answers (written into the ring by
    C) are pushed before the barrier drains the I/O and blocks the ring thread, as _serve_slot
    does for answers the pass holds."""
    pair = make_pair(
        persistent=True, data_pages=32, workers=4, limits=DeviceLimits(sectors=128, barrier=True)
    )
    fe, dp = pair.frontend, pair.dataplane
    for i in range(8):  # map the pages the reads use: the next round is native
        fe.submit_read(8 * i, 4096)
    fe.collect(8)
    fast = dp._fast
    assert fast is not None
    served = fast.served
    published: list[int] = []
    drain = dp.executor.drain

    def seen_at_drain(timeout: float | None = None) -> bool:
        published.append(dp.ring.rsp_prod)
        return drain(timeout)

    dp.executor.drain = seen_at_drain  # type: ignore[method-assign]
    start = dp.ring.rsp_prod
    reads = [fe.submit_read(8 * i, 4096) for i in range(4)]
    barrier = fe.submit_write(0, b"b" * 4096, op=blkif.OP_WRITE_BARRIER)
    done = fe.collect(5)
    assert {rid: done[rid].response.status for rid in [*reads, barrier]} == dict.fromkeys(
        [*reads, barrier], blkif.RSP_OKAY
    )
    assert fast.served == served + 4
    assert published[0] == (start + 4) & 0xFFFFFFFF  # the 4 READs were public when the barrier began


# --- large requests: the indexed Pages against a plain dict ------------------------------------
def test_large_indirect_requests_through_pages_and_dict_agree(tmp_path: Path) -> None:
    """Indirect READs and WRITEs of up to 512 segments over scattered pages, served through a Pages
    (the engine's indexed dict: no buffer export taken per page) and through a plain dict (one per
    page): the same answers, stops, refs and bytes moved, and exactly what validate_slot plans. Some
    pages are read-only views (a READ into one stops the pass, a WRITE from one is served), some are
    not cached (stops), refs repeat within a request, segments cover part of a page, a few
    descriptors or ranges are invalid (stops: Python's path refuses them)."""
    import random

    abi = blkif.X86_64
    rnd = random.Random(11)
    size = 1024 * 4096
    path = tmp_path / "disk"
    orig = os.urandom(size)
    path.write_bytes(orig)
    fd = os.open(path, os.O_RDWR)
    npages = 600
    memory = mmap.mmap(-1, (npages + 8) * 4096)
    view = memoryview(memory)
    ind_refs = tuple(range(7000, 7008))  # descriptor pages, after the data pages
    data_refs = rnd.sample(range(1, 5000), npages)  # memory page i holds ref data_refs[i]: scattered
    read_only = set(rnd.sample(data_refs, 3))
    missing = set(rnd.sample(sorted(set(data_refs) - read_only), 3))
    where = {ref: i for i, ref in enumerate(data_refs)}
    where.update({ref: npages + k for k, ref in enumerate(ind_refs)})
    views: dict[int, memoryview] = {}
    for ref, i in where.items():
        if ref not in missing:
            page = view[i * 4096 : (i + 1) * 4096]
            views[ref] = page.toreadonly() if ref in read_only else page
    indexed = _fastpass.Pages(views)
    plain = dict(views)
    limits = DeviceLimits(sectors=size // 512, max_indirect_segments=512)
    args = (abi.id_offset, limits.sectors, size, 512, False, 512, *_device_fds(fd))
    modes = (_fastpass.MODE_BLOCK,) * 2
    src = os.urandom(npages * 4096)  # the data pages before each request

    def serve(
        slot: bytes, entries: dict[int, memoryview]
    ) -> tuple[tuple[list[tuple[int, int, int]], int, bytes], bytes, bytes]:
        memory[: npages * 4096] = src
        os.pwrite(fd, orig, 0)
        got = _serve(slot, 0, 1, *args, *modes, mmap.PAGESIZE, entries)
        return got, bytes(memory[: npages * 4096]), os.pread(fd, size, 0)

    def read_indirect(refs: Sequence[int]) -> bytes:
        return b"".join(bytes(views[ref]) for ref in refs)

    served = stopped = 0
    try:
        for trial in range(100):
            nseg = rnd.choice([12, 200, 256, 511, 512])
            pool = data_refs if trial % 3 else sorted(set(data_refs) - read_only - missing)
            descriptors = bytearray()
            for _ in range(nseg):
                first = rnd.randrange(8) if rnd.random() < 0.2 else 0
                last = rnd.randrange(first, 8) if rnd.random() < 0.2 else 7
                if rnd.random() < 0.002:
                    first, last = 5, 2  # invalid
                descriptors += struct.pack("=IBBxx", rnd.choice(pool), first, last)
            for k in range(8):
                at = (npages + k) * 4096
                view[at : at + 4096] = bytes(descriptors[k * 4096 : (k + 1) * 4096]).ljust(4096, b"\0")
            op = rnd.choice([blkif.OP_READ, blkif.OP_WRITE])
            sector = rnd.randrange(limits.sectors - 8 * nseg + 1) if rnd.random() < 0.95 else 2**40
            slot = abi.encode_request(IndirectRequest(op, nseg, 9, sector, 0, ind_refs))
            plan = validate_slot(abi, slot, 0, limits, read_indirect)
            got = serve(slot, indexed)
            assert got == serve(slot, plain), trial
            (answers, stop, refs), pages_after, file_after = got
            names = {s.gref for s in plan.segments} if isinstance(plan, IoPlan) else set()
            if not isinstance(plan, IoPlan) or names & missing or (op == blkif.OP_READ and names & read_only):
                assert (answers, stop) == ([], 0), trial
                stopped += 1
                continue
            assert (answers, stop) == ([(9, op, 0)], 1), trial
            used = list(ind_refs[: -(-nseg // 512)]) + [s.gref for s in plan.segments]
            assert memoryview(refs).cast("I").tolist() == used
            want_pages, want_file = bytearray(src), bytearray(orig)
            at = plan.offset
            for seg in plan.segments:
                spot = where[seg.gref] * 4096 + seg.offset
                if op == blkif.OP_READ:
                    want_pages[spot : spot + seg.length] = orig[at : at + seg.length]
                else:
                    want_file[at : at + seg.length] = src[spot : spot + seg.length]
                at += seg.length
            assert (pages_after, file_after) == (bytes(want_pages), bytes(want_file)), trial
            served += 1
        assert served > 30, served
        assert stopped > 10, stopped
        assert indexed.indexed > 500  # the Pages path ran (its index filled), not only the dict's
    finally:
        indexed.clear()
        for v in views.values():
            v.release()
        view.release()
        memory.close()
        os.close(fd)


# --- serve(): adjacent WRITEs in one pwritev (issue 20, real Xen's write gap) ---------------------------
def _io_syscalls(counter: str) -> int:
    """This thread's read-like ("syscr") or write-like ("syscw") syscalls so far
    (/proc/thread-self/io: a preadv or pwritev counts one)."""
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        if line.startswith(f"{counter}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {counter} in /proc/thread-self/io")


def _write_requests(first_id: int, sectors: Sequence[int], pages: int) -> bytes:
    """WRITE slots (x86_64) of `pages` whole pages each, page i of the cache's refs 100.., at `sectors`."""
    abi = blkif.X86_64
    slots = []
    for k, sector in enumerate(sectors):
        segs = tuple(Segment(100 + k * pages + i, 0, 7) for i in range(pages))
        slots.append(SegmentRequest(1, len(segs), 0, first_id + k, sector, segs))
    return b"".join(abi.encode_request(s) for s in slots)


@pytest.mark.skipif(not Path("/proc/thread-self/io").exists(), reason="no per-thread I/O accounting")
def test_serve_writes_adjacent_requests_in_one_pwritev(tmp_path: Path) -> None:
    """Linux blkfront cuts a 1 MiB write into 128 KiB requests; with O_DIRECT on a loop device each
    pwritev waits for the loop worker alone (real Xen: 39 MiB/s one by one, 199 MiB/s merged), so
    WRITEs that continue each other go to the kernel as one pwritev. A gap, a READ or a FLUSH ends
    a run; every byte lands where its request said."""
    path = tmp_path / "disk"
    path.write_bytes(bytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    pages = 4
    memory = mmap.mmap(-1, 64 * 4096)
    memory[:] = os.urandom(len(memory))
    view = memoryview(memory)
    entries = {100 + i: view[i * 4096 : (i + 1) * 4096] for i in range(64)}
    try:
        args = (blkif.X86_64.id_offset, 2048, 1 << 20, 512, False, 0, fd, fd)
        modes = (_fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK)
        # 8 requests of 16 KiB back to back from sector 64: one run
        data = _write_requests(1, [64 + 32 * k for k in range(8)], pages)
        before = _io_syscalls("syscw")
        answers, stop, _refs = _fastpass.serve(data, 0, 8, *args, *modes, mmap.PAGESIZE, entries)
        assert _io_syscalls("syscw") - before == 1
        assert answers == [(1 + k, 1, 0) for k in range(8)]
        assert stop == 8
        assert path.read_bytes()[64 * 512 : 64 * 512 + 8 * 16384] == bytes(view[: 8 * 16384])
        # a gap after the third: two runs, each written where it belongs
        sectors = [512, 544, 576, 700, 732]
        data = _write_requests(20, sectors, pages)
        before = _io_syscalls("syscw")
        answers, stop, _refs = _fastpass.serve(data, 0, 5, *args, *modes, mmap.PAGESIZE, entries)
        assert _io_syscalls("syscw") - before == 2
        assert stop == 5
        assert [a[0] for a in answers] == [20, 21, 22, 23, 24]
        disk = path.read_bytes()
        for k, sector in enumerate(sectors):
            assert disk[sector * 512 : sector * 512 + 16384] == bytes(view[k * 16384 : (k + 1) * 16384])
        # a FLUSH between two adjacent writes: the native pass stops at it, nothing merged past it
        flush = blkif.X86_64.encode_request(SegmentRequest(3, 0, 0, 31, 0, ()))
        data = _write_requests(30, [900], pages) + flush + _write_requests(32, [932], pages)
        before = _io_syscalls("syscw")
        answers, stop, _refs = _fastpass.serve(data, 0, 3, *args, *modes, mmap.PAGESIZE, entries)
        assert (answers, stop) == ([(30, 1, 0)], 1)
        assert _io_syscalls("syscw") - before == 1
    finally:
        for page in entries.values():
            page.release()
        view.release()
        memory.close()
        os.close(fd)


def test_serve_answers_only_the_writes_a_short_merged_pwritev_covered(tmp_path: Path) -> None:
    """A merged pwritev that writes less than the run (here: the file size limit, a real short
    write) answers only the requests it covered in full; the first one not covered and the rest
    go back to Python (stop), which writes them again on its own path and reports."""
    path = tmp_path / "disk"
    path.write_bytes(b"")
    pages = 4
    code = textwrap.dedent(
        f"""
        import mmap, os, resource, signal, sys
        from xenblockctl.backend import _fastpass
        from tests.unit.test_fastpass import _write_requests
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        fd = os.open({str(path)!r}, os.O_RDWR)
        memory = mmap.mmap(-1, 32 * 4096)
        view = memoryview(memory)
        entries = {{100 + i: view[i * 4096 : (i + 1) * 4096] for i in range(32)}}
        # room for 2.5 requests of 16 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 16384 + 8192, resource.RLIM_INFINITY))
        data = _write_requests(1, [32 * k for k in range(6)], {pages})
        modes = (_fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK)
        args = (8, 2048, 1 << 20, 512, False, 0, fd, fd, *modes, mmap.PAGESIZE, entries)
        answers, stop, refs = _fastpass.serve(data, 0, 6, *args)
        print(answers, stop)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    ).stdout
    assert out.strip() == "[(1, 1, 0), (2, 1, 0)] 2"
    assert path.stat().st_size == 2 * 16384 + 8192


@pytest.mark.skipif(not Path("/proc/thread-self/io").exists(), reason="no per-thread I/O accounting")
def test_serve_reads_adjacent_requests_in_one_preadv(tmp_path: Path) -> None:
    """READs that continue each other go to the kernel as one preadv too (with `--direct-reads` each
    would otherwise wait for the loop worker alone), each page getting its own bytes."""
    path = tmp_path / "disk"
    disk = os.urandom(1 << 20)
    path.write_bytes(disk)
    fd = os.open(path, os.O_RDWR)
    memory = mmap.mmap(-1, 32 * 4096)
    view = memoryview(memory)
    entries = {100 + i: view[i * 4096 : (i + 1) * 4096] for i in range(32)}
    try:
        slots = bytearray(_write_requests(1, [64 + 32 * k for k in range(8)], 4))
        for k in range(8):  # each slot's operation byte: READ
            slots[k * blkif.X86_64.entry_size] = 0
        args = (blkif.X86_64.id_offset, 2048, 1 << 20, 512, False, 0, fd, fd)
        modes = (_fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK)
        own = -_io_syscalls("syscr") + _io_syscalls("syscr")  # what reading the counter costs
        before = _io_syscalls("syscr")
        answers, stop, _refs = _fastpass.serve(bytes(slots), 0, 8, *args, *modes, mmap.PAGESIZE, entries)
        assert _io_syscalls("syscr") - before - own == 1
        assert answers == [(1 + k, 0, 0) for k in range(8)]
        assert stop == 8
        assert bytes(view[: 8 * 16384]) == disk[64 * 512 : 64 * 512 + 8 * 16384]
    finally:
        for page in entries.values():
            page.release()
        view.release()
        memory.close()
        os.close(fd)


# --- serve(cut): a large pass answered in parts (issue 20, the QD-4 turnaround) -----------------
@pytest.mark.skipif(not Path("/proc/thread-self/io").exists(), reason="no per-thread I/O accounting")
def test_serve_cuts_a_run_once_it_holds_cut_bytes(tmp_path: Path) -> None:
    """With `cut`, a run ends once it holds that many bytes and says so (4th item True), so the
    data plane can publish it before the next run's I/O; a run that ends at a slot it cannot serve,
    or at the batch's end, says False. Without `cut` the result keeps its 3 items."""
    path = tmp_path / "disk"
    disk = os.urandom(1 << 20)
    path.write_bytes(disk)
    fd = os.open(path, os.O_RDWR)
    memory = mmap.mmap(-1, 32 * 4096)
    view = memoryview(memory)
    entries = {100 + i: view[i * 4096 : (i + 1) * 4096] for i in range(32)}
    try:
        slots = bytearray(_write_requests(1, [64 + 32 * k for k in range(8)], 4))  # 8 x 16 KiB
        for k in range(8):  # each slot's operation byte: READ
            slots[k * blkif.X86_64.entry_size] = 0
        data = bytes(slots)
        args = (blkif.X86_64.id_offset, 2048, 1 << 20, 512, False, 0, fd, fd)
        modes = (_fastpass.MODE_BLOCK, _fastpass.MODE_BLOCK)
        assert len(_fastpass.serve(data, 0, 8, *args, *modes, mmap.PAGESIZE, entries)) == 3
        runs = []
        index = 0
        while index < 8:
            before = _io_syscalls("syscr")
            answers, index, _refs, cut = _fastpass.serve(
                data, index, 8, *args, *modes, mmap.PAGESIZE, entries, 40000
            )
            runs.append(([a[0] for a in answers], index, cut, _io_syscalls("syscr") - before))
        # 40000 bytes: the third 16 KiB request reaches it; the last run ends with the batch
        assert [r[:3] for r in runs] == [([1, 2, 3], 3, True), ([4, 5, 6], 6, True), ([7, 8], 8, False)]
        assert all(r[3] >= 1 for r in runs)  # each run's I/O is its own (merged within the run)
        assert bytes(view[: 8 * 16384]) == disk[64 * 512 : 64 * 512 + 8 * 16384]
        # a slot the pass cannot serve (page 999 not cached) before the limit: not a cut
        ref_at = 2 * blkif.X86_64.entry_size + 24  # slot 2's first segment's grant ref
        slots[ref_at : ref_at + 4] = (999).to_bytes(4, "little")
        got = _fastpass.serve(bytes(slots), 0, 8, *args, *modes, mmap.PAGESIZE, entries, 1 << 20)
        assert got[0] == [(1, 0, 0), (2, 0, 0)]
        assert (got[1], got[3]) == (2, False)
        # the limit reached just before an unservable slot is still a cut (the next call stops there)
        got = _fastpass.serve(bytes(slots), 0, 8, *args, *modes, mmap.PAGESIZE, entries, 32768)
        assert (got[1], got[3]) == (2, True)
    finally:
        for page in entries.values():
            page.release()
        view.release()
        memory.close()
        os.close(fd)


def test_a_large_pass_after_a_sleep_is_published_in_parts(
    make_pair: PairFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four 1 MiB READs taken in one pass (QD 4, pages cached) after the ring thread slept for want
    of requests: the first two answers are pushed before the last two are read
    (fastpath.CUT_BYTES), so a frontend can refill its ring while the engine copies instead of
    waiting for the whole pass; every answer and byte is right. A pass the ring thread began
    without sleeping is not cut (the event it would add is not needed). Python's turn per wake-up
    (its pushes are ring.py's, counted here); the native loop's cut: test_fastpass_loop.py."""
    monkeypatch.setattr(LocalEventChannel, "native_waiter", lambda self: None)
    pair = make_pair(persistent=True, data_pages=1024, workers=0)
    fe, dp = pair.frontend, pair.dataplane
    pair.path.write_bytes(os.urandom(4 << 20))
    expected = pair.path.read_bytes()
    mib = 1 << 20
    ring = dp.ring

    def round_of_four() -> None:
        # the ring thread is out of requests and about to sleep (req_event armed by its final
        # check), so these four wake it: its next pass follows a sleep
        deadline = time.monotonic() + 10
        while ring.req_event != (ring.req_cons + 1) & 0xFFFFFFFF:
            assert time.monotonic() < deadline, "the ring thread never went to sleep"
            time.sleep(0.001)
        ids = {fe.submit_read(2048 * i, mib): i for i in range(4)}
        done = fe.collect(4)
        assert {rid: c.data for rid, c in done.items()} == {
            rid: expected[i * mib : (i + 1) * mib] for rid, i in ids.items()
        }

    round_of_four()  # maps the pages (Python); the next rounds are native
    fast = dp._fast
    assert fast is not None
    served = fast.served
    pushed: list[int] = []
    push = dp.ring.push_responses

    def seen() -> bool:
        pushed.append(dp.ring.rsp_prod_pvt)
        return push()

    dp.ring.push_responses = seen  # type: ignore[method-assign]
    start = dp.ring.rsp_prod_pvt
    for _ in range(2):
        round_of_four()
    assert fast.served == served + 8
    assert [(p - start) & 0xFFFFFFFF for p in pushed] == [2, 4, 6, 8]
    assert dp.stats.errors == 0


def test_only_a_pass_that_follows_a_sleep_is_cut(make_pair: PairFactory) -> None:
    """The cut costs an event; it pays only when the ring thread ran out of requests and slept, so
    a pass is cut once per wake-up, never on a ring thread that keeps finding requests."""
    dp = make_pair(persistent=True, workers=0).dataplane  # no request: its ring thread sleeps
    assert dp.stats.wakeups == 0
    assert dp._cut_for_pass() == 0  # no wake-up since the last pass (none yet)
    dp.stats.wakeups += 1
    assert dp._cut_for_pass() == fastpath.CUT_BYTES
    assert dp._cut_for_pass() == 0  # the next pass without another sleep
