"""`xenblockctl show DOMAIN VDEV`: one vbd in full."""

from __future__ import annotations

import click

from xenblockctl.cli.complete import complete_domain, complete_vdev
from xenblockctl.cli.output import connect, emit_json, fields
from xenblockctl.environment import Environment


@click.command()
@click.argument("domain", shell_complete=complete_domain)
@click.argument("vdev", shell_complete=complete_vdev)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show(domain: str, vdev: str, as_json: bool) -> None:
    """Show one vbd: both states, target, device, major:minor, diskseq vs luid, holder, hotplug status."""
    from xenblockctl.toolstack import domains, inventory, lifecycle, vbd_dirs
    from xenblockctl.xenstore.vdev import Vdev

    number = Vdev.parse(vdev).number
    with connect() as store:
        domid = domains.lookup(store, domain)
        loc = vbd_dirs.locate(store, domid, number, home_domid=store.own_domid())
        if loc is None:
            raise lifecycle.VbdMissing(f"domain {domid} has no vbd {vdev} ({number})")
        record = inventory.inspect(store, loc, env=Environment.of_process()).to_json()
    if as_json:
        emit_json("show", {"vbd": record})
        return
    fields(record)
