"""The same-VM sharing rule (blockscript/sharing.py): a migration's destination may attach a disk
writable while the paused source still holds it, because both domains carry one
`/local/domain/<id>/vm`; nobody else may. Real embedded xenstored, real loop devices, the script
as libxl runs it; `vm` nodes written as libxl writes them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.engine import EngineProc, attach_disk, attach_guest, wait_for
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.kernel import loop
from xenblockctl.xenstore.paths import join

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]

VM = "/vm/6a3e0c4e-3f1b-4d3c-9a55-0c1d2e3f4a5b"
OTHER_VM = "/vm/0b7e2f51-9c1a-4e2d-8f3b-7a6c5d4e3f21"
SOURCE, DEST = 5, 6
DEVID = 51712

Target = Callable[[], str]


@pytest.fixture(params=["file", "block-device"])
def target(request: pytest.FixtureRequest, make_image: ImageFactory, loop_devices: list) -> Target:  # type: ignore[type-arg]
    """A params= path: an image file, or a block device (a loop device the admin set up)."""

    def make() -> str:
        image = make_image(fill=b"written before the move")
        if request.param == "file":
            return str(image)
        device = loop.attach_file(str(image), read_only=False, tag="xenblockctl:admin")
        loop_devices.append(device)
        return f"/dev/loop{device.number}"

    return make


def set_vm(libxl: Libxl, domid: int, value: str | None) -> None:
    """libxl__domain_make: `/local/domain/<id>/vm`, owned by dom0, readable by the domain."""
    node = f"/local/domain/{domid}/vm"
    if value is None:
        libxl.store.rm(node)
    else:
        libxl.store.write(node, value)


def add_source(libxl: Libxl, params: str) -> Backend:
    source = libxl.create_backend(SOURCE, DEVID, params, "w")
    consumer = libxl.engine_consumer(source)
    result = libxl.run("add", source)
    assert result.returncode == 0, result.stderr
    consumer.wait_opened()
    return source


def assert_busy(libxl: Libxl, be: Backend, reason: str) -> None:
    nodes = libxl.nodes(be)
    assert nodes.get("hotplug-status") == "busy", nodes
    assert nodes["hotplug-error"].startswith("busy: target already in use writable by "), nodes
    assert reason in nodes["hotplug-error"], nodes["hotplug-error"]
    assert "physical-device" not in nodes


def test_migration_destination_may_share_writable_with_its_source(libxl: Libxl, target: Target) -> None:
    params = target()
    set_vm(libxl, SOURCE, VM)
    set_vm(libxl, DEST, VM)
    source = add_source(libxl, params)
    dest = libxl.create_backend(DEST, DEVID, params, "w")
    dest_consumer = libxl.engine_consumer(dest)
    result = libxl.run("add", dest)
    assert result.returncode == 0, result.stderr
    dest_consumer.wait_opened()
    src_nodes, dest_nodes = libxl.nodes(source), libxl.nodes(dest)
    if params.startswith("/dev/loop"):
        assert dest_nodes["physical-device"] == src_nodes["physical-device"], "the same device, opened twice"
    else:
        assert dest_nodes["physical-device-luid"] != src_nodes["physical-device-luid"], "a loop of its own"
    # The source is destroyed: its consumer lets go, libxl closes the backend, remove runs.
    libxl.consumers[0].release()
    libxl.store.write(source.node("online"), "0")
    libxl.store.write(source.node("state"), "6")
    assert libxl.run("remove", source).returncode == 0
    assert dest_consumer.device is not None
    assert os.pread(dest_consumer.device.fd, 23, 0) == b"written before the move"
    if not params.startswith("/dev/loop"):
        image_dir = Path(params).parent
        assert set(bound_loops_under(image_dir)) == {dest_consumer.device.identity.minor}
    dest_consumer.release()


def test_another_vm_is_still_refused(libxl: Libxl, target: Target) -> None:
    params = target()
    set_vm(libxl, SOURCE, VM)
    set_vm(libxl, DEST, OTHER_VM)
    add_source(libxl, params)
    second = libxl.create_backend(DEST, DEVID, params, "w")
    assert libxl.run("add", second).returncode == 1
    assert_busy(libxl, second, f"domain {SOURCE} is VM {VM}, domain {DEST} is VM {OTHER_VM}")


@pytest.mark.parametrize(
    ("whose", "value", "reason"),
    [
        ("dest", None, f"/local/domain/{DEST}/vm is missing"),
        ("source", None, f"/local/domain/{SOURCE}/vm is missing"),
        ("dest", VM + "-1", f"/local/domain/{DEST}/vm is not a /vm/<uuid> path"),
        ("source", VM.upper(), f"/local/domain/{SOURCE}/vm is not a /vm/<uuid> path"),
        ("dest", "", f"/local/domain/{DEST}/vm is not a /vm/<uuid> path"),
    ],
)
def test_unproven_vm_is_refused(
    libxl: Libxl, target: Target, whose: str, value: str | None, reason: str
) -> None:
    """Xen's script pretends a missing `vm` is the same VM; we never waive on what we cannot read."""
    params = target()
    set_vm(libxl, SOURCE, VM)
    set_vm(libxl, DEST, VM)
    set_vm(libxl, SOURCE if whose == "source" else DEST, value)
    add_source(libxl, params)
    second = libxl.create_backend(DEST, DEVID, params, "w")
    assert libxl.run("add", second).returncode == 1
    assert_busy(libxl, second, f"same VM unproven: {reason}")


