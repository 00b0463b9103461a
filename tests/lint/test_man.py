"""Every command has a man page section; man pages are Markdown (rendered by pandoc if present)."""

from __future__ import annotations

import re
from pathlib import Path

from xenblockctl.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"


def test_main_man_page_exists() -> None:
    page = MAN / "xenblockctl.1.md"
    assert page.is_file()
    text = page.read_text()
    for section in ("# NAME", "# SYNOPSIS", "# DESCRIPTION", "# EXIT STATUS", "# ERROR CODES"):
        assert section in text, f"xenblockctl.1.md lacks {section}"


def test_every_command_is_documented() -> None:
    text = (MAN / "xenblockctl.1.md").read_text()
    documented = set(re.findall(r"^## `?xenblockctl ([a-z-]+)", text, flags=re.M))
    missing = sorted(set(COMMANDS) - documented)
    assert not missing, f"commands without a section in man/xenblockctl.1.md: {missing}"


def _codes_in_package() -> set[str]:
    """Every stable error code: class attributes `code = "..."` and `code="..."` keyword uses."""
    codes: set[str] = set()
    for path in (ROOT / "xenblockctl").rglob("*.py"):
        text = path.read_text()
        codes.update(re.findall(r'^\s+code\s*=\s*"([a-z0-9-]+)"', text, flags=re.M))
        codes.update(re.findall(r'\bcode="([a-z0-9-]+)"', text))
    return codes


def test_every_error_code_is_documented() -> None:
    text = (MAN / "xenblockctl.1.md").read_text()
    section = text.split("# ERROR CODES", 1)[1]
    documented = set(re.findall(r"^`([a-z0-9-]+)`$", section, flags=re.M))
    missing = sorted(_codes_in_package() - documented)
    assert not missing, f"error codes not documented under ERROR CODES in man/xenblockctl.1.md: {missing}"
