"""xenblockctl.records.NamedTuple behaves as typing.NamedTuple for the class syntax the package uses."""

from __future__ import annotations

import ast
import copy
import pickle
import sys
import typing
from typing import Any

import pytest

from xenblockctl import records


def _pair(base: type) -> type:
    """The same record body built on either base."""

    class Point(base):  # type: ignore[misc]
        """A point."""

        x: int
        y: int
        label: str = "origin"
        scale: int = 1

        @property
        def norm(self) -> int:
            return abs(self.x) + abs(self.y)

        def moved(self, dx: int) -> Point:
            moved: Point = self._replace(x=self.x + dx)
            return moved

    return Point


# Built at run time from a base chosen by the caller, so mypy cannot know the fields: Any is the
# honest type for classes these tests probe attribute by attribute on both sides.
OURS: Any = _pair(records.NamedTuple)
STDLIB: Any = _pair(typing.NamedTuple)
# pickle finds classes by module + qualified name
OURS.__qualname__ = "OURS"
STDLIB.__qualname__ = "STDLIB"


def _both() -> list[Any]:
    return [OURS, STDLIB]


@pytest.mark.parametrize("call", [(1, 2), (1, 2, "a"), (1, 2, "a", 3), (1,), (1, 2, 3, 4, 5)])
def test_positional_construction_matches(call: tuple[object, ...]) -> None:
    outcomes: list[tuple[str, tuple[object, ...] | None]] = []
    for cls in _both():
        try:
            outcomes.append(("ok", tuple(cls(*call))))
        except TypeError:
            outcomes.append(("TypeError", None))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(
    "kwargs",
    [{"x": 1, "y": 2}, {"y": 2, "x": 1, "scale": 5}, {"x": 1}, {"x": 1, "y": 2, "bogus": 3}, {"label": "a"}],
)
def test_keyword_construction_matches(kwargs: dict[str, object]) -> None:
    outcomes: list[tuple[str, tuple[object, ...] | None]] = []
    for cls in _both():
        try:
            outcomes.append(("ok", tuple(cls(**kwargs))))
        except TypeError:
            outcomes.append(("TypeError", None))
    assert outcomes[0] == outcomes[1]


def test_duplicate_argument_is_refused_like_namedtuple() -> None:
    for cls in _both():
        with pytest.raises(TypeError):
            cls(1, 2, x=3)


def test_record_api_matches() -> None:
    a, b = OURS(3, -4, "p"), STDLIB(3, -4, "p")
    assert a == b == (3, -4, "p", 1)
    assert hash(a) == hash(b)
    assert (a.x, a.y, a.label, a.scale, a.norm) == (b.x, b.y, b.label, b.scale, b.norm)
    assert OURS._fields == STDLIB._fields
    assert OURS._field_defaults == STDLIB._field_defaults
    assert OURS.__match_args__ == STDLIB.__match_args__
    assert a._asdict() == b._asdict()
    assert tuple(a._replace(scale=9)) == tuple(b._replace(scale=9))
    assert tuple(a.moved(1)) == tuple(b.moved(1))
    assert type(a.moved(1)) is OURS
    assert repr(a).replace("OURS", "Point") == repr(b).replace("STDLIB", "Point")
    assert repr(a) == "Point(x=3, y=-4, label='p', scale=1)"
    assert tuple(OURS._make([1, 2, "q", 4])) == tuple(STDLIB._make([1, 2, "q", 4]))
    assert OURS.__doc__ == "A point."
    for record in (a, b):
        with pytest.raises(ValueError):
            record._replace(bogus=1)
        with pytest.raises(AttributeError):
            record.x = 5
        with pytest.raises(AttributeError):
            record.extra = 5
    with pytest.raises(TypeError):
        OURS._make([1, 2])


def test_pickle_and_copy_round_trip() -> None:
    a = OURS(1, 2, "z", 3)
    module: Any = sys.modules[__name__]
    module.OURS = OURS
    assert pickle.loads(pickle.dumps(a)) == a
    assert type(pickle.loads(pickle.dumps(a))) is OURS
    assert copy.copy(a) == a
    assert copy.deepcopy(a) == a


def test_subclass_of_a_record_adds_behaviour_not_fields() -> None:
    class Named(OURS):  # type: ignore[misc]
        __slots__ = ()

        def name(self) -> str:
            return f"{self.label}@{self.x},{self.y}"

    n = Named(1, 2, "n")
    assert n.name() == "n@1,2"
    assert Named._fields == OURS._fields
    assert isinstance(n, OURS)


def test_bad_definitions_are_refused() -> None:
    with pytest.raises(TypeError):

        class Bad(records.NamedTuple):
            a: int = 1
            b: int  # type: ignore[misc]  # the refusal under test

    with pytest.raises(ValueError):

        class Private(records.NamedTuple):
            _hidden: int  # type: ignore[misc]  # the refusal under test


@pytest.mark.parametrize("module", ["xenblockctl.records", "xenblockctl.enums"])
def test_no_class_building_machinery_is_imported(module: str) -> None:
    """The point of records.py and enums.py: importing them loads none of what they replace."""
    import subprocess

    probe = f"import sys; import {module}; print(sorted(set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {sys.path!r}; {probe}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert not loaded & {"typing", "collections", "re", "functools", "enum", "contextlib"}
