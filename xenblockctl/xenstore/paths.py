"""xenstore node names, values and permissions as the daemon defines them, checked before sending.

Checking locally gives a typed error naming the offending path instead of a bare EINVAL from the
daemon, and it keeps bytes we would not want on the wire (newlines, NULs inside a value) out of
the store. The rules are C xenstored's (`tools/xenstored/core.c` valid_chars / is_valid_nodename,
`docs/misc/xenstore.txt`): characters `[A-Za-z0-9-/_@]`, no `//`, no trailing `/` except `/`
itself, 3072 bytes absolute and 2048 relative; paths starting with `@` are watch-only specials.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from xenblockctl.xenstore.errors import XenstoreInvalid, XenstoreTooBig
from xenblockctl.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX

_NODE_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+")
_SPECIAL_WATCH = re.compile(r"@[A-Za-z0-9\-_]+")
_PERM = re.compile(r"([nrwb])([0-9]+)")
#: domids are u16 on the wire of every Xen interface (domid_t).
DOMID_MAX = 0xFFFF


def check_path(path: str) -> str:
    """Return `path` if xenstored would accept it as a node path (absolute or relative)."""
    if not isinstance(path, str):
        raise XenstoreInvalid(f"path must be str, not {type(path).__name__}")
    if not path:
        raise XenstoreInvalid("empty path")
    if not _NODE_CHARS.fullmatch(path):
        raise XenstoreInvalid(f"path {path[:80]!r} has characters outside [A-Za-z0-9-/_@]")
    if path.startswith("@"):
        raise XenstoreInvalid(f"path {path[:80]!r}: names starting with '@' are watch-only specials")
    if "//" in path:
        raise XenstoreInvalid(f"path {path[:80]!r} contains '//'")
    if path != "/" and path.endswith("/"):
        raise XenstoreInvalid(f"path {path[:80]!r} ends with '/'")
    limit = ABS_PATH_MAX if path.startswith("/") else REL_PATH_MAX
    if len(path) > limit:
        raise XenstoreTooBig(f"path of {len(path)} bytes exceeds {limit}")
    return path


def check_watch_path(path: str) -> str:
    """A watch path is a node path or a special like `@introduceDomain` / `@releaseDomain`."""
    if isinstance(path, str) and path.startswith("@"):
        if not _SPECIAL_WATCH.fullmatch(path):
            raise XenstoreInvalid(f"special watch path {path[:80]!r} is malformed")
        return path
    return check_path(path)


def check_token(token: str) -> str:
    """Tokens come back NUL-terminated in events, so they must not contain NUL; we also keep them
    printable ASCII so they survive every client (pyxs, the C CLIs) unchanged."""
    if not isinstance(token, str) or not token:
        raise XenstoreInvalid("watch token must be a non-empty str")
    if not all(33 <= ord(ch) < 127 for ch in token):
        raise XenstoreInvalid(f"watch token {token[:80]!r} must be printable ASCII without spaces")
    return token


def encode_value(value: str) -> bytes:
    """Encode a value for WRITE. xenstored stores any bytes, including none at all; we refuse NUL
    (the C CLIs and most readers stop at it) and encode as UTF-8, round-tripping undecodable bytes
    read earlier through `surrogateescape`."""
    if not isinstance(value, str):
        raise XenstoreInvalid(f"value must be str, not {type(value).__name__}")
    if "\0" in value:
        raise XenstoreInvalid("value contains a NUL character")
    return value.encode("utf-8", "surrogateescape")


def decode_value(raw: bytes) -> str:
    """Values written by other parties may be any bytes; never fail to read them."""
    return raw.decode("utf-8", "surrogateescape")


def join(parent: str, *names: str) -> str:
    """Join path components the way xenstore spells them (no doubled or trailing slashes)."""
    path = parent
    for name in names:
        if not name:
            continue
        path = name if path == "" else (f"/{name}" if path == "/" else f"{path}/{name}")
    return path


def is_absolute(path: str) -> bool:
    return path.startswith("/")


class Access(StrEnum):
    """Permission letters of xenstore's ACL entries (xenstore.txt "Permissions")."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"


class _PermFields(NamedTuple):
    access: Access
    domid: int


class Perm(_PermFields):
    """One ACL entry. The first entry of a node's list names its owner and the default for every
    domain not listed; the owner always has both read and write."""

    __slots__ = ()

    def __new__(cls, access: Access, domid: int) -> Perm:
        if not 0 <= domid <= DOMID_MAX:
            raise XenstoreInvalid(f"domid {domid} out of range 0..{DOMID_MAX}")
        return super().__new__(cls, access, domid)

    @classmethod
    def parse(cls, text: str) -> Perm:
        match = _PERM.fullmatch(text)
        if match is None:
            raise XenstoreInvalid(f"permission {text[:40]!r} is not [nrwb]<domid>")
        return cls(Access(match.group(1)), int(match.group(2)))

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
