"""The suite gives back the loop minors it made (tests/fixtures/kernel.py): only unbound, unopened ones."""

from __future__ import annotations

import fcntl
import os

import pytest

from tests.fixtures.kernel import ImageFactory, loop_minors, remove_unbound_minors
from xenblockctl.kernel import loop
from xenblockctl.kernel.loop_abi import LOOP_CTL_ADD

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def _add_minor() -> int:
    """A fresh unbound minor at a number nobody has: what a scale test leaves behind."""
    ctl = os.open(loop.LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        number = max(loop_minors(), default=0) + 1000
        for candidate in range(number, number + 64):
            try:
                return int(fcntl.ioctl(ctl, LOOP_CTL_ADD, candidate))
            except FileExistsError:
                continue  # another run took it an instant ago
        raise AssertionError("no free loop number to add")
    finally:
        os.close(ctl)


def test_unbound_minor_is_removed() -> None:
    number = _add_minor()
    assert number in loop_minors()
    assert remove_unbound_minors({number}) == {number}
    assert number not in loop_minors()


def test_bound_or_open_minor_is_kept(make_image: ImageFactory) -> None:
    dev = loop.attach_file(
        str(make_image("minor.img", size=1 << 20)), read_only=False, tag="xenblockctl:test-minor"
    )
    try:
        assert remove_unbound_minors({dev.identity.minor}) == set()
        assert dev.identity.minor in loop_minors()
    finally:
        dev.close()
    number = _add_minor()
    fd = os.open(f"/dev/loop{number}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert remove_unbound_minors({number}) == set()  # opened: an attacher between GET_FREE and CONFIGURE
    finally:
        os.close(fd)
    assert remove_unbound_minors({number}) == {number}
