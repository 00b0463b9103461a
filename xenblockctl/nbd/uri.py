"""NBD URIs (NetworkBlockDevice/nbd `doc/uri.md`): the target syntax of an NBD export.

Accepted: `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default) and
`nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH`. The export name is the path without its leading `/`,
percent-decoded (`nbd://h//disk` names `/disk`; `nbd://h` and `nbd://h/` the default export "").

Refused with a reason, never guessed:
- `nbds`, `nbds+unix` and any `tls-*` parameter: we speak NBD without TLS, and uri.md says a
  client without TLS must fail on them rather than connect in clear;
- userinfo (it exists only for TLS authentication), a fragment, a missing host, a port outside
  1..65535, an unknown or repeated query parameter (uri.md: "SHOULD be diagnosed");
- a relative socket path (it would name a different socket from libxl's cwd than from the
  admin's shell) and an abstract socket (no file, so no dev/inode to publish as its identity);
- anything that is not printable ASCII: the URI travels through xenstore and `hotplug-error`.

The URI is admin input (a libxl disk spec's target, a CLI argument), parsed once here; what the
rest of the program sees is an `NbdUri`, and `canonical()` is the one spelling we publish.
"""

from __future__ import annotations

from xenblockctl.nbd import proto
from xenblockctl.nbd.errors import NbdError

SCHEMES = ("nbd", "nbd+unix")
TLS_SCHEMES = ("nbds", "nbds+unix")
#: longest URI accepted: an export name of MAX_STRING bytes, percent-encoded, plus a socket path
MAX_URI = 3 * proto.MAX_STRING + 4096 + 64

_HEX = "0123456789abcdefABCDEF"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_DIGITS = frozenset("0123456789")
#: path/query characters RFC 3986 allows unescaped (pchar + "/" + "?"), besides unreserved
_ALLOWED_RAW = _UNRESERVED | frozenset("!$&'()*+,;=:@/?%")


def _invalid(uri: str, why: str) -> NbdError:
    return NbdError(f"{uri[:200]!r} is not an NBD URI: {why}", code="nbd-uri-invalid")


def _unsupported(uri: str, why: str) -> NbdError:
    return NbdError(f"{uri[:200]!r}: {why}", code="nbd-uri-unsupported")


