"""Error responses: every one counted, logged with its reason at a bounded rate, published on change."""

from __future__ import annotations

import logging

import pytest

from xenblockctl.backend.errorlog import PUBLISH_INTERVAL, ErrorResponses
from xenblockctl.xenstore.vbd import format_error_responses, parse_error_responses


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counted_exactly_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    errors = ErrorResponses("xbc-5-51712", burst=3, interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="xenblockctl.backend.errorlog"):
        for rid in range(1000):  # a guest failing every request on purpose
            errors.record("invalid", rid, "nr_segments 12 > 11")
        assert len(caplog.records) == 3
        clock.now += 10.0  # one more line per interval, saying how many were left out
        errors.record("grant-map", 1000, "cannot mmap grants of domain 5 (EMFILE)")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0] == "xbc-5-51712: error response to id 0: invalid: nr_segments 12 > 11"
    assert lines[3] == (
        "xbc-5-51712: error response to id 1000: grant-map: cannot mmap grants of domain 5 (EMFILE)"
        " (997 more error responses not logged before this one)"
    )
    assert errors.counts == {"grant-map": 1, "io": 0, "invalid": 1000, "unsupported": 0}
    assert errors.total == 1001


def test_published_on_change_at_most_once_a_second() -> None:
    clock = Clock()
    errors = ErrorResponses("x", clock=clock)
    first = errors.due()
    assert first == "grant-map=0 io=0 invalid=0 unsupported=0"
    errors.published(first)
    assert errors.due() is None  # unchanged
    errors.record("io", 1, "write of 4096 bytes at 0 failed")
    assert errors.due() is None  # changed, but too soon
    assert errors.due(force=True) == "grant-map=0 io=1 invalid=0 unsupported=0"  # a ring stopping
    clock.now += PUBLISH_INTERVAL
    value = errors.due()
    assert value == "grant-map=0 io=1 invalid=0 unsupported=0"
    assert parse_error_responses(value) == {"grant-map": 0, "io": 1, "invalid": 0, "unsupported": 0}


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "io=1",
        "grant-map=0 io=1 invalid=0 unsupported=x",
        "grant-map=0 io=1 io=0 unsupported=0",
        "grant-map=0 io=١ invalid=0 unsupported=0",
        "grant-map=0 io=1 invalid=0 other=0",
    ],
)
def test_a_node_not_written_by_the_engine_is_not_shown(text: str | None) -> None:
    assert parse_error_responses(text) is None
    assert parse_error_responses(format_error_responses({"io": 2})) == {
        "grant-map": 0,
        "io": 2,
        "invalid": 0,
        "unsupported": 0,
    }
