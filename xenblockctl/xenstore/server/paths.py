"""Node paths: resolving relative names, validity, and parent/child relations.

Rules of the Xen 4.17 C daemon (`canonicalize`, `is_valid_nodename`, `valid_chars`, `is_child`):
a relative name is prefixed with the connection's home `/local/domain/<domid>`; a valid node name
starts with `/`, has no `//`, no trailing `/` (except `/` itself), uses only `[A-Za-z0-9-/_@]`, and
is at most 2048 bytes below `/local/domain/<id>/` (or in total elsewhere). `@` names are only
meaningful for watches (`@introduceDomain`, `@releaseDomain`).

Paths travel as bytes on the wire; they are decoded as latin-1 (a bijection) so that invalid
bytes survive to the validity check instead of failing a decode.
"""

from __future__ import annotations

import re

from xenblockctl.xenstore.server.wire import REL_PATH_MAX

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*")
_LOCAL = re.compile(r"/local/domain/([0-9]{1,5})/")


def home(domid: int) -> str:
    return f"/local/domain/{domid}"


def canonicalize(name: str, domid: int) -> str:
    """Absolute name for `name` as sent by a connection of `domid` (`@` names stay as they are)."""
    if name.startswith(("/", "@")):
        return name
    return f"{home(domid)}/{name}"


def is_valid(path: str, path_max: int = REL_PATH_MAX) -> bool:
    if not path.startswith("/"):
        return False
    if path.endswith("/") and path != "/":
        return False
    if "//" in path:
        return False
    m = _LOCAL.match(path)
    local_off = m.end() if m else 0
    if len(path) > local_off + path_max:
        return False
    return _VALID.fullmatch(path) is not None


def parent(path: str) -> str:
    """`get_parent`: the parent of `/` is `/`."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def child(path: str, name: str) -> str:
    return f"/{name}" if path == "/" else f"{path}/{name}"


def is_child(path: str, ancestor: str) -> bool:
    """True when `path` equals `ancestor` or lies below it, by whole components."""
    if ancestor == "/":
        return True
    if not path.startswith(ancestor):
        return False
    return len(path) == len(ancestor) or path[len(ancestor)] == "/"
