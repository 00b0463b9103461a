"""`xenblockctl list`: every vbd this domain serves, with live identity checks."""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Any

import click

from xenblockctl.cli.complete import complete_domain
from xenblockctl.cli.output import connect, devnum, emit_json, table
from xenblockctl.environment import Environment

Row = dict[str, Any]

#: column name -> (what it shows, how to get it from a vbd's JSON record). Numbers a person compares
#: with lsblk and sysfs are decimal (MAJ:MIN, DISKSEQ); the xenstore (hex) spellings exist only as
#: the columns whose names say so. Most columns are one key of the record, read by itemgetter.
COLUMNS: dict[str, tuple[str, Callable[[Row], object]]] = {
    "DOM": ("guest domain id", itemgetter("domid")),
    "VDEV": ("virtual device", itemgetter("vdev")),
    "DEVID": ("virtual device number", itemgetter("devid")),
    "KIND": ("vbd or vbd3", itemgetter("kind")),
    "BDOM": ("backend domain id", itemgetter("backend_domid")),
    "BACKEND": ("backend state", itemgetter("backend_state_name")),
    "FRONTEND": ("frontend state", itemgetter("frontend_state_name")),
    "MODE": ("r or w", itemgetter("mode")),
    "DEVICE": ("device node", itemgetter("device_path")),
    "MAJ:MIN": ("device number, decimal as lsblk", lambda d: devnum(d["major"], d["minor"])),
    "DISKSEQ": ("diskseq the luid records, decimal as sysfs", itemgetter("diskseq")),
    "LIVE-DISKSEQ": ("diskseq of the device now at MAJ:MIN", itemgetter("live_diskseq")),
    "PHYSDEV-HEX": ("physical-device as in xenstore (hex)", itemgetter("physical_device")),
    "LUID-HEX": ("physical-device-luid as in xenstore (hex)", itemgetter("luid")),
    "IDENTITY": ("does the live device carry the luid", itemgetter("identity")),
    "HOLDER": ("engine or kernel-blkback", itemgetter("holder")),
    "HOTPLUG": ("hotplug-status", itemgetter("hotplug_status")),
    "HEALTH": ("overall verdict", itemgetter("health")),
    "TARGET": ("params", itemgetter("params")),
}
DEFAULT_COLUMNS = (
    "DOM",
    "VDEV",
    "KIND",
    "BACKEND",
    "FRONTEND",
    "DEVICE",
    "MAJ:MIN",
    "DISKSEQ",
    "IDENTITY",
    "HOLDER",
    "HEALTH",
    "TARGET",
)


def parse_columns(text: str | None) -> list[str]:
    """lsblk's -o: `A,B` replaces the default columns, `+A,B` appends to them; any case."""
    if text is None:
        return list(DEFAULT_COLUMNS)
    extra = text.startswith("+")
    names = [n.strip().upper() for n in text.removeprefix("+").split(",") if n.strip()]
    unknown = [n for n in names if n not in COLUMNS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown column {', '.join(unknown) or '(none given)'}; columns: {', '.join(COLUMNS)}",
            param_hint="'-o' / '--output'",
        )
    return [*DEFAULT_COLUMNS, *names] if extra else names


@click.command(name="list")
@click.option(
    "--domain",
    "domain",
    default=None,
    metavar="DOMAIN",
    shell_complete=complete_domain,
    help="Only this domain's vbds (id or name).",
)
@click.option(
    "-o",
    "--output",
    "columns",
    default=None,
    metavar="LIST",
    help="Columns to print, comma-separated (+LIST: added to the default ones); see xenblockctl(1).",
)
@click.option(
    "-n", "--noheadings", "--no-headings", "no_headings", is_flag=True, help="Do not print the heading line."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_vbds(domain: str | None, columns: str | None, no_headings: bool, as_json: bool) -> None:
    """List vbds: states, device, diskseq and whether the live device still matches the luid."""
    from xenblockctl.toolstack import domains, inventory

    if as_json and (columns is not None or no_headings):
        raise click.UsageError("--json prints every key: it does not take -o or --no-headings")
    names = parse_columns(columns)
    with connect() as store:
        domid = None if domain is None else domains.lookup(store, domain)
        vbds = inventory.scan(store, home_domid=store.own_domid(), domid=domid, env=Environment.of_process())
    records = [v.to_json() for v in vbds]
    if as_json:
        emit_json("list", {"vbds": records})
        return
    table([[COLUMNS[n][1](d) for n in names] for d in records], names, headings=not no_headings)