def _decode(uri: str, text: str, what: str) -> str:
    """Percent-decode `text` strictly: every `%` starts two hex digits, the bytes are UTF-8."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise _invalid(uri, f"bad percent-escape in the {what}")
            out.append(int(pair, 16))
            i += 3
            continue
        if ch not in _ALLOWED_RAW:
            raise _invalid(uri, f"character {ch!r} must be percent-encoded in the {what}")
        out.append(ord(ch))
        i += 1
    try:
        decoded = out.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(uri, f"the {what} is not UTF-8 once decoded") from None
    return decoded


def _encode(text: str, safe: str = "") -> str:
    return "".join(
        ch if ch in _UNRESERVED or ch in safe else "".join(f"%{b:02X}" for b in ch.encode()) for ch in text
    )


class NbdUri:
    """One parsed NBD URI: where the server is, and which export."""

    __slots__ = ("export", "host", "port", "socket_path")

    def __init__(self, export: str, *, host: str = "", port: int = 0, socket_path: str = "") -> None:
        self.export = export
        self.host = host
        self.port = port
        self.socket_path = socket_path

    @property
    def is_unix(self) -> bool:
        return bool(self.socket_path)

    def canonical(self) -> str:
        """The one spelling of this URI (lowercase scheme, explicit port, minimal escaping): what
        is published, compared and shown."""
        export = _encode(self.export, safe="/")
        if self.is_unix:
            return f"nbd+unix:///{export}?socket={_encode(self.socket_path, safe='/')}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"

    def __repr__(self) -> str:
        return f"NbdUri({self.canonical()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NbdUri) and self.canonical() == other.canonical()

    def __hash__(self) -> int:
        return hash(self.canonical())


def looks_like_nbd(target: str) -> bool:
    """Whether `target` claims to be an NBD URI (so it must parse as one, never as a path)."""
    scheme, sep, _rest = target.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES + TLS_SCHEMES


def parse(uri: str) -> NbdUri:
    """The NbdUri `uri` names; NbdError (`nbd-uri-invalid` / `nbd-uri-unsupported`) otherwise."""
    if len(uri) > MAX_URI:
        raise _invalid(uri, f"longer than {MAX_URI} characters")
    if not uri.isascii() or not uri.isprintable() or " " in uri:
        raise _invalid(uri, "only printable ASCII without spaces (percent-encode the rest)")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise _invalid(uri, "no scheme (expected nbd:// or nbd+unix://)")
    if scheme in TLS_SCHEMES:
        raise _unsupported(uri, f"{scheme}:// requires TLS, which xenblockctl does not speak")
    if scheme not in SCHEMES:
        if scheme.startswith("nbd"):
            raise _unsupported(uri, f"scheme {scheme}:// is not supported (nbd:// and nbd+unix:// are)")
        raise _invalid(uri, f"scheme {scheme!r} is not nbd or nbd+unix")
    if "#" in rest:
        raise _invalid(uri, "a fragment (#...) has no meaning in an NBD URI")
    rest, _q, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    export = _decode(uri, path, "export name") if slash else ""
    if "\0" in export:
        raise _invalid(uri, "the export name contains NUL")
    if len(export.encode()) > proto.MAX_STRING:
        raise _invalid(uri, f"the export name is longer than {proto.MAX_STRING} bytes")
    params = _query(uri, query)
    for key in params:
        if key.startswith("tls-"):
            raise _unsupported(uri, f"query parameter {key!r}: xenblockctl does not speak TLS")
        if key != "socket" or scheme != "nbd+unix":
            raise _invalid(uri, f"unknown query parameter {key!r}")
    if scheme == "nbd+unix":
        if authority:
            raise _invalid(uri, "nbd+unix:// takes no host (write nbd+unix:///EXPORT?socket=PATH)")
        if "socket" not in params:
            raise _invalid(uri, "nbd+unix:// needs ?socket=PATH")
        return NbdUri(export, socket_path=_socket_path(uri, params["socket"]))
    host, port = _authority(uri, authority)
    return NbdUri(export, host=host, port=port)


def _query(uri: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if not query:
        return params
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        key = _decode(uri, key, "query")
        if not eq or not key:
            raise _invalid(uri, f"query item {item[:40]!r} is not KEY=VALUE")
        if key in params:
            raise _invalid(uri, f"query parameter {key!r} given twice")
        params[key] = _decode(uri, value, "query")
    return params


def _socket_path(uri: str, path: str) -> str:
    if path.startswith("\0"):
        raise _unsupported(uri, "abstract sockets have no file whose identity could be published")
    if "\0" in path:
        raise _invalid(uri, "the socket path contains NUL")
    if not path.startswith("/"):
        raise _invalid(uri, "the socket path must be absolute")
    if len(path.encode()) > 107:  # sun_path is 108 bytes with its NUL
        raise _invalid(uri, "the socket path is longer than a unix socket address allows (107 bytes)")
    return path


def _authority(uri: str, authority: str) -> tuple[str, int]:
    if "@" in authority:
        raise _unsupported(uri, "userinfo (user@) exists for TLS authentication, which we do not speak")
    if authority.startswith("["):
        host, bracket, after = authority[1:].partition("]")
        if not bracket or not host or not set(host) <= _IPV6_CHARS or ":" not in host:
            raise _invalid(uri, "a bracketed host must be an IPv6 address")
        if after and not after.startswith(":"):
            raise _invalid(uri, f"unexpected {after[:20]!r} after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text_ = authority.partition(":")
        port_text = port_text_ if colon else None
        if not host:
            raise _invalid(uri, "nbd:// needs a host (for a local server write it, e.g. 127.0.0.1)")
        if not set(host) <= _HOST_CHARS or host.startswith("-") or ".." in host:
            raise _invalid(uri, f"host {host[:64]!r} is not a host name or IPv4 address")
    host = host.lower()
    if port_text is None:
        return host, proto.DEFAULT_PORT
    if not port_text or not set(port_text) <= _DIGITS or len(port_text) > 5:
        raise _invalid(uri, f"port {port_text[:10]!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _invalid(uri, f"port {port} is outside 1..65535")
    return host, port
