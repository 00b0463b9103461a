"""Grant mapping and event channels behind one interface (`base.Transport`).

`local` works on any Linux (memfd "grant table" + eventfd pairs passed over a unix socket);
`xen` uses /dev/xen/gntdev and /dev/xen/evtchn in a real dom0.
"""

from xenblockctl.backend.transport.base import (
    EventChannel,
    GrantError,
    GrantMapping,
    PersistentGrants,
    Transport,
    TransportError,
)

__all__ = ["EventChannel", "GrantError", "GrantMapping", "PersistentGrants", "Transport", "TransportError"]
