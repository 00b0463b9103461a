"""`xenblockctl list`: every vbd this domain serves, with live identity checks."""

from __future__ import annotations

import click

from xenblockctl.cli.output import connect, emit_json, table
from xenblockctl.environment import Environment
from xenblockctl.xenstore.numbers import uint_or_none


@click.command(name="list")
@click.option("--domain", "domain", default=None, metavar="N", help="Only this domain's vbds (id or name).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_vbds(domain: str | None, as_json: bool) -> None:
    """List vbds: states, device, diskseq and whether the live device still matches the luid."""
    from xenblockctl.toolstack import domains, inventory

    with connect() as store:
        domid = None
        if domain is not None:
            domid = uint_or_none(domain, maximum=0xFFFF)
            if domid is None:
                domid = domains.resolve(store, domain)
        vbds = inventory.scan(store, home_domid=store.own_domid(), domid=domid, env=Environment.of_process())
    if as_json:
        emit_json("list", {"vbds": [v.to_json() for v in vbds]})
        return
    rows = []
    for v in vbds:
        d = v.to_json()
        rows.append(
            [
                d["domid"],
                d["vdev"],
                d["kind"],
                d["backend_state_name"],
                d["frontend_state_name"],
                d["device_path"] or d["physical_device"],
                d["luid"],
                d["identity"],
                d["holder"],
                d["health"],
                d["params"],
            ]
        )
    table(
        rows,
        [
            "DOM",
            "VDEV",
            "KIND",
            "BACKEND",
            "FRONTEND",
            "DEVICE",
            "LUID",
            "IDENTITY",
            "HOLDER",
            "HEALTH",
            "TARGET",
        ],
    )
