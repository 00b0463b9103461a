"""The block-device sharing check decides which backends publish the wanted device by comparing
each physical-device text with the one spelling format_physical_device gives it (sharing.
_backends_publishing), not by parsing every value: the two must agree on every text, whoever
wrote it (bench/README.md, issue 18: the 128-backend add)."""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from xenblockctl.blockscript import sharing
from xenblockctl.xenstore.identity import PHYSICAL_DEVICE, PublishedIdentity, format_physical_device
from xenblockctl.xenstore.vbd import BackendEntry

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


class Reads:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.batches: list[int] = []

    def read_many(self, paths: list[str]) -> list[str | None]:
        self.batches.append(len(paths))
        return [self.values.get(path) for path in paths]


def test_publishers_are_found_in_every_batch_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across batch boundaries, in listing order, whatever else the others publish."""
    monkeypatch.setattr(sharing, "READ_BATCH", 7)
    entries = [BackendEntry("vbd", str(d), "51712", f"/b/vbd/{d}/51712") for d in range(30)]
    target = os.makedev(7, 77)
    values = {f"{e.path}/{PHYSICAL_DEVICE}": f"fd:{i:x}" for i, e in enumerate(entries)}
    for i in (0, 6, 7, 29):
        values[f"{entries[i].path}/{PHYSICAL_DEVICE}"] = "7:4d"
    values[f"{entries[8].path}/{PHYSICAL_DEVICE}"] = "7:4D"  # malformed: names no device
    del values[f"{entries[9].path}/{PHYSICAL_DEVICE}"]  # not published yet
    store = Reads(values)
    found = sharing._backends_publishing(store, entries, target)  # type: ignore[arg-type]
    assert found == [entries[i] for i in (0, 6, 7, 29)]
    assert store.batches == [7, 7, 7, 7, 2]
