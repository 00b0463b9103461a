"""`xenblockctl install-hooks`: lay the block script, udev rules and hook, units, man pages and
completions of this installed package onto a host (or under --root)."""

from __future__ import annotations

import click

from xenblockctl.cli.output import emit_json


@click.command("install-hooks")
@click.option(
    "--root",
    default="/",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Install under this directory instead of / (an image, a package build, a test).",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be installed or updated.")
@click.option(
    "--layout",
    type=click.Choice(["local", "debian"]),
    default="local",
    show_default=True,
    help="Destination paths: local (admin install from a wheel) or debian (the .deb's paths).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def install_hooks(root: str, dry_run: bool, layout: str, as_json: bool) -> None:
    """Install the block script, udev rules + hook, systemd units, man pages and completions.
    Idempotent: files already as shipped are left alone. Scripts run with this interpreter."""
    from xenblockctl.toolstack import hostfiles

    where = hostfiles.layout(layout)
    done = hostfiles.install(where, root, dry_run=dry_run)
    changed = [d for d in done if d.result != "unchanged"]
    if as_json:
        emit_json(
            "install-hooks",
            {
                "root": root,
                "layout": where.name,
                "dry_run": dry_run,
                "python": where.python,
                "files": [{"path": d.path, "result": d.result} for d in done],
            },
        )
        return
    for d in done:
        click.echo(f"{d.result:<14} {d.path}")
    if changed and not dry_run and root == "/":
        click.echo("next: udevadm control --reload && systemctl daemon-reload")
        if any(d.path.endswith(f"/{hostfiles.HOTPLUG_UNIT}") and d.result == "installed" for d in changed):
            # a server already running restarts itself on new code (block-xenblockctl(8))
            click.echo(f"and, for faster VM starts: systemctl enable --now {hostfiles.HOTPLUG_UNIT}")
