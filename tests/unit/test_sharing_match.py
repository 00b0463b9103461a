"""The block-device sharing check decides which backends publish the wanted device by comparing
each physical-device text with the one spelling format_physical_device gives it (identity.
backends_publishing), not by parsing every value: the two must agree on every text, whoever
wrote it (bench/README.md, issue 18: the 128-backend add)."""

from __future__ import annotations

import os

from hypothesis import example, given
from hypothesis import strategies as st

from xenblockctl.xenstore.identity import PHYSICAL_DEVICE, PublishedIdentity, format_physical_device

#: A device the kernel can have (dev_t: 12-bit major, 20-bit minor); the texts go beyond.
MAJOR = st.integers(min_value=0, max_value=(1 << 12) - 1)
MINOR = st.integers(min_value=0, max_value=(1 << 20) - 1)
HEX = "0123456789abcdefABCDEF"
#: Texts near the grammar: hex runs with a colon, leading zeros, upper case, spaces, junk.
NEAR = st.builds(
    lambda a, sep, b: a + sep + b,
    st.text(alphabet=HEX + "0 x", max_size=10),
    st.sampled_from([":", "::", "", " :", ":\x00"]),
    st.text(alphabet=HEX + "0 \n", max_size=10),
)


def by_parsing(text: str | None, devt: int) -> bool:
    """The rule as it was: parse the value, compare the devt it names. (A major from 2^31 up
    parses, and os.makedev then raised OverflowError out of the sharing check: such a text
    names no device there can be, which the comparison now says without raising.)"""
    published = PublishedIdentity.named({PHYSICAL_DEVICE: text})
    try:
        return published is not None and published.devt == devt
    except OverflowError:
        return False


def by_text(text: str | None, devt: int) -> bool:
    return text == format_physical_device(os.major(devt), os.minor(devt))


@given(major=MAJOR, minor=MINOR, text=st.one_of(st.none(), NEAR, st.text(max_size=20)))
@example(major=7, minor=77, text="7:4d")
@example(major=7, minor=77, text="7:4D")
@example(major=7, minor=77, text="07:4d")
@example(major=7, minor=77, text="7:04d")
@example(major=7, minor=77, text="7:4d ")
@example(major=7, minor=77, text="7:4d\x00")
@example(major=0, minor=0, text="0:0")
@example(major=0, minor=0, text="0:00")
@example(major=0xFFF, minor=0xFFFFF, text="fff:fffff")
@example(major=0xFFF, minor=0xFFFFF, text="ffffffff:ffffffff")
@example(major=0, minor=0, text="100000000:0")
@example(major=0, minor=0, text="80000000:0")
def test_comparing_the_text_decides_what_parsing_it_would(major: int, minor: int, text: str | None) -> None:
    devt = os.makedev(major, minor)
    assert by_text(text, devt) == by_parsing(text, devt)


@given(major=MAJOR, minor=MINOR)
def test_every_spelling_that_parses_to_the_device_is_the_one_compared(major: int, minor: int) -> None:
    devt = os.makedev(major, minor)
    spelled = format_physical_device(major, minor)
    assert by_parsing(spelled, devt)
    assert by_text(spelled, devt)
