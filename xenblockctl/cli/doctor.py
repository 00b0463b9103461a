"""`xenblockctl doctor`: check the host and say how to fix what is wrong."""

from __future__ import annotations

import click

from xenblockctl.cli.exitcodes import EXIT_UNHEALTHY
from xenblockctl.cli.output import connect, emit_json
from xenblockctl.environment import Environment


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--strict", is_flag=True, help="Warnings (stale vbds, orphaned devices) also fail.")
def doctor(as_json: bool, strict: bool) -> None:
    """Check loop support, xenstored, blkback or the engine, stale vbds, orphaned devices, diskseq."""
    from xenblockctl.toolstack import doctor as checks

    findings, healthy = checks.run(connect, Environment.of_process())
    if strict:
        healthy = healthy and all(f.status != checks.WARNING for f in findings)
    if as_json:
        emit_json("doctor", {"healthy": healthy, "findings": [f.to_json() for f in findings]})
    else:
        for f in findings:
            click.echo(f"{f.status:<7}  {f.check:<13} {f.message}")
            for item in f.items:
                click.echo(f"{'':<23}{item}")
            if f.fix and f.status in (checks.WARNING, checks.ERROR):
                click.echo(f"{'':<23}fix: {f.fix}")
    if not healthy:
        raise click.exceptions.Exit(EXIT_UNHEALTHY)
