"""xenstore: the client every layer uses, the vbd layout, and (in server/) the embedded daemon.

Modules, one concept each:

    client      XenStore / Transaction / WatchEvent: str API, deadlines, typed errors
    link        what the client needs from a connection; two implementations:
    transport   the threaded link: pyxs's reader thread, guarded so it cannot hang us (engine, CLI)
    synchronous the synchronous link: one socket (4 for a large read batch), no thread (block script)
    endpoints   where xenstored lives (libxenstore's order) and the bounded connect
    wire        the wire codec: framing, limits, type numbers, error names (client, server, tests)
    paths       node-name, value and permission rules, checked before anything is sent
    errors      XenstoreError and its errno-specific subclasses
    vbd         backend/frontend paths of a vbd, XenbusState, walking every backend
    identity    the published identity (physical-device, luid, diskseq, owner record), liveness
    vdev        virtual device names <-> numbers (xen-vbd-interface(7))
    server/     the embedded xenstored (stdlib only)

This package file imports nothing: `python -m xenblockctl xenstored` must not pay for pyxs, and
the block script imports exactly the modules it uses (no pyxs, socket or threading at all).
"""
