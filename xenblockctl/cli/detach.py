"""`xenblockctl detach DOMAIN VDEV`: libxl's Closing -> Closed handshake, then remove, then
confirm the device is really gone."""

from __future__ import annotations

import click

from xenblockctl.cli.complete import complete_domain, complete_vdev
from xenblockctl.cli.exitcodes import EXIT_BUSY
from xenblockctl.cli.output import Progress, connect, emit_json
from xenblockctl.environment import Environment


@click.command()
@click.argument("domain", shell_complete=complete_domain)
@click.argument("vdev", shell_complete=complete_vdev)
@click.option(
    "-f", "--force", is_flag=True, help="Remove the frontend first if the guest does not close (libxl -f)."
)
@click.option(
    "--wait",
    type=click.FloatRange(0, 3600),
    default=None,
    metavar="SECONDS",
    help="How long the backend gets to reach Closed [config detach.wait, 10].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def detach(domain: str, vdev: str, force: bool, wait: float | None, as_json: bool) -> None:
    """Detach VDEV (xvdb, 51728, ...) from DOMAIN (id or name) and return only when it is gone."""
    from xenblockctl import config
    from xenblockctl.toolstack import domains, lifecycle, vbd_dirs
    from xenblockctl.xenstore.vdev import Vdev

    wait = float(config.load()["detach.wait"].value) if wait is None else wait
    number = Vdev.parse(vdev).number
    progress = Progress(False if as_json else None)
    with connect() as store:
        # A dead domain's leftovers are exactly what detach must be able to clean: no liveness check.
        domid = domains.lookup(store, domain)
        own = store.own_domid()
        loc = vbd_dirs.locate(store, domid, number, home_domid=own)
        if loc is None:
            raise lifecycle.VbdMissing(f"domain {domid} has no vbd {vdev} ({number})")
        try:
            result = lifecycle.detach(
                store,
                loc,
                wait=wait,
                force=force,
                own_domid=own,
                env=Environment.of_process(),
                progress=progress,
            )
        finally:
            progress.done()
    record = {
        "domid": loc.domid,
        "devid": loc.devid,
        "vdev": Vdev.from_number(loc.devid).name,
        "backend_path": loc.backend,
        "closed": result.closed,
        "forced": result.forced,
        "removed": result.removed,
        "stuck": result.stuck,
        "gone": not result.stuck,
    }
    if as_json:
        emit_json("detach", record)
    elif not result.stuck:
        click.echo(f"{record['vdev']} of domain {loc.domid} detached ({result.removed})")
    if result.stuck:
        if not as_json:
            click.echo(f"xenblockctl: detach-stuck: {'; '.join(result.stuck)}", err=True)
        raise click.exceptions.Exit(EXIT_BUSY)
