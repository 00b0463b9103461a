"""`xenblockctl hotplug add|remove`: the block script, for running it by hand with libxl's
environment (XENBUS_PATH=backend/vbd/<domid>/<devid>) when debugging. libxl itself runs the lean
hotplug/block-xenblockctl entry point, which does not load click."""

from __future__ import annotations

import os

import click


@click.command()
@click.argument("action", type=click.Choice(["add", "remove"]))
def hotplug(action: str) -> None:
    """Run the block script's ACTION for the backend named by $XENBUS_PATH (exit status as libxl sees it)."""
    from xenblockctl.blockscript.hotplug import main

    status = main(["block-xenblockctl", action], os.environ)
    if status:
        raise click.exceptions.Exit(status)
