"""Output helpers shared by the admin commands: JSON documents, tables, progress on a terminal,
and the xenstore connection every command opens the same way."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # the client (and pyxs) load only when a command connects: TAB stays cheap
    from xenblockctl.xenstore.client import XenStore


def schema(command: str) -> str:
    """The `schema` value of a command's JSON document; the suffix changes only when a key's
    meaning changes or a key is removed (adding keys keeps it)."""
    return f"xenblockctl.{command}.v1"


def emit_json(command: str, payload: dict[str, Any]) -> None:
    import json  # here, not at the top: every TAB imports this module, few print JSON

    click.echo(json.dumps({"schema": schema(command), **payload}, sort_keys=True, indent=2))


def human(value: object) -> str:
    """One value as a person reads it: `-` for nothing, yes/no for flags (never `None`/`True`)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def devnum(major: int | None, minor: int | None) -> str | None:
    """MAJ:MIN in decimal, as lsblk, /proc/partitions and sysfs `dev` print it. xenstore's
    `physical-device` is the same pair in hex (7:20 there is 7:32 here): people compare this
    number with lsblk, so the hex form is shown only where it is labelled as xenstore's."""
    return None if major is None or minor is None else f"{major}:{minor}"


#: Keys whose values are the xenstore spellings (hex): in human output their label says so.
_XENSTORE_HEX = {"physical_device": "physical_device (xenstore, hex)", "luid": "luid (xenstore, hex)"}


def fields(record: dict[str, Any]) -> None:
    """A JSON record as `label  value` lines: major and minor as one decimal MAJ:MIN (lsblk's
    form), hex values only under a label naming them, flags yes/no, nested objects key=value."""
    lines: list[tuple[str, str]] = []
    for key, value in record.items():
        if key == "minor" and "major" in record:
            continue
        if key == "major" and "minor" in record:
            lines.append(("maj:min", human(devnum(value, record["minor"]))))
        elif isinstance(value, dict):
            lines.append((key, " ".join(f"{k}={human(v)}" for k, v in value.items())))
        else:
            lines.append((_XENSTORE_HEX.get(key, key), human(value)))
    width = max((len(label) for label, _ in lines), default=0)
    for label, text in lines:
        click.echo(f"{label:<{width}}  {text}")


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], *, headings: bool = True) -> None:
    cells = [[str(h) for h in headers]] + [[human(c) for c in row] for row in rows]
    shown = cells if headings else cells[1:]
    widths = [max((len(row[i]) for row in shown), default=0) for i in range(len(headers))]
    for row in shown:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


class Progress:
    """One self-overwriting status line on stderr, only when stdout is a terminal (scripts and
    --json consumers never see it)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self._width = 0

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = message[:120]
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = len(line)

    def done(self) -> None:
        if self.enabled and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


def connect() -> XenStore:
    """Like libxenstore: XENSTORED_PATH, then the standard socket, then /dev/xen/xenbus."""
    from xenblockctl import config
    from xenblockctl.xenstore.client import XenStore

    timeout = float(config.load()["hotplug.xenstore_timeout"].value)
    return XenStore.connect(timeout=timeout)
