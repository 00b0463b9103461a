"""`add` reads the backend's configuration without a transaction (one batched round trip), so the
publishing transaction must re-check everything that decision rested on: a backend whose mode or
params changed (re-created) while the target was being opened gets nothing published, a coded
error, and no loop device left behind.

The change is injected at the `add-target-open` pause point, in process (fault injection: libxl
never rewrites params of a live backend; a destroyed and re-created domain can look like it)."""

from __future__ import annotations

import fcntl
import os

import pytest

from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from xenblockctl.blockscript import add, faults
from xenblockctl.blockscript.settings import Settings
from xenblockctl.environment import Environment
from xenblockctl.journal import Journal
from xenblockctl.kernel import loop
from xenblockctl.kernel.blockdev import identify
from xenblockctl.kernel.errors import IdentityMismatch
from xenblockctl.kernel.loop_abi import LOOP_SET_CAPACITY
from xenblockctl.xenstore.client import Transaction, XenStore
from xenblockctl.xenstore.identity import PUBLISHED
from xenblockctl.xenstore.vbd import BackendPath

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


def _add(libxl: Libxl, be: Backend, *, handoff_timeout: float = 2.0) -> add.AddResult:
    """`add` for `be`, run in this process (so a test can patch its pause points and reads)."""
    with XenStore.connect(libxl.xenstored.socket_path, timeout=10) as store:
        return add.run_add(
            store,
            BackendPath(be.kind, be.domid, be.devid),
            Settings(handoff_timeout=handoff_timeout),
            Journal("test-add-revalidate", stderr=False),
            env=Environment({"XENBLOCKCTL_LOCK_DIR": str(libxl.lock_dir)}),
        )


@pytest.mark.parametrize("node", ["params", "mode"])
def test_config_changed_before_publishing_is_refused(
    libxl: Libxl, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch, node: str
) -> None:
    image = make_image("first.img", size=8 << 20)
    other = make_image("second.img", size=8 << 20)
    be = libxl.create_backend(5, 51712, str(image), "w")
    changed = {"params": str(other), "mode": "r"}[node]
    reached: list[str] = []

    def pause(env: Environment, point: str) -> None:
        reached.append(point)
        if point == "add-target-open":
            libxl.store.write(be.node(node), changed)

    monkeypatch.setattr(faults, "pause", pause)
    with pytest.raises(add.BackendGone, match="changed mode or params"):
        _add(libxl, be)
    assert "add-target-open" in reached
    assert "add-published" not in reached
    nodes = libxl.nodes(be)
    assert nodes[node] == changed
    for name in PUBLISHED:
        assert name not in nodes
    assert nodes["hotplug-status"] == "error"
    assert nodes["hotplug-error"].startswith("backend-missing:")
    assert bound_loops_under(image.parent) == {}  # the loop device went with its fd


def test_unchanged_config_still_publishes(
    libxl: Libxl, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same in-process path with nothing changed: the re-check passes and the device is handed over.
    image = make_image("disk.img", size=8 << 20)
    be = libxl.create_backend(5, 51728, str(image), "w")
    consumer = libxl.engine_consumer(be)
    result = _add(libxl, be, handoff_timeout=10.0)
    consumer.wait_opened()
    nodes = libxl.nodes(be)
    assert nodes["physical-device"] == result.physical_device
    assert nodes["physical-device-luid"] == result.luid
    assert nodes["hotplug-status"] == "connected"


def test_repeated_add_whose_published_identity_is_withdrawn_meanwhile_fails_coded(
    libxl: Libxl, make_image: ImageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batched read saw physical-device; the consistent re-read (a transaction) no longer does,
    # as when a remove withdraws it in between. Nothing may be confirmed, attached or published.
    image = make_image("disk.img", size=8 << 20)
    be = libxl.create_backend(5, 51744, str(image), "w")
    libxl.store.write_many({be.node("physical-device"): "7:3", be.node("physical-device-luid"): "1d"})
    original = add._read_published

    def withdrawn_first(tx: Transaction, path: str) -> dict[str, str]:
        libxl.store.rm_many([be.node("physical-device"), be.node("physical-device-luid")])
        return original(tx, path)

    monkeypatch.setattr(add, "_read_published", withdrawn_first)
    with pytest.raises(add.BackendClosing, match="withdrawn"):
        _add(libxl, be)
    nodes = libxl.nodes(be)
    assert "physical-device" not in nodes
    assert nodes["hotplug-error"].startswith("backend-closing:")
    assert bound_loops_under(image.parent) == {}


def test_block_device_changed_before_the_lock_is_refused(
    libxl: Libxl,
    make_image: ImageFactory,
    loop_devices: list[loop.LoopDevice],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sharing check decides on the identity read when the device was opened; once the lock is
    held it is read again, and a device that changed in between (here: the admin grew it, as
    `losetup -c` after a resize does) is refused instead of published with stale facts."""
    image = make_image("grown.img", size=8 << 20)
    admin = loop.attach_file(str(image), read_only=False, tag="xenblockctl:admin")
    loop_devices.append(admin)
    be = libxl.create_backend(5, 51760, f"/dev/loop{admin.number}", "w")

    def pause(env: Environment, point: str) -> None:
        if point == "add-target-open":
            os.truncate(image, 16 << 20)
            fcntl.ioctl(admin.fd, LOOP_SET_CAPACITY, 0)

    monkeypatch.setattr(faults, "pause", pause)
    with pytest.raises(IdentityMismatch, match="changed identity while it was being checked"):
        _add(libxl, be)
    assert identify(admin.fd).size_bytes == 16 << 20, "the resize really happened"
    nodes = libxl.nodes(be)
    for name in PUBLISHED:
        assert name not in nodes
    assert nodes["hotplug-error"].startswith("identity-mismatch:")
