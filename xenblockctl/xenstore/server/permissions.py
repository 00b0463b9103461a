"""Node permissions: the `[wrbn]<domid>` list, its parsing, and who may do what.

The first entry names the owner and is also the default for every domain not listed further on;
the owner and privileged domains (dom0) always get read, write and ownership (`perm_for_conn` in
the C daemon). Later entries name per-domain rights; a domain that is the *target* of the caller
(SET_TARGET, device-model stub domains) is treated like the caller.
"""

from __future__ import annotations

from typing import NamedTuple

NONE = 0
READ = 1
WRITE = 2
OWNER = 8

_LETTER_BITS = {"r": READ, "w": WRITE, "b": READ | WRITE, "n": NONE}
_BITS_LETTER = {bits: letter for letter, bits in _LETTER_BITS.items()}


class Perm(NamedTuple):
    bits: int
    domid: int

    def __str__(self) -> str:
        # `%i` of a C int: domids that came in as e.g. -1 print back as -1.
        signed = self.domid - (1 << 32) if self.domid >= 1 << 31 else self.domid
        return f"{_BITS_LETTER[self.bits]}{signed}"


Perms = tuple[Perm, ...]


def _strtol0(text: str) -> int | None:
    """C `strtol(p, &end, 0)` requiring the whole string to be consumed (else None)."""
    s = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    base = 10
    if s[:2].lower() == "0x" and len(s) > 2:
        base, s = 16, s[2:]
    elif s[:1] == "0" and len(s) > 1:
        base, s = 8, s[1:]
    if not s:
        return None
    try:
        value = int(s, base)
    except ValueError:
        return None
    if not all(ch.isalnum() for ch in s):
        return None
    return (sign * value) & 0xFFFFFFFF


def parse_perm(text: str) -> Perm:
    """One entry as `xs_strings_to_perms` accepts it; ValueError otherwise."""
    bits = _LETTER_BITS.get(text[:1])
    if bits is None or len(text) < 2:
        raise ValueError(f"bad permission {text!r}")
    domid = _strtol0(text[1:])
    if domid is None:
        raise ValueError(f"bad permission {text!r}")
    return Perm(bits, domid)


def format_perms(perms: Perms) -> bytes:
    """GET_PERMS reply payload: every entry NUL-terminated."""
    return b"".join(str(p).encode() + b"\0" for p in perms)


def perm_for(domid: int, privileged: bool, target: int | None, perms: Perms) -> int:
    """The rights (READ/WRITE/OWNER bits) a connection acting as `domid` has on a node."""
    full = READ | WRITE | OWNER
    owner = perms[0].domid
    if privileged or owner == domid or (target is not None and owner == target):
        return full
    for perm in perms[1:]:
        if perm.domid == domid or (target is not None and perm.domid == target):
            return perm.bits
    return perms[0].bits
