"""Issue 21: a successor engine re-attaches to a live ring from shared memory alone.

Answers are published in ring order and journalled in the header padding (ring.py), so whatever
instant the previous engine died at, the successor publishes every response it finished and runs
again exactly the requests it did not answer. The last test kills a real process serving a ring in
shared memory (a memfd) at random instants and checks that every request gets exactly one answer."""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest

from xenblockctl.backend import blkif, fastpath
from xenblockctl.backend.blkif import Response, Segment, SegmentRequest
from xenblockctl.backend.ring import JOURNAL_MAGIC, BackRing, FrontRing, init_shared_ring

M = 0xFFFFFFFF
ENTRY = blkif.X86_64.entry_size


def req(i: int) -> SegmentRequest:
    return SegmentRequest(blkif.OP_READ, 1, 0, i, i * 8, (Segment(i, 0, 7),))


def make(start: int = 0) -> tuple[FrontRing, BackRing, bytearray, memoryview]:
    buf = bytearray(blkif.PAGE_SIZE)
    view = memoryview(buf)
    init_shared_ring(view)
    if start:
        struct.pack_into("=IIII", buf, 0, start, (start + 1) & M, start, (start + 1) & M)
    return FrontRing(view, blkif.X86_64, 1, init=False), BackRing(view, blkif.X86_64, 1), buf, view


def ids(taken: list[bytes]) -> list[int]:
    return [blkif.X86_64.decode_request(raw).id for raw in taken]


def test_an_early_answer_waits_for_the_older_requests() -> None:
    front, back, _, _ = make()
    for i in range(3):
        front.put_request(req(i))
    front.push_requests()
    back.take_requests()
    back.respond_all([(2, blkif.OP_READ, 0), (1, blkif.OP_READ, 0)])
    assert back.held == 2
    assert not back.push_responses()
    assert front.take_responses() == []
    back.respond(0, blkif.OP_READ, -1)
    back.push_responses()
    assert front.take_responses() == [Response(0, 0, -1), Response(1, 0, 0), Response(2, 0, 0)]


def test_a_reused_id_answers_the_oldest_request_with_it() -> None:
    front, back, _, _ = make()
    for _ in range(2):
        front.put_request(req(7))
    front.push_requests()
    back.take_requests()
    back.respond(7, blkif.OP_READ, 0)
    back.push_responses()
    assert front.take_responses() == [Response(7, 0, 0)]
    assert back.in_flight == 1


@pytest.mark.parametrize("start", [0, M - 2])
def test_the_successor_publishes_finished_answers_and_reruns_the_rest(start: int) -> None:
    front, back, _, view = make(start)
    for i in range(6):
        front.put_request(req(i))
    front.push_requests()
    back.take_requests()
    back.respond_all([(0, blkif.OP_READ, 0), (1, blkif.OP_READ, 0)])
    back.push_responses()
    back.respond_all([(3, blkif.OP_READ, 0), (2, blkif.OP_WRITE, -1), (5, blkif.OP_READ, 0)])
    # the engine dies here: 2 and 3 are in their slots, not published; 5 is held; 4 runs
    back.release()
    successor = BackRing(view, blkif.X86_64, 1)
    assert successor.recovered == 2
    assert successor.outstanding_at_attach == 2
    assert ids(successor.take_requests()) == [4, 5], "the unanswered requests, intact"
    successor.push_responses()
    assert front.take_responses() == [
        Response(0, 0, 0),
        Response(1, 0, 0),
        Response(2, 1, -1),
        Response(3, 0, 0),
    ]
    successor.respond_all([(5, blkif.OP_READ, 0), (4, blkif.OP_READ, 0)])
    successor.push_responses()
    assert front.take_responses() == [Response(4, 0, 0), Response(5, 0, 0)]


def test_a_slot_torn_by_the_kill_is_rewritten_from_the_journal() -> None:
    front, back, buf, view = make()
    for i in range(3):
        front.put_request(req(i))
    front.push_requests()
    back.take_requests()
    back.respond_all([(0, blkif.OP_READ, 0), (1, blkif.OP_READ, 0)])
    back.release()
    # killed while writing slot 1: its bytes journalled, TAG = 1, the slot half written, COMMITTED = 1
    struct.pack_into("=I", buf, 36, 1)
    buf[64 + ENTRY : 64 + ENTRY + 4] = b"\xee" * 4
    successor = BackRing(view, blkif.X86_64, 1)
    assert successor.recovered == 2
    successor.push_responses()
    assert front.take_responses() == [Response(0, 0, 0), Response(1, 0, 0)]
    assert ids(successor.take_requests()) == [2]


