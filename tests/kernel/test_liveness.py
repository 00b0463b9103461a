"""The one liveness verdict on real loop devices: kernel.blockdev.observe judged by identity.judge."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.kernel import EmptyLoop, ImageFactory
from xenblockctl.kernel import blockdev, loop, sysfs
from xenblockctl.kernel.loop_abi import LOOP_MAJOR
from xenblockctl.xenstore.identity import Liveness, PublishedIdentity, liveness_of

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def test_bound_replaced_unverified_gone(make_image: ImageFactory) -> None:
    dev = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:test-liveness")
    ident = dev.identity
    published = PublishedIdentity(ident.major, ident.minor, ident.diskseq)
    try:
        assert published.liveness(blockdev.observe) is Liveness.LIVE
        stale = PublishedIdentity(ident.major, ident.minor, ident.diskseq - 1)
        assert stale.liveness(blockdev.observe) is Liveness.REPLACED
        unverified = PublishedIdentity(ident.major, ident.minor, None)
        assert unverified.liveness(blockdev.observe) is Liveness.UNVERIFIED
    finally:
        dev.close()  # AUTOCLEAR (EMPTY after it: test_an_empty_device_..., on a held number)
    # A minor no loop device has: nothing there, and looking must not create it (legacy autoload).
    minor = 1 << 19
    while sysfs.read_attr(LOOP_MAJOR, minor, "dev") is not None:
        minor += 1
    assert liveness_of(os.makedev(LOOP_MAJOR, minor), 5, blockdev.observe) is Liveness.GONE
    assert sysfs.read_attr(LOOP_MAJOR, minor, "dev") is None


def test_an_empty_device_with_the_published_diskseq_is_live(empty_loop: EmptyLoop) -> None:
    """The decision the six old copies disagreed on: a device of size 0 is still the published
    one while its diskseq is (here an unbound loop device, published as `phy:` would); with the
    diskseq of the binding that went away, it is EMPTY."""
    devt = empty_loop.now.devt
    assert liveness_of(devt, empty_loop.now.diskseq, blockdev.observe) is Liveness.LIVE
    assert liveness_of(devt, empty_loop.bound.diskseq, blockdev.observe) is Liveness.EMPTY
