"""xenstore permissions: one ACL entry `(access, domid)` and its letters, as the daemon defines them.

xenstore.txt "Permissions": a node's list of entries `<letter><domid>`, the first naming its owner
and the default for every domain not listed. The client's get_perms and set_perms and the
toolstack's vbd directories use them; the block script never does, so they are not in paths.py,
which it imports at every start (Access and Perm were two classes and the StrEnum base built for
nothing at each VM start: ~0.07 ms; bench/README.md, issue 18, start18). The embedded daemon keeps
its own representation (server/permissions.py)."""

from __future__ import annotations

from xenblockctl.enums import StrEnum
from xenblockctl.xenstore.errors import XenstoreInvalid
from xenblockctl.xenstore.numbers import uint_or_none

#: domids are u16 on the wire of every Xen interface (domid_t).
DOMID_MAX = 0xFFFF


class Access(StrEnum):
    """Permission letters of xenstore's ACL entries (xenstore.txt "Permissions")."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"


class Perm(tuple[Access, int]):
    """One ACL entry `(access, domid)`. The first entry of a node's list names its owner and the
    default for every domain not listed; the owner always has both read and write. A tuple (it
    compares, hashes and unpacks as `(access, domid)`), built without typing.NamedTuple."""

    __slots__ = ()

    def __new__(cls, access: Access, domid: int) -> Perm:
        if not 0 <= domid <= DOMID_MAX:
            raise XenstoreInvalid(f"domid {domid} out of range 0..{DOMID_MAX}")
        return tuple.__new__(cls, (access, domid))

    @property
    def access(self) -> Access:
        return self[0]

    @property
    def domid(self) -> int:
        return self[1]

    def __repr__(self) -> str:
        return f"Perm(access={self[0]!r}, domid={self[1]!r})"

    @classmethod
    def parse(cls, text: str) -> Perm:
        # `%c%u` as every daemon writes it; numbers.py's grammar (no sign, blank or leading zero)
        domid = uint_or_none(text[1:], maximum=DOMID_MAX)
        if text[:1] not in ("n", "r", "w", "b") or domid is None:
            raise XenstoreInvalid(f"permission {text[:40]!r} is not [nrwb]<domid 0..{DOMID_MAX}>")
        return cls(Access(text[0]), domid)

    def __str__(self) -> str:
        return f"{self.access.value}{self.domid}"

    @property
    def can_read(self) -> bool:
        return self.access in (Access.READ, Access.BOTH)

    @property
    def can_write(self) -> bool:
        return self.access in (Access.WRITE, Access.BOTH)


def coerce_perm(perm: Perm | str) -> Perm:
    return perm if isinstance(perm, Perm) else Perm.parse(perm)
