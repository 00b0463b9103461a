"""`Enum`, `IntEnum`, `StrEnum` and `IntFlag` for modules on the hotplug path, without `enum`.

    from xenblockctl.enums import IntEnum

    class XenbusState(IntEnum):
        Closed = 6

Type checkers see the `enum` module's classes themselves. At run time the classes come from
here: the same class syntax and the behaviour the package relies on, as Python 3.11's enum has it
(lookup by value, `name`/`value`, iteration in definition order, `__members__`, singletons that
survive pickle and copy, 3.11's `repr`/`str`/`format`, IntFlag's pseudo-members, `in`, `|`, `&`,
`^` and `~`). Why: `enum` pulls in `functools`, `collections`, `operator`, `types`, `keyword`
and `reprlib`, and a stdlib enum class costs ~0.1-0.3 ms to build; together about 4 ms of every
block script start (bench/README.md, issue 18). tests/unit/test_enums.py compares each behaviour
with the enum module's.

Not supported (none of the package's enums use them): `auto()`, aliases, `_missing_`,
`_ignore_`, functional creation, enums deriving from other enums with members, and names starting
with `_` as members (they are plain class attributes here)."""

from __future__ import annotations

__all__ = ["Enum", "IntEnum", "IntFlag", "StrEnum"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import Enum, IntEnum, IntFlag, StrEnum
else:
    #: Value types that are never descriptors: their members skip three failing hasattr() calls
    #: each (an AttributeError raised and caught per call; bench/README.md, issue 18 round 5).
    _PLAIN = frozenset({int, str, bytes, float, bool, tuple})

    class _EnumMeta(type):
        def __new__(mcls, name, bases, namespace):
            # one pass, no call per name, members set with type.__setattr__ (not our Python
            # __setattr__) and their two attributes in one update: ~10 % of an enum's build
            # (bench/README.md, issue 18 round 5 and start18)
            members = {}
            body = {}
            for key, value in namespace.items():
                # a member: a public name whose value is no descriptor (a plain value type skips
                # three failing hasattr probes, each an AttributeError raised and caught)
                if key[0] != "_" and (
                    type(value) in _PLAIN
                    or not (
                        hasattr(value, "__get__") or hasattr(value, "__set__") or hasattr(value, "__delete__")
                    )
                ):
                    members[key] = value
                else:
                    body[key] = value
            cls = type.__new__(mcls, name, bases, body)
            if not members:
                return cls
            for base in bases:
                if getattr(base, "_member_names_", None):
                    raise TypeError(f"{name}: cannot extend an enum that has members")
            by_value = {}
            make = int.__new__ if issubclass(cls, int) else str.__new__ if issubclass(cls, str) else None
            setattr_ = type.__setattr__
            for key, value in members.items():
                if value in by_value:
                    raise TypeError(f"{name}: aliases are not supported ({key!r})")
                member = object.__new__(cls) if make is None else make(cls, value)
                member.__dict__.update(_name_=key, _value_=value)
                members[key] = by_value[value] = member
                setattr_(cls, key, member)
            setattr_(cls, "_member_names_", list(members))
            setattr_(cls, "_member_map_", members)
            setattr_(cls, "_value2member_map_", by_value)
            if make is int.__new__ and hasattr(cls, "_flag_mask_"):
                mask = 0
                for value in by_value:
                    mask |= value
                setattr_(cls, "_flag_mask_", mask)
                setattr_(cls, "_all_bits_", (1 << mask.bit_length()) - 1)
            return cls

        def __call__(cls, value):
            if isinstance(value, cls):
                return value
            try:
                return cls._value2member_map_[value]
            except (KeyError, TypeError):
                pass
            if hasattr(cls, "_flag_mask_") and isinstance(value, int):
                return cls._pseudo(value)
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}")

        def __setattr__(cls, key, value):
            if key in cls.__dict__.get("_member_map_", {}):
                raise AttributeError(f"cannot reassign member {key!r}")
            super().__setattr__(key, value)

        def __iter__(cls):
            return (cls._member_map_[key] for key in cls._member_names_)

        def __len__(cls):
            return len(cls._member_names_)

        def __contains__(cls, member):
            if not isinstance(member, cls):
                raise TypeError(
                    f"unsupported operand type(s) for 'in': '{type(member).__qualname__}' and "
                    f"'{type(cls).__qualname__}'"
                )
            return member._name_ in cls._member_map_

        def __getitem__(cls, key):
            return cls._member_map_[key]

        @property
        def __members__(cls):
            return dict(cls._member_map_)

        def __bool__(cls):
            return True

    class Enum(metaclass=_EnumMeta):
        """A plain enum: members compare by identity and print as `Cls.NAME`."""

        _name_ = None
        _value_ = None

        @property
        def name(self):
            return self._name_

        @property
        def value(self):
            return self._value_

        def __repr__(self):
            return f"<{type(self).__name__}.{self._name_}: {self._value_!r}>"

        def __str__(self):
            return f"{type(self).__name__}.{self._name_}"

        def __format__(self, spec):
            return format(str(self), spec)

        def __hash__(self):
            return hash(self._name_)

        def __reduce_ex__(self, protocol):
            return type(self), (self._value_,)

        def __copy__(self):
            return self

        def __deepcopy__(self, memo):
            return self

    class IntEnum(int, Enum):
        """Members are ints (compare, hash and format as their value; `repr` names them)."""

        __repr__ = Enum.__repr__
        __str__ = int.__repr__
        __format__ = int.__format__
        __hash__ = int.__hash__

    class StrEnum(str, Enum):
        """Members are strs (compare, hash, print and format as their value)."""

        __repr__ = Enum.__repr__
        __str__ = str.__str__
        __format__ = str.__format__
        __hash__ = str.__hash__

    class IntFlag(int, Enum):
        """Bit flags: any int is a value (unknown bits kept), `in` tests bits, `~` stays within
        the bits up to the highest defined flag (Python 3.11's IntFlag with boundary KEEP)."""

        _flag_mask_ = 0
        _all_bits_ = 0
        __str__ = int.__repr__
        __format__ = int.__format__
        __hash__ = int.__hash__

        @classmethod
        def _pseudo(cls, value):
            member = int.__new__(cls, value)
            names = [m._name_ for m in cls if m._value_ & value == m._value_ and m._value_]
            rest = value & ~cls._flag_mask_
            member._name_ = "|".join([*names, *([str(rest)] if rest else [])]) if names else None
            member._value_ = value
            return member

        def __repr__(self):
            if self._name_ is None:
                return f"<{type(self).__name__}: {self._value_}>"
            return f"<{type(self).__name__}.{self._name_}: {self._value_}>"

        def __contains__(self, other):
            if not isinstance(other, type(self)):
                raise TypeError(
                    f"unsupported operand type(s) for 'in': '{type(other).__qualname__}' and "
                    f"'{type(self).__qualname__}'"
                )
            return other._value_ & self._value_ == other._value_

        def __iter__(self):
            return (m for m in type(self) if m._value_ and m._value_ & self._value_ == m._value_)

        def __or__(self, other):
            if not isinstance(other, int):
                return NotImplemented
            return type(self)(self._value_ | int(other))

        def __and__(self, other):
            if not isinstance(other, int):
                return NotImplemented
            return type(self)(self._value_ & int(other))

        def __xor__(self, other):
            if not isinstance(other, int):
                return NotImplemented
            return type(self)(self._value_ ^ int(other))

        __ror__ = __or__
        __rand__ = __and__
        __rxor__ = __xor__

        def __invert__(self):
            cls = type(self)
            return cls(cls._all_bits_ ^ self._value_ if self._value_ >= 0 else ~self._value_)
