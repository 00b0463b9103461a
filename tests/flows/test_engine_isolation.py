"""One guest must never hurt another: whatever a hostile frontend writes, and whatever goes wrong
while serving one device (a resource limit, a bug), fails that device alone; a bystander guest on
the same engine keeps reading and writing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.fixtures.engine import EngineProc, InprocEngine, attach_disk, attach_guest, connect_guest, wait_for
from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.backend import blkif
from xenblockctl.backend.guest import GuestError, XenbusFrontend
from xenblockctl.kernel import blockdev

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]

#: Unicode digits: str.isdigit() says yes; int() raises on '²' and '¹' and reads '٣' as 3.
HOSTILE_CASES = [
    ("state", "²"),
    ("state", "¹"),
    ("ring-ref", "²"),
    ("ring-ref", "٣"),
    ("event-channel", "²"),
    ("ring-page-order", "¹"),
]


def error_of(libxl: Libxl, be: Backend) -> str | None:
    return libxl.store.read_optional(f"/local/domain/0/error/{be.relative}/error")


def check_bystander(guest: XenbusFrontend, round_: int) -> None:
    assert guest.ring is not None
    payload = f"bystander round {round_}".encode().ljust(4096, b".")
    assert guest.ring.write(round_ * 8, payload) == blkif.RSP_OKAY
    assert guest.ring.read(round_ * 8, 4096) == payload


def hostile_connect(
    libxl: Libxl, transport: str, image: Path, domid: int, *, node: str, value: str
) -> Backend:
    """Attach a disk to `domid`, whose frontend then writes `value` into `node`: after connecting
    for `state`, with its ring nodes otherwise (the engine must refuse the connect)."""
    be = attach_disk(libxl, image, domid)
    if node == "state":
        guest = connect_guest(libxl, transport, be)
        libxl.store.write(f"{be.frontend}/state", value)
        guest.close()
        guest.store.close()
        return be
    extra = {node: value}
    if node == "ring-page-order":
        extra["ring-ref0"] = "0"  # a multi-page shape; the order itself is the garbage
    with pytest.raises(GuestError, match="not a decimal number"):
        connect_guest(libxl, transport, be, extra_nodes=extra)
    return be


@pytest.mark.parametrize(("node", "value"), HOSTILE_CASES, ids=[f"{n}={v}" for n, v in HOSTILE_CASES])
def test_hostile_digits_fail_that_device_only(
    libxl: Libxl, engine: EngineProc, make_image: ImageFactory, node: str, value: str
) -> None:
    _be, bystander = attach_guest(libxl, engine.transport, make_image("bystander.img"), 40)
    try:
        check_bystander(bystander, 0)
        hostile = hostile_connect(
            libxl, engine.transport, make_image("hostile.img"), 41, node=node, value=value
        )
        assert wait_for(lambda: libxl.nodes(hostile).get("state") == "5"), libxl.nodes(hostile)
        assert "not a decimal number" in (error_of(libxl, hostile) or ""), error_of(libxl, hostile)
        assert engine.proc.poll() is None, "one guest's node value killed the engine"
        for round_ in range(1, 4):
            check_bystander(bystander, round_)
    finally:
        bystander.disconnect()
        bystander.close()


def test_an_exception_while_serving_one_device_fails_it_alone(
    libxl: Libxl, engine_inproc: InprocEngine, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's case: the fd limit hit while *opening* one device raised a raw OSError out of
    reconcile, and the engine released every device. Any exception, a bug included, must stay with
    its device (the kernel cannot run out of fds on demand for one open, so the open is patched)."""
    _be, bystander = attach_guest(libxl, engine_inproc.transport, make_image("bystander.img"), 42)
    victim_path = str(make_image("victim.img"))

    def open_devt(devt: int, *, writable: bool, node: str | None = None) -> blockdev.BlockDevice:
        raise OSError(errno.EMFILE, "Too many open files")

    try:
        victim = libxl.create_backend(43, 51712, victim_path, "w", engine=False)
        assert wait_for(lambda: libxl.nodes(victim).get("opened") == "0"), libxl.nodes(victim)
        # the bystander's device is open already: the next open is the victim's
        monkeypatch.setattr(blockdev, "open_devt", open_devt)
        libxl.run("add", victim)  # fails: the engine refuses; the script's own outcome is tested elsewhere
        assert wait_for(lambda: libxl.nodes(victim).get("state") == "5"), libxl.nodes(victim)
        assert "internal error: OSError" in (error_of(libxl, victim) or ""), error_of(libxl, victim)
        for round_ in range(3):
            check_bystander(bystander, round_)
        assert (42, 51712) in engine_inproc.engine.devices
    finally:
        bystander.disconnect()
        bystander.close()
