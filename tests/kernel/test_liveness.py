"""The one liveness verdict on real loop devices: kernel.blockdev.observe judged by identity.judge."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.kernel import ImageFactory
from xenblockctl.kernel import blockdev, loop, sysfs
from xenblockctl.xenstore.identity import Liveness, PublishedIdentity, liveness_of

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def test_bound_empty_replaced_gone(make_image: ImageFactory) -> None:
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
        dev.close()  # AUTOCLEAR: the number now names an empty loop device with a new diskseq
    _skip_if_reused(published.devt)
    assert published.liveness(blockdev.observe) is Liveness.EMPTY
    # A minor no loop device has: nothing there, and looking must not create it (legacy autoload).
    minor = 1 << 19
    while sysfs.read_attr(loop.LOOP_MAJOR, minor, "dev") is not None:
        minor += 1
    assert liveness_of(os.makedev(loop.LOOP_MAJOR, minor), 5, blockdev.observe) is Liveness.GONE
    assert sysfs.read_attr(loop.LOOP_MAJOR, minor, "dev") is None


def test_an_empty_device_with_the_published_diskseq_is_live(make_image: ImageFactory) -> None:
    """The decision the six old copies disagreed on: a device of size 0 is still the published
    one while its diskseq is (here an unbound loop device, published as `phy:` would)."""
    dev = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:test-liveness")
    devt = dev.identity.devt
    dev.close()
    _skip_if_reused(devt)
    now = blockdev.observe(devt)
    assert now is not None
    assert now.size_bytes == 0
    assert liveness_of(devt, now.diskseq, blockdev.observe) is Liveness.LIVE


def _skip_if_reused(devt: int) -> None:
    now = blockdev.observe(devt)
    if now is not None and now.size_bytes:
        pytest.skip("the loop number was bound again by another process meanwhile")
