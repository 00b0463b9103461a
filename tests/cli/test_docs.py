"""Documentation stays in step with the code: every click option is in its man page section, every
config option in xenblockctl.conf(5), the shipped roff pages are what pandoc renders from the Markdown
today (with `--` kept as two hyphens), and the shipped shell completion files are what click
generates today."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from xenblockctl import config
from xenblockctl.cli.main import COMMANDS, cli

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "man"
COMPLETIONS = REPO / "completions"
#: Regenerate the completion files instead of comparing (after adding a command).
UPDATE_ENV = "XENBLOCKCTL_UPDATE_COMPLETIONS"


def _commands() -> Iterator[tuple[str, click.Command]]:
    ctx = click.Context(cli)
    for name in sorted(COMMANDS):
        command = cli.get_command(ctx, name)
        assert command is not None
        yield name, command
        if isinstance(command, click.Group):
            for sub in sorted(command.commands):
                yield f"{name} {sub}", command.commands[sub]


def _section(text: str, name: str) -> str:
    top = name.split(maxsplit=1)[0]
    match = re.search(rf"^## `?xenblockctl {re.escape(top)}`?\n(.*?)(?=^#{{1,2}} )", text, flags=re.M | re.S)
    assert match is not None, f"no section for {top}"
    return match.group(1)


@pytest.mark.parametrize(
    ("name", "command"), list(_commands()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_option_is_documented(name: str, command: click.Command) -> None:
    section = _section((MAN / "xenblockctl.1.md").read_text(), name)
    if len(name.split()) > 1:
        assert f"**xenblockctl {name}**" in section, f"`{name}` is not in its man section"
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        for flag in param.opts:
            if flag.startswith("--"):
                assert f"**{flag}**" in section, f"xenblockctl {name}: {flag} is not documented"


def test_every_config_option_is_documented() -> None:
    page = (MAN / "xenblockctl.conf.5.md").read_text()
    for option in config.OPTIONS:
        section = page.split(f"## [{option.section}]", 1)[1].split("\n## ", 1)[0]
        assert re.search(rf"^`{option.name}` \(.*`{option.env}`\)$", section, flags=re.M), option.key


#: How the shipped roff pages (man/NAME.N next to man/NAME.N.md) are rendered. `-smart`: pandoc's
#: default smart typography turns every `--option` into an en dash, and a pasted `list –json` fails.
PANDOC_ARGS = ("--standalone", "--from", "markdown-smart", "--to", "man")
#: Regenerate the shipped roff pages instead of comparing (after editing a page).
UPDATE_MAN_ENV = "XENBLOCKCTL_UPDATE_MAN"
PAGES = sorted(MAN.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_render_with_pandoc(page: Path) -> None:
    pandoc = shutil.which("pandoc")
    if pandoc is None:
        pytest.skip("pandoc not installed (Debian package pandoc, listed in .ci/apt-packages)")
    result = subprocess.run(
        [pandoc, *PANDOC_ARGS, str(page)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout.startswith('.\\"') or ".TH" in result.stdout
    title = page.read_text().splitlines()[0]
    assert title.startswith("% "), f"{page.name}: first line must be the pandoc title block"
    name = title.split()[1].split("(")[0]
    assert f'.TH "{name}"' in result.stdout, result.stdout[:300]
    shipped = page.with_suffix("")
    if os.environ.get(UPDATE_MAN_ENV):
        shipped.write_text(result.stdout)
    assert shipped.is_file(), f"{shipped.name} missing: generate with {UPDATE_MAN_ENV}=1"
    assert shipped.read_text() == result.stdout, f"regenerate with {UPDATE_MAN_ENV}=1"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_shipped_roff_keeps_double_hyphens(page: Path) -> None:
    """Every `--option` of the Markdown source is two hyphens in the roff (and, where groff is
    installed, in what `man -l` shows), never an en dash."""
    source = page.read_text()
    roff = page.with_suffix("").read_text()
    if "\u2013" not in source:
        assert "\\[en]" not in roff, f"{page.with_suffix('').name}: `--` rendered as an en dash"
    if "\u2014" not in source:
        assert "\\[em]" not in roff, f"{page.with_suffix('').name}: `---` rendered as an em dash"
    options = sorted(set(re.findall(r"(?<![-\w])--[a-z][a-z0-9-]*[a-z0-9]", source)))
    assert options or page.name == "xenblockctl-hooks.7.md" or "--" not in source
    for option in options:
        typed = "".join(r"\\?-" if c == "-" else re.escape(c) for c in option)
        assert re.search(rf"(?<![\w-]){typed}(?![\w-])", roff), f"{option} is not in the roff as typed"
    groff = shutil.which("groff")
    if groff is None:
        return
    shown = subprocess.run(
        [groff, "-man", "-Tutf8", "-P-cbou", str(page.with_suffix(""))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    ).stdout
    flat = re.sub(r"[\u2010\u2011]\n\s*", "", shown)  # words hyphenated across lines
    for option in options:
        assert option in flat or option in shown.replace("\n", " "), f"man shows {option} differently"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shipped_completions_are_current(shell: str) -> None:
    env = {**os.environ, "_XENBLOCKCTL_COMPLETE": f"{shell}_source"}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("xenblockctl"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shipped = COMPLETIONS / f"xenblockctl.{shell}"
    if os.environ.get(UPDATE_ENV):
        shipped.write_text(result.stdout)
    assert shipped.read_text() == result.stdout, f"regenerate with {UPDATE_ENV}=1"


def test_completion_offers_the_commands() -> None:
    env = {
        **os.environ,
        "_XENBLOCKCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": "xenblockctl de",
        "COMP_CWORD": "1",
    }
    result = subprocess.run(
        [str(Path(sys.executable).with_name("xenblockctl"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.split() == ["plain,detach"], result.stdout + result.stderr