def test_one_domain_twice_is_refused_even_with_its_vm(libxl: Libxl, make_image: ImageFactory) -> None:
    image = str(make_image())
    set_vm(libxl, SOURCE, VM)
    add_source(libxl, image)
    again = libxl.create_backend(SOURCE, DEVID + 16, image, "w")
    assert libxl.run("add", again).returncode == 1
    assert_busy(libxl, again, f"domain {SOURCE} already has it")


def test_a_loop_nobody_published_is_refused_whatever_the_vm(
    libxl: Libxl,
    make_image: ImageFactory,
    loop_devices: list,  # type: ignore[type-arg]
) -> None:
    """The same-VM waiver needs a backend that published exactly this binding: a loop set up by
    hand (or by the stock script, without a luid) has no domain to compare."""
    image = make_image()
    loop_devices.append(loop.attach_file(str(image), read_only=False, tag="xenblockctl:by-hand"))
    set_vm(libxl, SOURCE, VM)
    set_vm(libxl, DEST, VM)
    be = libxl.create_backend(DEST, DEVID, str(image), "w")
    assert libxl.run("add", be).returncode == 1
    assert_busy(libxl, be, "not a backend of another domain of the same VM")


def test_plain_attach_needs_no_vm_node(libxl: Libxl, make_image: ImageFactory) -> None:
    """No conflict, no same-VM read: a plain attach with no `vm` nodes at all still works."""
    be = libxl.create_backend(DEST, DEVID, str(make_image()), "w")
    assert not libxl.store.exists(join(f"/local/domain/{DEST}", "vm"))
    consumer = libxl.engine_consumer(be)
    assert libxl.run("add", be).returncode == 0
    consumer.wait_opened()
    consumer.release()


def test_engine_refuses_a_second_writer_of_a_device_it_serves_twice(
    libxl: Libxl,
    engine: EngineProc,
    make_image: ImageFactory,
    loop_devices: list,  # type: ignore[type-arg]
) -> None:
    """The lane's engine + block-device migration: the real engine serves one device to the paused
    source (guest connected) and to the restored destination; a third domain of another VM asks
    for it writable, is refused `busy`, and libxl's teardown of that backend completes."""
    image = make_image(fill=b"written before the move")
    device = loop.attach_file(str(image), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(device)
    target = Path(f"/dev/loop{device.number}")
    set_vm(libxl, SOURCE, VM)
    set_vm(libxl, DEST, VM)
    intruder = DEST + 1
    set_vm(libxl, intruder, OTHER_VM)
    source, guest = attach_guest(libxl, engine.transport, target, SOURCE)
    try:
        dest = attach_disk(libxl, target, DEST)
        be = libxl.create_backend(intruder, DEVID, str(target), "w", engine=False)
        assert wait_for(lambda: libxl.nodes(be).get("opened") == "0", 10), libxl.nodes(be)
        assert libxl.run("add", be).returncode == 1
        assert_busy(libxl, be, f"domain {SOURCE} is VM {VM}, domain {intruder} is VM {OTHER_VM}")
        # libxl's teardown of the refused backend: online=0, Closing, wait for Closed, remove.
        libxl.store.write(be.node("online"), "0")
        libxl.store.write(be.node("state"), "5")
        assert wait_for(lambda: libxl.nodes(be).get("state") == "6", 10), libxl.nodes(be)
        assert libxl.run("remove", be).returncode == 0
        assert libxl.nodes(source)["state"] == "4"
        assert libxl.nodes(dest)["opened"] == "1"
    finally:
        guest.close()
