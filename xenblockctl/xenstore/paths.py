"""xenstore node names and values as the daemon defines them, checked before sending.

Checking locally gives a typed error naming the offending path instead of a bare EINVAL from the
daemon, and it keeps bytes we would not want on the wire (newlines, NULs inside a value) out of
the store. The rules are C xenstored's (`tools/xenstored/core.c` valid_chars / is_valid_nodename,
`docs/misc/xenstore.txt`): characters `[A-Za-z0-9-/_@]`, no `//`, no trailing `/` except `/`
itself, 3072 bytes absolute and 2048 relative; paths starting with `@` are watch-only specials.

On the block script's start-up path, so no regular expressions (a compile costs ~0.3-0.6 ms at
import): character sets do the same. A node's permissions are perms.py's.
"""

from __future__ import annotations

from xenblockctl.xenstore.errors import XenstoreInvalid, XenstoreTooBig
from xenblockctl.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from collections.abc import Sequence

_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_@")
#: `[A-Za-z0-9\-/_@]`: what a node path may contain.
_NODE_CHARS = _NAME_CHARS | {"/"}


def check_path(path: str) -> str:
    """Return `path` if xenstored would accept it as a node path (absolute or relative)."""
    if not isinstance(path, str):
        raise XenstoreInvalid(f"path must be str, not {type(path).__name__}")
    if not path:
        raise XenstoreInvalid("empty path")
    if not _NODE_CHARS.issuperset(path):
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


#: What a batch of paths joined by NUL may hold when every one of them is valid (check_paths).
_BATCH_CHARS = _NODE_CHARS | {"\0"}


def check_paths(paths: Sequence[str]) -> None:
    """check_path of every path, with one pass over them all when all are valid (a 128-backend
    walk checks ~260 paths, bench/README.md issue 18 round 8); on any doubt each path is checked
    alone, so an invalid one raises exactly what check_path raises for it."""
    try:
        # Every path between NULs: an empty one shows as "\0\0", a trailing '/' as "/\0", a
        # leading '@' as "\0@".
        joined = "\0" + "\0".join(paths) + "\0"
    except TypeError:
        joined = ""  # a non-str: check_path names it
    if not (
        _BATCH_CHARS.issuperset(joined)
        and joined.count("\0") == len(paths) + 1  # no NUL inside a path
        and "\0\0" not in joined
        and "//" not in joined
        and "/\0" not in joined  # (also "/" itself, which check_path decides)
        and "\0@" not in joined
        and max(map(len, paths), default=0) <= REL_PATH_MAX  # the smaller of the two limits
    ):
        for path in paths:
            check_path(path)


def check_watch_path(path: str) -> str:
    """A watch path is a node path or a special like `@introduceDomain` / `@releaseDomain`."""
    if isinstance(path, str) and path.startswith("@"):
        # `@[A-Za-z0-9\-_]+`
        if len(path) < 2 or "@" in path[1:] or not _NAME_CHARS.issuperset(path[1:]):
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
