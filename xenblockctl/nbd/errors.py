"""The NBD layer's coded errors: the same XenblockError every layer raises, with NBD's codes."""

from __future__ import annotations

from xenblockctl.errors import XenblockError


class NbdError(XenblockError):
    """A URI that names no export we can reach, or a server that did not give us one.

    Codes: `nbd-uri-invalid` (not an NBD URI by doc/uri.md), `nbd-uri-unsupported` (a valid URI
    asking for what we do not do: TLS, vsock, abstract sockets), `nbd-unreachable` (no connection
    within the deadline), `nbd-handshake` (the peer broke the protocol or is no NBD server),
    `nbd-export-refused` (the server answered NBD_OPT_GO with an error), `nbd-export-empty`
    (size 0), `nbd-io` (a transmission-phase failure or an error reply)."""

    code = "nbd-handshake"
