"""Retry jitter (xenblockctl/backoff.py) never waits for the kernel's random pool.

The pool not being initialised is a state this host's kernel left long ago and cannot return to
on demand, so getrandom's EAGAIN is the one thing mocked here; a fresh driver domain under
emulation is in it (scenario 21)."""

from __future__ import annotations

import posix
import time

import pytest

from xenblockctl import backoff
from xenblockctl.kernel.loop import DEFAULT_RETRY


def test_fraction_comes_from_the_pool_when_it_is_ready() -> None:
    values = {backoff.fraction() for _ in range(200)}
    assert all(0 <= value < 1 for value in values)
    assert len(values) > 150, "16 random bits per call"


def _uninitialised(size: int, flags: int = 0) -> bytes:
    if not flags & posix.GRND_NONBLOCK:
        raise AssertionError("a blocking getrandom: a fresh domain would sleep here until libxl kills it")
    raise BlockingIOError(11, "Resource temporarily unavailable")


def test_fraction_does_not_block_before_the_pool_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(posix, "getrandom", _uninitialised)
    values = [backoff.fraction() for _ in range(200)]
    assert all(0 <= value < 1 for value in values)
    assert len(set(values)) > 100, "the clock's bits still spread the pauses"


def test_two_racers_started_together_are_spread_by_their_pids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes that read the clock in the same nanosecond still pause differently."""
    monkeypatch.setattr(posix, "getrandom", _uninitialised)
    monkeypatch.setattr(time, "monotonic_ns", lambda: 123_456_789_000)
    fractions = set()
    for pid in (4000, 4001):
        monkeypatch.setattr(posix, "getpid", lambda pid=pid: pid)
        fractions.add(backoff.fraction())
    assert len(fractions) == 2


def test_the_loop_and_the_store_back_off_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(posix, "getrandom", _uninitialised)
    assert 0 <= DEFAULT_RETRY.delay(3) < DEFAULT_RETRY.max_delay
