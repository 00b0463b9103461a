"""Issue 20: how the ring thread sleeps between a synchronous frontend's requests (pvgrub's shape):
one blocking read() of its event channel, which wakes it and consumes the event in one system call
(poll() on the channel and the stop pipe, then a read() to consume the event, were two). Checked on
the real kernel: the thread's current system call, from /proc."""

from __future__ import annotations

import platform
import time

import pytest

from tests.fixtures.backend import PairFactory
from tests.fixtures.ring_thread import POLL, READ, sleeping_in
from xenblockctl.backend.dataplane import DataPlane

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 system call numbers")


def test_idle_ring_thread_sleeps_in_one_read_of_its_event_channel(make_pair: PairFactory) -> None:
    pair = make_pair()
    dp = pair.dataplane
    assert sleeping_in(dp) == (READ, dp.evtchn.fileno())
    for i in range(3):  # and again after each wake-up: the wake-up consumed the event, nothing left
        assert pair.frontend.read(8 * i, 4096) == bytes(4096)
        assert sleeping_in(dp) == (READ, dp.evtchn.fileno())
    assert dp.stats.ok == 3
    t0 = time.monotonic()
    assert dp.stop(timeout=30)  # the stop interrupts the read
    assert time.monotonic() - t0 < 5
    assert dp._thread is not None
    assert not dp._thread.is_alive()


def test_poll_wakeup_sleeps_in_poll_and_stops(make_pair: PairFactory) -> None:
    """`backend --poll-wakeup` (the A/B the Xen lane's scenario 11 runs): poll() on the channel and
    the stop pipe, as before the blocking wake-up."""
    pair = make_pair()
    fe = pair.frontend
    # a second data plane on another frontend, with the poll wake-up: the fixture's own is blocking
    dp = pair.dataplane
    assert dp.stop(timeout=30)
    poll_dp = DataPlane(
        dp.transport, dp.domid, dp.params, dp.target, dp.limits, workers=0, blocking_wakeup=False
    )
    poll_dp.start()
    try:
        assert sleeping_in(poll_dp)[0] == POLL
        assert fe.read(0, 4096) == bytes(4096)
        assert sleeping_in(poll_dp)[0] == POLL
        assert poll_dp.stats.ok == 1
    finally:
        t0 = time.monotonic()
        assert poll_dp.stop(timeout=30)
        assert time.monotonic() - t0 < 5
