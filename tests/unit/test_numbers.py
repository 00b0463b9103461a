"""The one number parser: exactly `0|[1-9][0-9]*` in ASCII, bounded, and never an exception other
than its own coded one, whatever the text."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.xenstore.numbers import NodeValueError, parse_uint, uint_or_none

GRAMMAR = re.compile(r"0|[1-9][0-9]*", re.ASCII)
TRICKY = ["²", "¹", "٣", "٣٣", " 5", "5 ", "+5", "-0", "1_0", "05", "0x5", "", "5\n", "５", "𝟓"]


@given(st.one_of(st.text(max_size=30), st.sampled_from(TRICKY), st.integers(0, 2**70).map(str)))
def test_accepts_exactly_the_grammar_within_bounds(text: str) -> None:
    expected = int(text) if GRAMMAR.fullmatch(text) and int(text) <= 2**32 else None
    assert uint_or_none(text, maximum=2**32) == expected


@pytest.mark.parametrize("text", TRICKY)
def test_what_int_and_isdigit_forgive_is_refused_with_a_code(text: str) -> None:
    with pytest.raises(NodeValueError) as exc:
        parse_uint(text, "ring-ref", maximum=0xFFFFFFFF)
    assert exc.value.code == "bad-node-value"
    assert exc.value.one_line().isascii()
    assert "ring-ref" in exc.value.message


def test_bounds_and_absence() -> None:
    assert parse_uint("0", "x", maximum=0) == 0
    assert parse_uint("4294967295", "x", maximum=0xFFFFFFFF) == 0xFFFFFFFF
    assert uint_or_none("4294967296", maximum=0xFFFFFFFF) is None
    assert uint_or_none("9" * 100_000, maximum=8) is None  # refused by length, before int()
    assert uint_or_none(None, maximum=8) is None
    with pytest.raises(NodeValueError, match="missing"):
        parse_uint(None, "state", maximum=8)
