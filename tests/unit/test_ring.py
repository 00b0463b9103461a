"""The shared ring: ring.h semantics, index wrap-around, and hostile indices that must break the ring."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import Response, Segment, SegmentRequest
from xenblockctl.backend.ring import BackRing, FrontRing, RingBroken, init_shared_ring
from xenblockctl.errors import XenblockError

M = 0xFFFFFFFF


def make(
    pages: int = 1, abi: blkif.Abi = blkif.X86_64, start: int = 0
) -> tuple[FrontRing, BackRing, bytearray]:
    buf = bytearray(pages * blkif.PAGE_SIZE)
    view = memoryview(buf)
    init_shared_ring(view)
    if start:
        struct.pack_into("=IIII", buf, 0, start, (start + 1) & M, start, (start + 1) & M)
    front = FrontRing(view, abi, pages, init=False)
    back = BackRing(view, abi, pages)
    return front, back, buf


def read_req(i: int) -> SegmentRequest:
    return SegmentRequest(blkif.OP_READ, 1, 0, i, i * 8, (Segment(i, 0, 7),))


def test_shared_ring_init() -> None:
    buf = bytearray(b"\xaa" * 4096)
    init_shared_ring(memoryview(buf))
    assert struct.unpack_from("=IIII", buf) == (0, 1, 0, 1)
    assert buf[16:64] == bytes(48)
    assert buf[64:] == b"\xaa" * (4096 - 64)  # entries untouched


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=lambda a: a.protocol)
@pytest.mark.parametrize("start", [0, M - 5], ids=["zero", "wrapping"])
def test_requests_and_responses_flow(abi: blkif.Abi, start: int) -> None:
    front, back, _ = make(abi=abi, start=start)
    for rounds in range(3):
        for i in range(back.size):
            front.put_request(read_req(i))
        front.push_requests()
        reqs = back.take_decoded()
        assert [r.id for r in reqs] == list(range(back.size)), rounds
        assert back.unconsumed() == 0
        for r in reqs:
            back.put_response(Response(r.id, r.operation, blkif.RSP_OKAY))
        back.push_responses()
        assert [r.id for r in front.take_responses()] == list(range(back.size))
    assert back.broken is None


def test_backend_attaches_at_rsp_prod() -> None:
    _, back, _ = make(start=1000)
    assert back.req_cons == back.rsp_prod_pvt == 1000


def test_connect_refuses_overfull_ring() -> None:
    buf = bytearray(4096)
    init_shared_ring(memoryview(buf))
    struct.pack_into("=I", buf, 0, 33)  # 33 requests outstanding in a 32-slot ring
    with pytest.raises(RingBroken) as exc:
        BackRing(memoryview(buf), blkif.X86_64, 1)
    assert exc.value.code == "blkif-ring-broken"


def test_slot_is_copied_once() -> None:
    front, back, buf = make()
    front.put_request(read_req(42))
    front.push_requests()
    (raw,) = back.take_requests()
    buf[64 + 8 : 64 + 16] = b"\xff" * 8  # the guest rewrites the id after we copied
    assert blkif.X86_64.decode_request(raw).id == 42


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32], ids=lambda a: a.protocol)
def test_batch_copy_wraps_and_is_taken_once(abi: blkif.Abi) -> None:
    """take_slots copies a batch that wraps around the ring end in order, consumes it, and the
    copy does not change when the guest rewrites the slots afterwards."""
    front, back, buf = make(abi=abi, start=M - 4)  # slot index 27 of 32: the batch wraps
    images = [abi.encode_request(read_req(i)) for i in range(12)]
    for image in images:
        front.put_request_bytes(image)
    front.push_requests()
    data, count = back.take_slots(limit=10)
    assert count == 10
    assert data == b"".join(images[:10])
    assert back.req_cons == (M - 4 + 10) & M
    buf[64 : 64 + back.size * abi.entry_size] = b"\xff" * (back.size * abi.entry_size)
    assert data == b"".join(images[:10])  # a private copy
    rest, count = back.take_slots()
    assert (count, len(rest)) == (2, 2 * abi.entry_size)  # the two the guest just scribbled over
    assert back.take_slots() == (b"", 0)


def test_responses_are_taken_in_one_copy_across_the_wrap() -> None:
    front, back, _ = make(start=M - 2)
    for i in range(6):
        front.put_request(read_req(i))
    front.push_requests()
    back.take_slots()
    for i in range(6):
        back.respond(i, blkif.OP_READ, blkif.RSP_OKAY if i % 2 else blkif.RSP_ERROR)
    assert back.push_responses()
    got = front.take_responses()
    assert got == [Response(i, 0, 0 if i % 2 else -1) for i in range(6)]
    assert front.take_responses() == []


def test_forward_jump_breaks_ring() -> None:
    front, back, _ = make()
    front.poke_index("req_prod", back.size + 1)
    assert back.unconsumed() == 0
    assert back.broken is not None
    assert "impossible" in back.broken
    assert back.take_requests() == []
    assert back.final_check_for_requests() is False
    # once broken, always broken, even if the guest "fixes" the index
    front.poke_index("req_prod", 1)
    assert back.unconsumed() == 0


def test_backward_move_breaks_ring() -> None:
    front, back, _ = make()
    for i in range(4):
        front.put_request(read_req(i))
    front.push_requests()
    assert len(back.take_requests()) == 4
    front.poke_index("req_prod", 2)  # behind req_cons
    assert back.unconsumed() == 0
    assert back.broken is not None


def test_in_flight_limits_consumption() -> None:
    """With requests unanswered, a legitimate frontend cannot have more than the free slots queued."""
    front, back, _ = make()
    for i in range(back.size):
        front.put_request(read_req(i))
    front.push_requests()
    assert len(back.take_requests(limit=10)) == 10
    assert back.in_flight == 10
    assert back.unconsumed() == back.size - 10
    # the guest claims one more than could possibly be free
    front.poke_index("req_prod", back.size + 1)
    assert back.unconsumed() == 0
    assert back.broken is not None


def test_final_check_arms_req_event() -> None:
    front, back, _ = make()
    assert back.final_check_for_requests() is False
    assert back.req_event == back.req_cons + 1
    front.put_request(read_req(1))
    assert front.push_requests() is True  # req_event armed: the frontend must notify
    assert back.final_check_for_requests() is True


def test_push_notifies_only_when_asked() -> None:
    front, back, _ = make()
    for i in range(3):
        front.put_request(read_req(i))
    front.push_requests()
    back.take_requests()
    back.put_response(Response(0, 0, 0))
    assert back.push_responses() is True  # rsp_event = 1 from SHARED_RING_INIT
    front.poke_index("rsp_event", 100)  # frontend not interested until index 100
    back.put_response(Response(1, 0, 0))
    assert back.push_responses() is False
    front.poke_index("rsp_event", back.rsp_prod_pvt + 1)
    back.put_response(Response(2, 0, 0))
    assert back.push_responses() is True
    assert back.push_responses() is False  # nothing new


def test_push_ignores_guest_scribbled_rsp_prod() -> None:
    front, back, _ = make()
    front.put_request(read_req(0))
    front.push_requests()
    back.take_requests()
    front.poke_index("rsp_prod", 12345)
    back.put_response(Response(0, 0, 0))
    assert back.push_responses() is True
    assert back.rsp_prod == 1


def test_response_overwrites_slot_with_zero_padding() -> None:
    front, back, buf = make()
    front.put_request_bytes(b"\xff" * 112)  # op 0xff: whatever
    front.push_requests()
    back.take_requests()
    rid = 0xFFFFFFFFFFFFFFFF  # the id field of that slot
    back.put_response(Response(rid, 0xFF, blkif.RSP_EOPNOTSUPP))
    back.push_responses()
    slot = bytes(buf[64 : 64 + 16])
    assert slot == struct.pack("<QBxhxxxx", rid, 0xFF, -2)


def test_more_responses_than_requests_is_refused() -> None:
    _, back, _ = make()
    with pytest.raises(XenblockError) as exc:
        back.put_response(Response(0, 0, 0))
    assert exc.value.code == "internal"


@pytest.mark.parametrize("start", [0, M - 1])
def test_respond_all_answers_in_order_or_not_at_all(start: int) -> None:
    """A pass's answers go in one call, in order across the index wrap; more answers than consumed
    requests is our bug: it raises (the answers before it stand, as they are due anyway)."""
    front, back, _ = make(start=start)
    for i in range(3):
        front.put_request(read_req(i))
    front.push_requests()
    assert len(back.take_requests()) == 3
    with pytest.raises(XenblockError) as exc:
        back.respond_all([(i, blkif.OP_READ, 0) for i in range(4)])
    assert exc.value.code == "internal"
    assert back.rsp_prod_pvt == (start + 3) & M
    assert back.push_responses()
    assert len(front.take_responses()) == 3
    for i in range(3):
        front.put_request(read_req(i))
    front.push_requests()
    assert len(back.take_requests()) == 3
    back.respond_all([(0, blkif.OP_READ, 0), (1, blkif.OP_WRITE, -1), (2, blkif.OP_READ, -2)])
    back.push_responses()
    assert [tuple(r) for r in front.take_responses()] == [
        (0, blkif.OP_READ, 0),
        (1, blkif.OP_WRITE, -1),
        (2, blkif.OP_READ, -2),
    ]


def test_ring_buffer_checks() -> None:
    with pytest.raises(ValueError, match="writable"):
        BackRing(memoryview(bytes(4096)), blkif.X86_64, 1)
    with pytest.raises(ValueError, match="smaller"):
        BackRing(memoryview(bytearray(4096)), blkif.X86_64, 2)


def test_multi_page_ring_uses_all_slots() -> None:
    front, back, _ = make(pages=16)
    assert back.size == 512
    for i in range(512):
        front.put_request(read_req(i))
    front.push_requests()
    assert len(back.take_requests()) == 512


# --- hostile fuzz ------------------------------------------------------------------------------
actions = st.lists(
    st.one_of(
        st.tuples(st.just("req_prod"), st.integers(0, M)),
        st.tuples(st.just("req_prod_delta"), st.integers(-40, 40)),
        st.tuples(st.just("rsp_event"), st.integers(0, M)),
        st.tuples(st.just("rsp_prod"), st.integers(0, M)),
        st.tuples(st.just("slot"), st.binary(min_size=112, max_size=112)),
        st.tuples(st.just("serve"), st.integers(0, 40)),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(pages=st.sampled_from([1, 2, 4]), start=st.integers(0, M), script=actions)
def test_hostile_indices_never_escape(pages: int, start: int, script: list[tuple[str, int | bytes]]) -> None:
    """Whatever the guest does: bounded work per call, no exception, no write outside the entries."""
    front, back, buf = make(pages=pages, start=start)
    # Bytes past the last entry (the power-of-two rounding leaves a tail) must never be written.
    tail = 64 + back.size * 112
    buf[tail:] = b"\x5a" * (len(buf) - tail)
    total_taken = 0
    pending: list[int] = []
    for what, arg in script:
        if what == "req_prod":
            front.poke_index("req_prod", int(arg))
        elif what == "req_prod_delta":
            front.poke_index("req_prod", front.req_prod + int(arg))
        elif what == "rsp_event":
            front.poke_index("rsp_event", int(arg))
        elif what == "rsp_prod":
            front.poke_index("rsp_prod", int(arg))
        elif what == "slot":
            off = 64 + (front.req_prod % back.size) * 112
            assert isinstance(arg, bytes)
            buf[off : off + 112] = arg
        else:
            taken = back.take_requests(limit=int(arg))
            assert len(taken) <= back.size
            total_taken += len(taken)
            for raw in taken:
                pending.append(blkif.X86_64.decode_request(raw).id)
            # answer some, as a real backend would (the newest first: answers are held until the
            # older ones are in)
            for _ in range(min(len(pending), int(arg) // 2)):
                back.put_response(Response(pending.pop(), 0, 0))
            back.push_responses()
            back.final_check_for_requests()
        assert back.in_flight <= back.size
    assert buf[tail:] == b"\x5a" * (len(buf) - tail)
    # header padding untouched but for the response journal (ring.py)
    assert buf[16:32] == bytes(16)
    assert buf[60:64] == bytes(4)
    if back.broken is None:
        assert ((back.req_prod - back.rsp_prod_pvt) & M) <= back.size or back.unconsumed() == 0


def test_fast_lock_excludes_and_reads_no_clock_when_uncontended() -> None:
    """Issue 20: the data plane's per-request locks and the ring's fence (fastlock.py) are POSIX
    semaphore locks, whose uncontended acquire reads no clock (threading.Lock reads one every time:
    a system call in a PV dom0 under TCG), and they still exclude."""
    import multiprocessing.synchronize
    import threading

    from xenblockctl.backend import fastlock, ring

    lock = fastlock.fast_lock()
    assert isinstance(lock, multiprocessing.synchronize.Lock)
    assert isinstance(ring._FENCE_LOCK[0], multiprocessing.synchronize.Lock)
    inside = [0]
    peak = [0]

    def work() -> None:
        for _ in range(2000):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1
    ring.full_fence()


@pytest.mark.parametrize("abi", [blkif.X86_64, blkif.X86_32])
@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=32), start=st.integers(0, 31))
def test_take_slots_records_each_taken_request_id_in_ring_order(
    abi: blkif.Abi, ids: list[int], start: int
) -> None:
    """The ids respond_all matches answers against, read from the copy (x86_64: as a strided view
    of its 64-bit words), across the ring's end."""
    front, back, _buf = make(abi=abi)
    for i in range(start):  # move the indices so the batch wraps round the ring end
        front.put_request(read_req(i))
    front.push_requests()
    taken = back.take_requests()
    back.respond_all([(abi.decode_request(raw).id, 0, 0) for raw in taken])
    back.push_responses()
    assert len(front.take_responses()) == start
    for rid in ids:
        front.put_request(SegmentRequest(blkif.OP_READ, 1, 0, rid, 0, (Segment(1, 0, 7),)))
    front.push_requests()
    at = back.req_cons
    _data, n = back.take_slots()
    assert n == len(ids)
    assert back.taken_at == at
    assert list(back._order) == ids
