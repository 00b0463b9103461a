"""Domains as xenstore knows them: `/local/domain/<domid>` exists while a domain is alive (the
toolstack introduces it at creation and removes it at destruction)."""

from __future__ import annotations

from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.errors import XenstoreNoEntry
from xenblockctl.xenstore.numbers import uint_or_none
from xenblockctl.xenstore.vbd import DOMID_FIRST_RESERVED

LOCAL_DOMAIN = "/local/domain"


class DomainMissing(XenblockError):
    code = "domain-missing"
    hint = "list running domains with `xl list` (or `xenstore-ls /local/domain`)"


def domain_path(domid: int) -> str:
    return f"{LOCAL_DOMAIN}/{domid}"


def exists(store: XenStore, domid: int) -> bool:
    return store.read_optional(domain_path(domid)) is not None


def live_domids(store: XenStore) -> set[int]:
    try:
        names = store.ls(LOCAL_DOMAIN)
    except XenstoreNoEntry:
        return set()
    return {d for n in names if (d := uint_or_none(n, maximum=0xFFFF)) is not None}


def resolve(store: XenStore, text: str) -> int:
    """A domain id (`5`) or name (`web`, from `/local/domain/*/name`) -> an existing domid."""
    domid = uint_or_none(text, maximum=0xFFFF)
    if domid is not None:
        if domid >= DOMID_FIRST_RESERVED:
            raise DomainMissing(f"domain id {domid} is reserved (>= {DOMID_FIRST_RESERVED:#x})")
        if not exists(store, domid):
            raise DomainMissing(f"no domain {domid} ({domain_path(domid)} does not exist)")
        return domid
    matches = [
        domid
        for domid in sorted(live_domids(store))
        if store.read_optional(f"{domain_path(domid)}/name") == text
    ]
    if not matches:
        raise DomainMissing(f"no domain named {text[:60]!r}")
    if len(matches) > 1:
        raise DomainMissing(f"several domains are named {text[:60]!r}: {matches}; use the domain id")
    return matches[0]


def lookup(store: XenStore, text: str) -> int:
    """A domain id as given, even of a domain that is gone (its leftovers are what detach, show
    and list must still reach), or a name resolved as `resolve` does."""
    domid = uint_or_none(text, maximum=0xFFFF)
    return resolve(store, text) if domid is None else domid


def names(store: XenStore) -> dict[int, str]:
    """Every live domain's name (`/local/domain/*/name`), for completion and listings."""
    found: dict[int, str] = {}
    for domid in sorted(live_domids(store)):
        name = store.read_optional(f"{domain_path(domid)}/name")
        if name is not None:
            found[domid] = name
    return found
