"""`xenblockctl config show`: effective configuration and where each value came from."""

from __future__ import annotations

import os

import click

from xenblockctl.cli.output import emit_json, table


@click.group()
def config() -> None:
    """Configuration (/etc/xenblockctl/xenblockctl.conf, conf.d/*.conf, XENBLOCKCTL_* variables)."""


@config.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show(as_json: bool) -> None:
    """Print every option's effective value and its source (default, a file, or the environment)."""
    from xenblockctl import config as cfg

    values = cfg.load()
    main, dropins = cfg.paths(os.environ)
    if as_json:
        emit_json(
            "config",
            {
                "main_file": main,
                "dropin_dir": dropins,
                "files": cfg.config_files(os.environ),
                "options": {
                    key: {
                        "value": v.value,
                        "source": v.source,
                        "env": v.option.env,
                        "default": v.option.default,
                    }
                    for key, v in values.items()
                },
            },
        )
        return
    table(
        [[key, _show(v.value), v.source, v.option.env] for key, v in values.items()],
        ["OPTION", "VALUE", "SOURCE", "ENVIRONMENT"],
    )


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
