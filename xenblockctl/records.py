"""`NamedTuple` for modules on the hotplug path: the same class syntax, built without `exec`.

    from xenblockctl.records import NamedTuple

    class Target(NamedTuple):
        path: str
        read_only: bool = False

Type checkers see `typing.NamedTuple` itself. At run time the class is built here: a tuple
subclass with `__slots__ = ()`, a property per field, `_fields`, `_field_defaults`, `_make`,
`_replace`, `_asdict`, `__match_args__`, `__getnewargs__` and namedtuple's `repr`. Why: the block
script runs on every VM start, and `typing` (which imports `re`, `collections`, `functools`,
`contextlib`, `warnings`) plus one `collections.namedtuple` per class (source text built and
`exec`'d, ~0.2-0.4 ms each) were about a third of its start-up (bench/README.md, issue 18). Here a
class costs one `type()` call, and this module imports only the C `_operator`.

Only the class syntax is supported (no functional form, no generic records); a record's subclass
is an ordinary subclass (no new fields), as with typing.NamedTuple."""

from __future__ import annotations

from _operator import itemgetter

__all__ = ["NamedTuple"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple
else:

    def _new(cls, *args, **kwargs):
        n = len(cls._fields)
        if len(args) == n and not kwargs:
            return tuple.__new__(cls, args)
        if len(args) > n:
            raise TypeError(f"{cls.__name__}() takes {n} positional arguments but {len(args)} were given")
        values = list(args)
        for name in cls._fields[len(args) :]:
            if name in kwargs:
                values.append(kwargs.pop(name))
            elif name in cls._field_defaults:
                values.append(cls._field_defaults[name])
            else:
                raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
        if kwargs:
            name = next(iter(kwargs))
            if name in cls._fields:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
        return tuple.__new__(cls, values)

    @classmethod
    def _make(cls, iterable):
        result = tuple.__new__(cls, iterable)
        if len(result) != len(cls._fields):
            raise TypeError(f"Expected {len(cls._fields)} arguments, got {len(result)}")
        return result

    def _replace(self, **kwargs):
        result = self._make([kwargs.pop(name, value) for name, value in zip(self._fields, self, strict=True)])
        if kwargs:
            raise ValueError(f"Got unexpected field names: {list(kwargs)!r}")
        return result

    def _asdict(self):
        return dict(zip(self._fields, self, strict=True))

    def _repr(self):
        inner = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self, strict=True))
        return f"{type(self).__name__}({inner})"

    def _getnewargs(self):
        return tuple(self)

    # A field's accessor depends only on its index (a property holds no reference to its class), so
    # every record shares one per index: a class build then makes no property, itemgetter or doc
    # string per field (bench/README.md, issue 18 round 5).
    _FIELDS = []

    def _field(index):
        while len(_FIELDS) <= index:
            _FIELDS.append(property(itemgetter(len(_FIELDS)), doc=f"Alias for field number {len(_FIELDS)}"))
        return _FIELDS[index]

    #: What every record's class gets unless its body defines the name (methods it may override).
    _DEFAULTS = {
        "__new__": _new,
        "_make": _make,
        "_replace": _replace,
        "_asdict": _asdict,
        "__repr__": _repr,
    }

    class _RecordMeta(type):
        def __new__(mcls, name, bases, namespace):
            if not bases:  # NamedTuple itself: only a marker to derive from
                return super().__new__(mcls, name, bases, namespace)
            if bases != (NamedTuple,):
                raise TypeError("a record derives from NamedTuple alone")
            fields = tuple(namespace.get("__annotations__", ()))
            defaults = {}
            for name_ in fields:
                if name_[:1] == "_":
                    raise ValueError(f"field names cannot start with an underscore: {name_!r}")
                if name_ in namespace:
                    defaults[name_] = namespace[name_]
                elif defaults:
                    raise TypeError(f"non-default field {name_!r} follows a default field")
            # one dict built in one step: the defaults, then the class body over them, then what the
            # record itself defines (bench/README.md, issue 18, start18)
            body = {**_DEFAULTS, "__doc__": None, **namespace}
            if body["__doc__"] is None:
                body["__doc__"] = f"{name}({', '.join(fields)})"
            if len(_FIELDS) < len(fields):  # _field makes every missing accessor up to the last
                _field(len(fields) - 1)
            for index, name_ in enumerate(fields):
                body[name_] = _FIELDS[index]
            body["__slots__"] = ()
            body["_fields"] = body["__match_args__"] = fields
            body["_field_defaults"] = defaults
            body["__getnewargs__"] = _getnewargs
            return type(name, (tuple,), body)

    class NamedTuple(metaclass=_RecordMeta):
        """Derive a record from this (class syntax only); see the module docstring."""
