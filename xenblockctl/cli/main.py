"""The `xenblockctl` click group with lazily imported subcommands."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click
import click.shell_completion

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

#: qvm-block's short names (qvm-device: `ls`/`l`, `a`/`at`, `d`/`dt`, `info`/`i`); not listed in
#: the help or completed, only accepted.
ALIASES: dict[str, str] = {
    "ls": "list",
    "l": "list",
    "a": "attach",
    "at": "attach",
    "d": "detach",
    "dt": "detach",
    "info": "show",
    "i": "show",
}


class BashComplete(click.shell_completion.BashComplete):
    """click's bash script, except that file and directory candidates are listed by the script
    itself (compgen) rather than left to readline's fallback (`compopt -o default`): the same
    names losetup's completion offers, and a completion that can be tested without a terminal."""

    source_template = click.shell_completion.BashComplete.source_template.replace(
        """            COMPREPLY=()
            compopt -o dirnames""",
        """            COMPREPLY+=($(compgen -d -- "$value"))
            compopt -o filenames 2>/dev/null""",
    ).replace(
        """            COMPREPLY=()
            compopt -o default""",
        """            COMPREPLY+=($(compgen -f -- "$value"))
            compopt -o filenames 2>/dev/null""",
    )


click.shell_completion.add_completion_class(BashComplete, "bash")

#: Exit codes, documented in man/xenblockctl.1.md.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(ALIASES.get(cmd_name, cmd_name))
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(f"xenblockctl.cli.{module_name}")
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=LazyGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="xenblockctl")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Attach, hand off and inspect Xen block devices safely. Without a command: `list` (as
    qvm-block and lsblk list without arguments)."""
    ctx.obj = {"debug": debug}
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        command = LazyGroup.get_command(cli, ctx, "list")
        assert command is not None
        ctx.invoke(command)


def _wants_json(argv: list[str]) -> bool:
    """--json among the options (not after `--`, where it would be an argument)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def _emit_error_json(code: str, message: str, hint: str | None, errno: int | None, status: int) -> None:
    """With --json a failure is a JSON document on stdout too (scripts read one place); the
    one-line error on stderr and the exit status stay as without it."""
    import errno as errnos
    import json

    from xenblockctl.cli.output import schema

    click.echo(
        json.dumps(
            {
                "schema": schema("error"),
                "code": code,
                "message": message,
                "hint": hint,
                "errno": None if errno is None else errnos.errorcode.get(errno, str(errno)),
                "exit_status": status,
            },
            sort_keys=True,
            indent=2,
        )
    )


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: coded errors become one line on stderr (and, with --json, a JSON
    error document on stdout) and their documented exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(args)
    try:
        return cli.main(args=args, prog_name="xenblockctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        if as_json:
            _emit_error_json("usage", exc.format_message(), "see --help", None, exc.exit_code)
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        if as_json:
            _emit_error_json("aborted", "aborted", None, None, EXIT_ERROR)
        return EXIT_ERROR
    except XenblockError as exc:
        if "--debug" in args:
            raise
        from xenblockctl.cli.exitcodes import exit_code_for, hint_for

        click.echo(f"xenblockctl: {exc.one_line()}", err=True)
        hint = hint_for(exc)
        if hint:
            click.echo(f"hint: {hint}", err=True)
        if as_json:
            _emit_error_json(exc.code, exc.message, hint, exc.errno, exit_code_for(exc))
        return exit_code_for(exc)
    except Exception as exc:  # a bug: still one line unless --debug
        if "--debug" in args:
            raise
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        click.echo(f"xenblockctl: internal: {text}", err=True)
        hint = "rerun with --debug and report the traceback"
        click.echo(f"hint: {hint}", err=True)
        if as_json:
            _emit_error_json("internal", text, hint, None, EXIT_ERROR)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