def test_killed_while_journalling_the_next_answer_its_slot_still_holds_its_request() -> None:
    front, back, buf, view = make()
    for i in range(2):
        front.put_request(req(i))
    front.push_requests()
    back.take_requests()
    back.respond(0, blkif.OP_READ, 0)
    back.release()
    buf[44:60] = b"\xee" * 16  # slot 1's answer half journalled, TAG still 0: slot 1 untouched
    successor = BackRing(view, blkif.X86_64, 1)
    assert successor.recovered == 1
    assert ids(successor.take_requests()) == [1]
    successor.push_responses()
    assert front.take_responses() == [Response(0, 0, 0)]


@pytest.mark.parametrize("committed", [3, 0x80000000, M])
def test_a_forged_journal_outside_the_outstanding_requests_is_ignored(committed: int) -> None:
    front, back, buf, view = make()
    for i in range(2):
        front.put_request(req(i))
    front.push_requests()
    back.release()
    struct.pack_into("=III", buf, 32, JOURNAL_MAGIC, committed, committed)  # rsp_prod 0, req_prod 2
    successor = BackRing(view, blkif.X86_64, 1)
    assert successor.recovered == 0
    assert ids(successor.take_requests()) == [0, 1]


def test_a_fresh_ring_recovers_nothing() -> None:
    _, back, _, _ = make()
    assert back.recovered == 0
    assert back.outstanding_at_attach == 0


# --- a real process killed at random instants -----------------------------------------------------
_SERVE = """
import mmap, os, random, sys
from xenblockctl.backend import blkif
from xenblockctl.backend.ring import BackRing
fd, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
buf = mmap.mmap(fd, blkif.PAGE_SIZE)
back = BackRing(memoryview(buf), blkif.X86_64, 1)
pending = []
write = None
if sys.argv[3] == "native":  # runs in ring order written by the native pass's C writer
    from xenblockctl.backend import _fastpass
    write = _fastpass.respond
os.write(1, b"up\\n")
while True:
    if write is None:
        pending += [blkif.X86_64.decode_request(raw).id for raw in back.take_requests()]
        rng.shuffle(pending)
        k = rng.randint(0, len(pending))
        back.respond_all([(rid, blkif.OP_READ, 0) for rid in pending[:k]])
        del pending[:k]
    else:
        rng.shuffle(pending)
        back.respond_all([(rid, blkif.OP_READ, 0) for rid in pending])  # older ones first
        taken = [blkif.X86_64.decode_request(raw).id for raw in back.take_requests()]
        k = rng.randint(0, len(taken))
        back.respond_run([(rid, blkif.OP_READ, 0) for rid in taken[:k]], back.taken_at, write)
        pending = taken[k:]
    back.push_responses()
"""


@pytest.mark.parametrize("writer", ["python", "native"])
def test_an_engine_killed_anywhere_loses_no_answer_and_gives_none_twice(writer: str) -> None:
    """`native`: the answers in ring order go through BackRing.respond_run's C writer
    (_fastpass.respond, the native pass's), the rest through respond_all."""
    if writer == "native" and not fastpath.available():
        pytest.skip("the native fast path is not built here")
    fd = os.memfd_create("xbc-test-ring")
    os.ftruncate(fd, blkif.PAGE_SIZE)
    shared = mmap.mmap(fd, blkif.PAGE_SIZE)
    view = memoryview(shared)
    init_shared_ring(view)
    front = FrontRing(view, blkif.X86_64, 1, init=False)
    answered: dict[int, int] = {}
    next_id = 0
    rng = random.Random(21)
    try:
        for round_ in range(25):
            child = subprocess.Popen(
                [sys.executable, "-c", _SERVE, str(fd), str(round_), writer],
                pass_fds=[fd],
                stdout=subprocess.PIPE,
            )
            try:
                assert child.stdout is not None
                assert child.stdout.readline() == b"up\n"
                deadline = time.monotonic() + rng.uniform(0.02, 0.3)
                while time.monotonic() < deadline:
                    while front.free_slots and next_id < (1 << 40):
                        front.put_request(req(next_id))
                        next_id += 1
                    front.push_requests()
                    for rsp in front.take_responses():
                        answered[rsp.id] = answered.get(rsp.id, 0) + 1
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait(10)
                if child.stdout is not None:
                    child.stdout.close()
            for rsp in front.take_responses():
                answered[rsp.id] = answered.get(rsp.id, 0) + 1
        # the last successor: publish what the last one finished, answer the rest in order
        last = BackRing(view, blkif.X86_64, 1)
        last.respond_all([(rid, blkif.OP_READ, 0) for rid in ids(last.take_requests())])
        last.push_responses()
        for rsp in front.take_responses():
            answered[rsp.id] = answered.get(rsp.id, 0) + 1
        last.release()
    finally:
        front.release()
        view.release()
        shared.close()
        os.close(fd)
    twice = {rid: n for rid, n in answered.items() if n != 1}
    assert twice == {}, f"answered more than once: {list(twice)[:10]}"
    assert sorted(answered) == list(range(next_id)), "every request answered exactly once"
    assert next_id > 1000, next_id
