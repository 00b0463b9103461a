"""Shell completion of the values only xenstore knows: domain names and ids, and a domain's vdevs.

Each TAB is a process start, so these load only the xenstore client, connect with a short
deadline and give up quietly (no candidates, never an error message in the middle of the
command line) when xenstored cannot be reached. File names (attach TARGET, identify PATH) are
click.Path arguments: the shell completes those itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from click.shell_completion import CompletionItem

if TYPE_CHECKING:
    from xenblockctl.xenstore.client import XenStore

#: seconds a TAB may wait for xenstored
TIMEOUT = 0.5


def _store() -> XenStore | None:
    from xenblockctl.errors import XenblockError
    from xenblockctl.xenstore.client import XenStore

    try:
        return XenStore.connect(timeout=TIMEOUT)
    except XenblockError:
        return None


def complete_domain(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Live domains, by name (what xl users type) and by id."""
    from xenblockctl.errors import XenblockError
    from xenblockctl.toolstack import domains

    store = _store()
    if store is None:
        return []
    try:
        with store:
            named = domains.names(store)
            ids = domains.live_domids(store)
    except XenblockError:
        return []
    items = [CompletionItem(name, help=f"domain {domid}") for domid, name in named.items()]
    items += [CompletionItem(str(domid), help=named.get(domid)) for domid in sorted(ids)]
    return [item for item in items if item.value.startswith(incomplete)]


def complete_vdev(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The vdevs the domain given before has: its frontends and our backends for it."""
    from xenblockctl.errors import XenblockError
    from xenblockctl.toolstack import domains
    from xenblockctl.xenstore.errors import XenstoreNoEntry
    from xenblockctl.xenstore.numbers import uint_or_none
    from xenblockctl.xenstore.vdev import Vdev, VdevError

    domain = ctx.params.get("domain")
    if not isinstance(domain, str):
        return []
    store = _store()
    if store is None:
        return []
    devids: set[int] = set()
    try:
        with store:
            domid = domains.lookup(store, domain)
            home = store.get_domain_path(store.own_domid())
            for parent in (
                f"{domains.domain_path(domid)}/device/vbd",
                f"{home}/backend/vbd/{domid}",
                f"{home}/backend/vbd3/{domid}",
            ):
                try:
                    names = store.ls(parent)
                except XenstoreNoEntry:
                    continue
                devids.update(d for n in names if (d := uint_or_none(n, maximum=(2 << 28) - 1)) is not None)
    except XenblockError:
        return []
    items = []
    for devid in sorted(devids):
        try:
            name = Vdev.from_number(devid).name
        except VdevError:
            continue
        items.append(CompletionItem(name, help=str(devid)))
    return [item for item in items if item.value.startswith(incomplete)]
