"""xenblockctl.enums behaves as Python's enum module for what the package's enums use."""

from __future__ import annotations

import copy
import enum
import pickle
from typing import Any

import pytest

from xenblockctl import enums


def _states(base: type) -> type:
    class State(base):  # type: ignore[misc]
        Unknown = 0
        Connected = 4
        Closed = 6

        @property
        def closing(self) -> bool:
            return self in (5, 6)

        @classmethod
        def first(cls) -> object:
            return next(iter(cls))

    return State


def _flags(base: type) -> type:
    class Flags(base):  # type: ignore[misc]
        READ_ONLY = 1
        AUTOCLEAR = 4
        PARTSCAN = 8
        DIRECT_IO = 16

    return Flags


def _plain(base: type) -> type:
    class Verdict(base):  # type: ignore[misc]
        LIVE = "live"
        GONE = "gone"

        @property
        def holds(self) -> bool:
            return self is type(self).LIVE

    return Verdict


def _letters(base: type) -> type:
    class Access(base):  # type: ignore[misc]
        NONE = "n"
        READ = "r"

    return Access


# The classes are built at run time from a base chosen by the caller, so mypy cannot know their
# members: Any is the honest type for what these tests probe member by member on both sides.
PAIRS: dict[str, tuple[Any, Any]] = {
    "int": (_states(enums.IntEnum), _states(enum.IntEnum)),
    "flag": (_flags(enums.IntFlag), _flags(enum.IntFlag)),
    "plain": (_plain(enums.Enum), _plain(enum.Enum)),
    "str": (_letters(enums.StrEnum), _letters(enum.StrEnum)),
}
for _kind, (_ours, _std) in PAIRS.items():
    _ours.__qualname__ = f"OURS_{_kind}"
    _std.__qualname__ = f"STD_{_kind}"
    globals()[_ours.__qualname__] = _ours
    globals()[_std.__qualname__] = _std


def _norm(text: str, ours: type, std: type) -> str:
    for name in (ours.__qualname__, std.__qualname__, ours.__name__, std.__name__):
        text = text.replace(name, "X")
    return text


@pytest.mark.parametrize("kind", PAIRS)
def test_members_lookup_and_printing_match(kind: str) -> None:
    ours, std = PAIRS[kind]
    assert [m.name for m in ours] == [m.name for m in std]
    assert [m.value for m in ours] == [m.value for m in std]
    assert len(ours) == len(std)
    assert list(ours.__members__) == list(std.__members__)
    for a, b in zip(ours, std, strict=True):
        assert ours(a.value) is a
        assert ours[a.name] is a
        assert getattr(ours, a.name) is a
        assert isinstance(a, ours)
        assert a in ours
        assert repr(a) == repr(b)
        assert str(a) == str(b)
        assert format(a) == format(b)
        assert f"{a}" == f"{b}"
        assert f"{a:>12}" == f"{b:>12}"
        assert (a == a.value) == (b == b.value)
        assert hash(a) == hash(b)
        assert bool(a) == bool(b)
        assert pickle.loads(pickle.dumps(a)) is a
        assert copy.copy(a) is a
        assert copy.deepcopy(a) is a
    for bad in ("nope", 3, 99, None):
        if kind == "flag" and isinstance(bad, int):
            continue
        with pytest.raises(ValueError) as ours_exc:
            ours(bad)
        with pytest.raises(ValueError) as std_exc:
            std(bad)
        assert _norm(str(ours_exc.value), ours, std) == _norm(str(std_exc.value), ours, std)
    with pytest.raises(AttributeError):
        setattr(ours, next(iter(ours)).name, 1)


def test_methods_and_properties_stay_methods() -> None:
    ours, std = PAIRS["int"]
    assert ours.Closed.closing is std.Closed.closing is True
    assert ours.Connected.closing is False
    assert ours.first() is ours.Unknown
    assert ours._value2member_map_[4] is ours.Connected
    assert max(ours._value2member_map_) == max(std._value2member_map_)
    ours, std = PAIRS["plain"]
    assert ours.LIVE.holds
    assert not ours.GONE.holds
    assert ours.LIVE != "live"
    assert std.LIVE != "live"


@pytest.mark.parametrize("value", [0, 1, 4, 5, 13, 29, 31, 2, 3, 32, 33, 0x23])
def test_flags_match(value: int) -> None:
    ours, std = PAIRS["flag"]
    a, b = ours(value), std(value)
    assert int(a) == int(b) == value
    assert repr(a) == _norm(repr(b), ours, std).replace("X", ours.__name__), (repr(a), repr(b))
    assert str(a) == str(b)
    assert bool(a) == bool(b)
    assert [m.name for m in a] == [m.name for m in b]
    for m_ours, m_std in zip(ours, std, strict=True):
        assert (m_ours in a) == (m_std in b)
        for op in ("__or__", "__and__", "__xor__"):
            r_ours, r_std = getattr(a, op)(m_ours), getattr(b, op)(m_std)
            assert int(r_ours) == int(r_std)
            assert type(r_ours) is ours
        assert int(value | m_ours) == int(value | m_std)
        assert int(value & ~m_ours) == int(value & ~m_std)
        assert int(~m_ours) == int(~m_std)
    assert int(a | 2) == int(b | 2)
    with pytest.raises(TypeError):
        _ = 1 in a
