"""`xenblockctl show DOMAIN VDEV`: one vbd in full."""

from __future__ import annotations

import click

from xenblockctl.cli.output import connect, emit_json
from xenblockctl.environment import Environment
from xenblockctl.xenstore.numbers import uint_or_none


@click.command()
@click.argument("domain")
@click.argument("vdev")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show(domain: str, vdev: str, as_json: bool) -> None:
    """Show one vbd: both states, target, device, major:minor, diskseq vs luid, holder, hotplug status."""
    from xenblockctl.toolstack import domains, inventory, lifecycle, vbd_dirs
    from xenblockctl.xenstore.vdev import Vdev

    number = Vdev.parse(vdev).number
    with connect() as store:
        domid = uint_or_none(domain, maximum=0xFFFF)
        if domid is None:
            domid = domains.resolve(store, domain)
        loc = vbd_dirs.locate(store, domid, number, home_domid=store.own_domid())
        if loc is None:
            raise lifecycle.VbdMissing(f"domain {domid} has no vbd {vdev} ({number})")
        record = inventory.inspect(store, loc, env=Environment.of_process()).to_json()
    if as_json:
        emit_json("show", {"vbd": record})
        return
    width = max(len(k) for k in record)
    for key, value in record.items():
        shown = " ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        click.echo(f"{key:<{width}}  {'-' if shown is None else shown}")
