"""A malicious frontend against a running data plane (hypothesis).

For random ring contents, indices, grant refs, sector numbers and indirect pages the engine must:
not crash (the ring thread stays alive or reports a broken ring), answer only with OKAY/ERROR/
EOPNOTSUPP, zero the response padding, never write outside the device range (a guard region of the
backing file past the device end keeps its pattern), and still stop() with everything drained.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.backend import ring_params_of
from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import DiscardRequest, IndirectRequest, Segment, SegmentRequest
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget, DiscardMode
from xenblockctl.backend.transport.local import LocalTransport

# every test on both ring passes: pure Python and the native fast path (tests/fixtures/backend.py)
pytestmark = pytest.mark.usefixtures("engine_path")

DEVICE = 256 * 1024  # what the engine may touch
GUARD = 64 * 1024  # pattern past the device end that must survive
SECTORS = DEVICE // 512
PATTERN = bytes(range(256)) * (GUARD // 256)
EXAMPLES = int(os.environ.get("XBC_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalTransport, DeviceTarget, Path]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        f.write(bytes(DEVICE) + PATTERN)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    transport = LocalTransport(str(tmp / "grants.sock"))
    # the device is the first DEVICE bytes of a bigger file: anything past it is out of bounds
    target = DeviceTarget(fd=fd, size_bytes=DEVICE, discard=DiscardMode.PUNCH_HOLE, discard_granularity=512)
    yield transport, target, path
    transport.close()
    os.close(fd)


PAGES = 40  # frontend memfd pages: 31 data, 8 indirect, then the ring (page 39)
RING_REF = PAGES - 1
sector = st.one_of(st.integers(0, SECTORS + 16), st.integers(0, 2**64 - 1))
# Grefs never name the ring page: a guest READ into its own ring is its own loss, but it would make
# the answers this test checks unreadable.
gref = st.one_of(st.integers(0, PAGES + 2), st.integers(0, 2**32 - 1)).filter(lambda g: g != RING_REF)
segment = st.builds(Segment, gref, st.integers(0, 9), st.integers(0, 9))

requests = st.one_of(
    st.builds(
        SegmentRequest,
        st.sampled_from([0, 1, 2, 3]),
        st.integers(0, 14),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**64 - 1),
        sector,
        st.lists(segment, min_size=0, max_size=11).map(tuple),
    ),
    st.builds(DiscardRequest, st.integers(0, 255), st.just(0), st.integers(0, 2**64 - 1), sector, sector),
    st.builds(
        IndirectRequest,
        st.integers(0, 7),
        st.integers(0, 600),
        st.integers(0, 2**64 - 1),
        sector,
        st.just(0),
        st.lists(gref, min_size=8, max_size=8).map(tuple),
    ),
    st.binary(min_size=112, max_size=112),
)

hostile_script = st.fixed_dictionaries(
    {
        "abi": st.sampled_from([blkif.X86_64, blkif.X86_32]),
        "requests": st.lists(requests, min_size=1, max_size=40),
        "indirect_page": st.binary(min_size=0, max_size=4096),
        "req_prod_jump": st.one_of(st.none(), st.integers(0, 2**32 - 1)),
        "rsp_event": st.integers(0, 2**32 - 1),
    }
)


def _wait_quiet(dp: DataPlane, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dp.broken is not None:
            return
        ring = dp.ring
        if ring.req_cons == ring.req_prod and dp.in_flight == 0 and ring.rsp_prod_pvt == ring.req_cons:
            return
        time.sleep(0.002)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=hostile_script, persistent=st.booleans())
def test_hostile_frontend(
    fuzz_env: tuple[LocalTransport, DeviceTarget, Path], script: dict[str, object], persistent: bool
) -> None:
    """`persistent`: the frontend negotiates persistent grants, where the native fast path runs."""
    transport, target, path = fuzz_env
    abi = script["abi"]
    assert isinstance(abi, blkif.Abi)
    fe = LocalFrontend(
        transport.socket_path,
        66,
        abi=abi,
        data_pages=31,
        indirect_pages=8,
        ring_last=True,
        persistent=persistent,
    )
    assert fe.ring_refs == (RING_REF,)
    dp: DataPlane | None = None
    try:
        dp = DataPlane(
            transport, 66, ring_params_of(fe), target, target.limits(max_indirect_segments=512), workers=2
        )
        dp.start()
        raw_page = script["indirect_page"]
        assert isinstance(raw_page, bytes)
        page = bytearray(raw_page)
        for off in range(0, len(page) - 3, 8):  # same rule for grefs inside indirect descriptors
            if struct.unpack_from("<I", page, off)[0] == RING_REF:
                struct.pack_into("<I", page, off, 0)
        for ref in range(31, 39):  # the indirect pool holds attacker-chosen descriptors
            fe.page(ref)[: len(page)] = page
        fe.ring.poke_index("rsp_event", int(script["rsp_event"]))  # type: ignore[call-overload]
        sent = 0
        for req in script["requests"]:  # type: ignore[attr-defined]
            if fe.ring.free_slots <= 0:
                break
            fe.ring.put_request_bytes(req if isinstance(req, bytes) else abi.encode_request(req))
            sent += 1
        fe.ring.push_requests()
        jump = script["req_prod_jump"]
        if jump is not None:
            fe.ring.poke_index("req_prod", int(jump))  # type: ignore[call-overload]
        fe.evtchn.notify()
        _wait_quiet(dp)
        assert dp.stop(timeout=10), "in-flight I/O did not drain"
        # every answer is well formed and its padding is zero
        rsp_prod = fe.ring.rsp_prod
        answered = (rsp_prod - fe.ring.rsp_cons) & 0xFFFFFFFF
        assert answered <= sent or jump is not None
        for i in range(min(answered, fe.ring.size)):
            slot = fe.ring.slot_bytes(fe.ring.rsp_cons + i)
            _rid, _op, status = struct.unpack_from("<QBxh", slot)
            assert status in (blkif.RSP_OKAY, blkif.RSP_ERROR, blkif.RSP_EOPNOTSUPP)
            assert slot[9] == 0
            assert slot[12 : abi.response_size] == bytes(abi.response_size - 12)
        if dp.broken is not None:
            assert "impossible" in dp.broken  # the only legitimate way to break: a bad index
    finally:
        if dp is not None:
            dp.stop(timeout=10)
        fe.close()
    with open(path, "rb") as f:
        f.seek(DEVICE)
        assert f.read() == PATTERN, "the engine wrote past the device end"
