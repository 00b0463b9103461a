"""`xenblockctl identify PATH`: open a target the way the block script would and print its identity."""

from __future__ import annotations

import os

import click

from xenblockctl.blockscript.claim import Use, open_target
from xenblockctl.blockscript.target import parse_target
from xenblockctl.cli.output import emit_json, fields
from xenblockctl.environment import Environment
from xenblockctl.kernel import sysfs
from xenblockctl.kernel.loop import LoopDevice


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--writable", is_flag=True, help="Open read-write (as for mode w) instead of read-only.")
def identify(path: str, as_json: bool, writable: bool) -> None:
    """Print major:minor, diskseq, size and sector sizes of PATH, read from the opened fd.

    A regular file gets an auto-clearing loop device that vanishes when this command exits."""
    target = parse_target(path)
    # The block script's open, without its lock, sharing check or publishing: nothing is claimed.
    with (
        open_target(target, writable=writable, env=Environment.of_process()) as opened,
        opened.make(Use(("identify", os.getpid()))).device as device,
    ):
        ident = device.identity
        record: dict[str, object] = {
            "path": path,
            "device": f"/dev/loop{device.number}" if isinstance(device, LoopDevice) else path,
            "loop": isinstance(device, LoopDevice),
            "major": ident.major,
            "minor": ident.minor,
            "physical_device": ident.physical_device,
            "diskseq": ident.diskseq,
            "luid": ident.luid,
            "size_bytes": ident.size_bytes,
            "sectors": ident.sectors,
            "logical_block_size": ident.logical_block_size,
            "physical_block_size": ident.physical_block_size,
            "read_only": ident.read_only,
            # what a /dev/mapper/NAME target is checked against; null for anything but dm
            "dm_name": sysfs.dm_name(ident.major, ident.minor),
        }
    if as_json:
        emit_json("identify", record)
        return
    fields(record)
