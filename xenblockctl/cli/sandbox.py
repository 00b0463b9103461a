"""`xenblockctl sandbox`: the main job end to end on a machine without Xen."""

from __future__ import annotations

import click

from xenblockctl.cli.output import emit_json


@click.command()
@click.option(
    "--image",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Use this image as the guest disk (default: a scratch 64 MiB file). It is written to.",
)
@click.option(
    "--target",
    default=None,
    metavar="NBD-URI",
    help="Use this NBD export as the guest disk instead of an image (nbd+unix:///EXPORT?socket=PATH"
    " or nbd://HOST:PORT/EXPORT of a running server; served by the engine itself). It is written to.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--keep", is_flag=True, help="Keep the work directory (logs of xenstored and the engine).")
def sandbox(image: str | None, target: str | None, as_json: bool, keep: bool) -> None:
    """Attach a disk to a simulated guest through the real path: embedded xenstored, the block script
    as libxl runs it, the engine verifying diskseq, a blkfront doing I/O, a reboot and a detach."""
    from xenblockctl.sandbox import Step, run

    def progress(step: Step) -> None:
        if not as_json:
            click.echo(f"ok  {step.seconds * 1000:8.1f} ms  {step.name}: {step.detail}")

    report = run(image, target=target, progress=progress, keep_dir=keep)
    if as_json:
        emit_json("sandbox", {"ok": report.ok, "steps": [dict(s.__dict__) for s in report.steps]})
    else:
        total = sum(s.seconds for s in report.steps)
        click.echo(f"sandbox passed: {len(report.steps)} steps in {total:.2f} s")
