"""xenblockctl.conf(5) and block-xenblockctl(8) say what config.OPTIONS says: every option's line
(kind, bounds, default, variable) is `Option.describe()`, and the script page's defaults and
maxima are the options'. The bounds once drifted (man page and config.load: handoff_timeout up to
38; the script: 35), so a documented value failed every add."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xenblockctl import config

MAN = Path(__file__).resolve().parents[2] / "man"


def _section(page: str, heading: str) -> str:
    """From `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    return page.split(heading, 1)[1].split(f"\n{level} ", 1)[0]


@pytest.mark.parametrize("option", config.OPTIONS, ids=lambda o: o.key)
def test_conf_page_line_is_generated_from_the_option(option: config.Option) -> None:
    page = (MAN / "xenblockctl.conf.5.md").read_text()
    section = _section(page, f"## [{option.section}]")
    expected = f"`{option.name}` ({option.describe()})"
    lines = [line for line in section.splitlines() if line.startswith(f"`{option.name}` (")]
    assert lines == [expected], f"xenblockctl.conf.5.md [{option.section}] must have exactly: {expected}"


def test_conf_page_documents_no_option_that_does_not_exist() -> None:
    page = (MAN / "xenblockctl.conf.5.md").read_text()
    options = _section(page, "# OPTIONS\n")
    documented: set[str] = set()
    for block in options.split("\n## [")[1:]:
        section = block.split("]", 1)[0]
        documented |= {f"{section}.{name}" for name in re.findall(r"^`([a-z_]+)` \(", block, flags=re.M)}
    assert documented == set(config.BY_KEY)


@pytest.mark.parametrize("option", [o for o in config.OPTIONS if o.section == "hotplug"], ids=lambda o: o.key)
def test_script_page_environment_matches_the_option(option: config.Option) -> None:
    page = (MAN / "block-xenblockctl.8.md").read_text()
    environment = _section(page, "# ENVIRONMENT\n")
    entries = re.split(r"\n\n(?=`)", environment.strip())
    entry = next((e for e in entries if f"`{option.env}`" in e.split("\n", 1)[0]), None)
    assert entry is not None, f"block-xenblockctl.8.md ENVIRONMENT does not list {option.env}"
    if option.kind == "seconds":
        for number in re.findall(r"default ([0-9.]+)", entry):
            assert float(number) == option.default, f"{option.env}: page says default {number}"
        for number in re.findall(r"at most ([0-9.]+)", entry):
            assert float(number) == option.high, f"{option.env}: page says at most {number}"
