"""Virtual device names <-> numbers (xen-vbd-interface(7), reference xen-block-protocol.md §10)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.xenstore.vdev import (
    RESERVED,
    Vdev,
    VdevError,
    disk_to_letters,
    is_canonical_number,
    letters_to_disk,
    vdev_name,
    vdev_to_number,
)

KNOWN = {
    # documented examples
    "xvda": 51712,
    "xvdb": 51728,
    "xvdc": 51744,
    "xvdd": 51760,
    "xvdaa": (1 << 28) | (26 << 8),
    # compact xvd: (202 << 8) | (disk << 4) | part
    "xvda1": 51713,
    "xvda15": 51727,
    "xvdp": (202 << 8) | (15 << 4),
    "xvdp15": (202 << 8) | (15 << 4) | 15,
    # beyond 15 disks or 15 partitions: extended form
    "xvdq": (1 << 28) | (16 << 8),
    "xvda16": (1 << 28) | 16,
    "xvdz255": (1 << 28) | (25 << 8) | 255,
    # sd and hd
    "sda": 8 << 8,
    "sdb1": (8 << 8) | (1 << 4) | 1,
    "sdp15": (8 << 8) | (15 << 4) | 15,
    "hda": 3 << 8,
    "hda1": (3 << 8) | 1,
    "hdb": (3 << 8) | (1 << 6),
    "hdb63": (3 << 8) | (1 << 6) | 63,
    "hdc": 22 << 8,
    "hdd5": (22 << 8) | (1 << 6) | 5,
}


@pytest.mark.parametrize(("name", "number"), sorted(KNOWN.items()))
def test_known_names(name: str, number: int) -> None:
    assert vdev_to_number(name) == number
    assert vdev_name(number) == name


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("d0", "xvda"),
        ("d0p1", "xvda1"),
        ("d1p2", "xvdb2"),
        ("d16", "xvdq"),
        ("d26", "xvdaa"),
        ("51712", "xvda"),
    ],
)
def test_aliases_map_to_the_xvd_number(alias: str, canonical: str) -> None:
    assert vdev_to_number(alias) == vdev_to_number(canonical)
    assert Vdev.parse(alias).name == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "xvd",
        "xvda0",  # partition 0 is written without digits
        "xvda01",
        "XVDA",
        "vda",
        "xvda256",
        "sdq",  # sd has 16 disks
        "sda16",
        "hde",  # hd has 4 disks
        "hda64",
        "d0p0",
        "d01",
        "d1048576",  # 2^20 disks
        "xvda-1",
        " xvda",
        "0x33",
        "-1",
        "0512",
        "536870912",  # 2 << 28: reserved
        "1234",  # major 4: no scheme
        "xvd١",  # non-ASCII digit
    ],
)
def test_rejects(bad: str) -> None:
    with pytest.raises(VdevError) as info:
        Vdev.parse(bad)
    assert info.value.code == "vdev-invalid"


@pytest.mark.parametrize("number", [-1, RESERVED, 1234, (3 << 8) | 128, (22 << 8) | 200, True])
def test_rejects_numbers(number: int) -> None:
    with pytest.raises(VdevError):
        Vdev.from_number(number)


def test_extended_form_of_a_small_disk_is_valid_but_not_canonical() -> None:
    number = (1 << 28) | 1  # xvda1 written in the extended encoding
    assert vdev_name(number) == "xvda1"
    assert not is_canonical_number(number)
    assert is_canonical_number(51713)


vdevs = st.one_of(
    st.builds(Vdev, st.just("xvd"), st.integers(0, (1 << 20) - 1), st.integers(0, 255)),
    st.builds(Vdev, st.just("sd"), st.integers(0, 15), st.integers(0, 15)),
    st.builds(Vdev, st.just("hd"), st.integers(0, 3), st.integers(0, 63)),
)


@given(vdevs)
def test_name_and_number_round_trip(vdev: Vdev) -> None:
    assert Vdev.parse(vdev.name) == vdev
    assert Vdev.from_number(vdev.number) == vdev
    assert 0 < vdev.number < RESERVED
    assert is_canonical_number(vdev.number)


@given(st.integers(0, RESERVED - 1))
def test_every_decodable_number_round_trips_when_canonical(number: int) -> None:
    try:
        vdev = Vdev.from_number(number)
    except VdevError:
        return
    assert (vdev.number == number) == is_canonical_number(number)
    assert Vdev.parse(vdev.name) == vdev


@given(st.integers(0, (1 << 20) - 1))
def test_disk_letters_are_bijective_base_26(disk: int) -> None:
    letters = disk_to_letters(disk)
    assert letters_to_disk(letters) == disk
    assert letters.isalpha()
    assert letters.islower()


def test_disk_letters_examples() -> None:
    assert [disk_to_letters(n) for n in (0, 25, 26, 27, 51, 52, 701, 702)] == [
        "a",
        "z",
        "aa",
        "ab",
        "az",
        "ba",
        "zz",
        "aaa",
    ]


def test_vbd_devid_bound_is_the_vdev_number_space() -> None:
    # vbd spells the bound itself so that the hotplug path does not import this codec
    from xenblockctl.xenstore import vbd

    assert vbd.DEVID_END == RESERVED
    assert vbd.BackendPath("vbd", 1, RESERVED - 1).devid == RESERVED - 1
    with pytest.raises(vbd.VbdPathError):
        vbd.BackendPath("vbd", 1, RESERVED)
