"""Output helpers shared by the admin commands: JSON documents, tables, progress on a terminal,
and the xenstore connection every command opens the same way."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from xenblockctl.xenstore.client import XenStore


def schema(command: str) -> str:
    """The `schema` value of a command's JSON document; the suffix changes only when a key's
    meaning changes or a key is removed (adding keys keeps it)."""
    return f"xenblockctl.{command}.v1"


def emit_json(command: str, payload: dict[str, Any]) -> None:
    click.echo(json.dumps({"schema": schema(command), **payload}, sort_keys=True, indent=2))


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
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

    timeout = float(config.load()["hotplug.xenstore_timeout"].value)
    return XenStore.connect(timeout=timeout)
