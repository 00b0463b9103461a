"""`xenblockctl gc`: remove what is provably ours and unused."""

from __future__ import annotations

import click

from xenblockctl.cli.exitcodes import EXIT_ERROR
from xenblockctl.cli.output import connect, emit_json
from xenblockctl.environment import Environment


@click.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def gc(dry_run: bool, as_json: bool) -> None:
    """Remove loop and dm devices tagged ours that no backend uses, never-opened kernel NBD devices
    of ours whose vbd is done with them, and backend directories of ours whose domain is gone or
    whose attach failed. Never touches anything it cannot prove is ours."""
    from xenblockctl.errors import XenblockError
    from xenblockctl.toolstack import gc as garbage

    store = None
    try:
        store = connect()
    except XenblockError as exc:
        if not as_json:
            click.echo(f"xenblockctl: warning: {exc.one_line()}", err=True)
    try:
        home = store.own_domid() if store is not None else 0
        env = Environment.of_process()
        done, notes = garbage.collect(store, home_domid=home, env=env, dry_run=dry_run)
    finally:
        if store is not None:
            store.close()
    failed = [c for c in done if c.result.startswith("failed")]
    if as_json:
        emit_json("gc", {"dry_run": dry_run, "items": [c.to_json() for c in done], "notes": notes})
    else:
        for c in done:
            click.echo(f"{c.garbage.kind:<8} {c.garbage.name}: {c.result} ({c.garbage.reason})")
        for note in notes:
            click.echo(f"note: {note}")
        if not done:
            click.echo("nothing to collect")
    if failed:
        raise click.exceptions.Exit(EXIT_ERROR)
