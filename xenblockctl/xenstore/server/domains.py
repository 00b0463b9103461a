"""Simulated domains: which are introduced, SET_TARGET links, and the `@` watch permissions.

There is no hypervisor: INTRODUCE records a domid as introduced (every domid "exists", as with
the LD_PRELOAD-stubbed C daemon), RELEASE forgets it. dom0 is introduced from the start. The
permission lists of `@introduceDomain` / `@releaseDomain` decide which connections receive
those events (default `n0`: dom0 only), as `set_perms_special` / `check_perms_special` do.
"""

from __future__ import annotations

from xenblockctl.xenstore.server.permissions import NONE, Perm, Perms

#: Domids from here on are reserved (DOMID_SELF, DOMID_IO, ...), never a real domain.
DOMID_FIRST_RESERVED = 0x7FF0
#: `DOMID_SELF`: IS_DOMAIN_INTRODUCED answers T for it.
DOMID_SELF = 0x7FF0
SPECIAL_PATHS = ("@introduceDomain", "@releaseDomain")


class Domains:
    def __init__(self) -> None:
        self.introduced: set[int] = {0}
        #: domid -> the domid it may act for (device-model stub domains).
        self.targets: dict[int, int] = {}
        self.special_perms: dict[str, Perms] = {name: (Perm(NONE, 0),) for name in SPECIAL_PATHS}

    def is_introduced(self, domid: int) -> bool:
        return domid == DOMID_SELF or domid in self.introduced

    def forget(self, domid: int) -> None:
        """A released domain vanishes from SET_TARGET links and the special permissions."""
        self.introduced.discard(domid)
        self.targets.pop(domid, None)
        for name, perms in self.special_perms.items():
            owner = perms[0] if perms[0].domid != domid else Perm(perms[0].bits, 0)
            self.special_perms[name] = (owner, *(p for p in perms[1:] if p.domid != domid))
