"""The `xenblockctl` click group with lazily imported subcommands."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from xenblockctl import __version__
from xenblockctl.errors import XenblockError

#: command name -> "module:attribute" under xenblockctl.cli. Adding a command = one module + one line.
COMMANDS: dict[str, str] = {
    "attach": "attach:attach",
    "backend": "backend:backend",
    "config": "config:config",
    "detach": "detach:detach",
    "doctor": "doctor:doctor",
    "gc": "gc:gc",
    "hotplug": "hotplug:hotplug",
    "install-hooks": "install_hooks:install_hooks",
    "list": "list_vbds:list_vbds",
    "show": "show:show",
    "identify": "identify:identify",
    "sandbox": "sandbox:sandbox",
    "xenstored": "xenstored:xenstored",
}

#: Exit codes, documented in man/xenblockctl.1.md.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(f"xenblockctl.cli.{module_name}")
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xenblockctl")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Attach, hand off and inspect Xen block devices safely."""
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: coded errors become one line on stderr and exit status 1."""
    try:
        return cli.main(args=argv, prog_name="xenblockctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except XenblockError as exc:
        if "--debug" in (argv if argv is not None else sys.argv):
            raise
        from xenblockctl.cli.exitcodes import exit_code_for, hint_for

        click.echo(f"xenblockctl: {exc.one_line()}", err=True)
        hint = hint_for(exc)
        if hint:
            click.echo(f"hint: {hint}", err=True)
        return exit_code_for(exc)
    except Exception as exc:  # a bug: still one line unless --debug
        if "--debug" in (argv if argv is not None else sys.argv):
            raise
        click.echo(
            f"xenblockctl: internal: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", err=True
        )
        click.echo("hint: rerun with --debug and report the traceback", err=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
