"""The one parser for numbers read from xenstore nodes: strict, ASCII-only, bounded.

Most numbers we read were written by someone we do not trust (a guest's frontend nodes), and
Python's own parsers are too lenient for that: `str.isdigit()` accepts '²' and '٣', `int()` reads
'٣' as 3, accepts ' 7', '+7' and '1_0', and raises ValueError on '²' — an exception no caller
expected, which once took the whole engine (every guest's disk) down. The grammar here is what
Xen's own writers produce (`%u`): `0|[1-9][0-9]*`, ASCII digits only, length-checked before
`int()` sees it. Every number parsed from a node goes through `parse_uint` or `uint_or_none`, so
the rule lives in one place (tests/lint/test_static.py keeps `.isdigit()` out of the rest of
the package).
"""

from __future__ import annotations

from xenblockctl.errors import XenblockError


class NodeValueError(XenblockError):
    """A node holds something other than a bounded decimal number."""

    code = "bad-node-value"


def is_decimal(text: str) -> bool:
    """`0|[1-9][0-9]*` (any length: bound it before `int()`, or use uint_or_none)."""
    # isascii() first: on ASCII text isdigit() is exactly [0-9]
    return text.isascii() and text.isdigit() and (text == "0" or text[0] != "0")


#: Lowercase hex digits: what the kernel's and our own writers produce (`%x`).
HEX_DIGITS = frozenset("0123456789abcdef")
_ANY_CASE_HEX = HEX_DIGITS | frozenset("ABCDEF")


def is_hex(text: str, *, most: int, zero: bool = True, lowercase: bool = True) -> bool:
    """Canonical hex of 1..`most` digits: no leading zero (`0` itself only if `zero`), `[0-9a-f]`
    (`[0-9a-fA-F]` unless `lowercase`). Character sets, not `re`: this runs on the block script's
    start-up path, where importing `re` and compiling costs more than everything it checks."""
    return (
        0 < len(text) <= most
        and (HEX_DIGITS if lowercase else _ANY_CASE_HEX).issuperset(text)
        and (text[0] != "0" or (zero and len(text) == 1))
    )


def uint_or_none(text: str | None, *, maximum: int) -> int | None:
    """`text` as an int in 0..maximum, or None if it is absent or not exactly such a number."""
    if text is None or len(text) > len(str(maximum)) or not is_decimal(text):
        return None
    value = int(text)
    return value if value <= maximum else None


def parse_uint(text: str | None, what: str, *, maximum: int) -> int:
    """`text` as an int in 0..maximum; NodeValueError (saying what and why) otherwise."""
    value = uint_or_none(text, maximum=maximum)
    if value is None:
        shown = "missing" if text is None else ascii(text[:24])
        raise NodeValueError(f"{what} {shown} is not a decimal number 0..{maximum}")
    return value
