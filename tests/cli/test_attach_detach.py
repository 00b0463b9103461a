"""attach / list / show / detach end to end: real loop devices, the embedded xenstored, the engine
process, and a simulated blkfront doing the handshake (and real I/O) in a thread."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import CliRunner, Engine
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.xenstore import EmbeddedXenstored
from xenblockctl.backend.guest import XenbusFrontend
from xenblockctl.xenstore.client import XenStore

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]
XVDB = 51728


class Guest:
    """A blkfront for domain 5's xvdb that connects as soon as the backend reaches InitWait."""

    def __init__(self, socket_path: str, transport: str, devid: int = XVDB) -> None:
        self.store = XenStore.connect(socket_path, timeout=10)
        self.frontend = f"/local/domain/5/device/vbd/{devid}"
        self.backend = f"/local/domain/0/backend/vbd/5/{devid}"
        self.transport = transport
        self.front: XenbusFrontend | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 20
            while self.store.read_optional(f"{self.backend}/state") is None:
                assert time.monotonic() < deadline, "attach never wrote the backend"
                time.sleep(0.01)
            self.front = XenbusFrontend(
                self.store,
                frontend_path=self.frontend,
                backend_path=self.backend,
                domid=5,
                transport_socket=self.transport,
            )
            self.front.connect(timeout=20)
        except BaseException as exc:
            self.error = exc

    def start(self) -> Guest:
        self.thread.start()
        return self

    def close(self) -> None:
        self.thread.join(30)
        if self.front is not None:
            self.front.close()
        self.store.close()


@pytest.fixture
def guest(xenstored: EmbeddedXenstored, cli_engine: Engine) -> Iterator[Guest]:
    g = Guest(xenstored.socket_path, cli_engine.transport)
    yield g
    g.close()


def test_attach_connects_lists_and_detaches(
    run_cli: CliRunner, guest: Guest, make_image: ImageFactory, cli_store: XenStore
) -> None:
    image = make_image(fill=b"BOOT")
    guest.start()
    result = run_cli("attach", "guest5", str(image), "--vdev", "xvdb", "--json", "--wait", "20")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["schema"] == "xenblockctl.attach.v1"
    assert doc["connected"] is True
    assert doc["consumer"] == "engine"
    assert (doc["vdev"], doc["devid"], doc["backend_state"]) == ("xvdb", XVDB, 4)
    guest.thread.join(20)
    assert guest.error is None, guest.error
    assert guest.front is not None
    assert guest.front.ring is not None
    assert guest.front.ring.read(0, 512)[:4] == b"BOOT", "the guest reads the attached image"

    listed = run_cli("list", "--json").json()["vbds"]
    assert len(listed) == 1
    vbd = listed[0]
    assert vbd["identity"] == "match"
    assert vbd["live_diskseq"] == vbd["diskseq"] == int(doc["luid"], 16)
    assert (vbd["holder"], vbd["health"], vbd["device_path"]) == ("engine", "connected", doc["device_path"])
    shown_result = run_cli("show", "5", "xvdb", "--json")
    assert shown_result.code == 0, shown_result.err
    shown = shown_result.json()["vbd"]
    assert shown == vbd
    table = run_cli("list").out
    assert "xvdb" in table
    assert "match" in table
    assert "connected" in table

    # libxl-style detach: Closing -> the guest closes -> Closed -> remove -> directories deleted
    def guest_closes() -> None:
        if guest.front:
            guest.front.disconnect()

    closer = threading.Thread(target=guest_closes, daemon=True)
    closer.start()
    detached = run_cli("detach", "5", "xvdb", "--json", "--wait", "15")
    closer.join(20)
    assert detached.code == 0, detached.err
    ddoc = detached.json()
    assert ddoc["gone"] is True
    assert ddoc["closed"] is True
    assert ddoc["stuck"] == []
    for path in (vbd["backend_path"], vbd["frontend_path"], "/libxl/5/device/vbd/51728"):
        assert cli_store.read_optional(path) is None, path
    assert bound_loops_under(image.parent) == {}, "the loop device is gone when detach returns"


def test_attach_without_a_guest_times_out_but_stays_attached(
    run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory, cli_store: XenStore
) -> None:
    image = make_image()
    result = run_cli("attach", "5", str(image), "--wait", "0.5")
    assert result.code == 5, result.err
    assert "wait-timeout" in result.err
    # What is known, not a guess: domain 5 exists and may write its state (issue 14: a guest that
    # could not write it was reported as "no blkfront loaded").
    assert "the guest has not answered: frontend state 1" in result.err
    assert "domain 5 ('guest5') exists and may write it" in result.err
    assert "cannot be told whether the guest is still booting" in result.err
    assert "no blkfront loaded" not in result.err
    assert "xvda of domain 5" in result.out, "auto picks the first free vdev"
    assert cli_store.read_optional("/local/domain/0/backend/vbd/5/51712/physical-device") is not None
    assert len(bound_loops_under(image.parent)) == 1
    second = run_cli("attach", "5", str(make_image("b.img")), "--wait", "0", "--json")
    assert second.code == 0, second.err
    assert second.json()["vdev"] == "xvdb", "auto skips the taken xvda"
    taken = run_cli("attach", "5", str(make_image("c.img")), "--vdev", "xvda", "--wait", "0")
    assert taken.code == 4
    assert "vdev-in-use" in taken.err
    for vdev in ("xvda", "xvdb"):
        gone = run_cli("detach", "5", vdev)
        assert gone.code == 0, gone.err
    assert bound_loops_under(image.parent) == {}


def test_attach_writes_discard_enable_as_libxl_does(
    run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory, cli_store: XenStore
) -> None:
    """libxl enables discard by default on writable disks only (seen against xl in the lane)."""
    for vdev, mode, want in (("xvdb", "w", "1"), ("xvdc", "r", "0")):
        result = run_cli(
            "attach", "5", str(make_image(f"{vdev}.img")), "--vdev", vdev, "--mode", mode, "--wait", "0"
        )
        assert result.code == 0, result.err
        devid = 51712 + 16 * (ord(vdev[-1]) - ord("a"))
        assert cli_store.read(f"/local/domain/0/backend/vbd/5/{devid}/discard-enable") == want, mode
    for vdev in ("xvdb", "xvdc"):
        assert run_cli("detach", "5", vdev).code == 0


def test_attach_with_nobody_serving_rolls_back(
    run_cli: CliRunner, cli_env: dict[str, str], make_image: ImageFactory, cli_store: XenStore
) -> None:
    image = make_image()
    result = run_cli("attach", "5", str(image), "--wait", "1")
    assert result.code == 1
    first, hint = result.err.splitlines()
    assert first.startswith("xenblockctl: no-backend: no backend took backend/vbd/5/51712 within 1 s")
    assert hint.startswith("hint: modprobe xen-blkback")
    assert "Traceback" not in result.err
    for path in ("/local/domain/0/backend/vbd/5", "/local/domain/5/device/vbd/51712", "/libxl/5/device/vbd"):
        assert cli_store.read_optional(path) is None or cli_store.ls(path) == [], path
    assert bound_loops_under(image.parent) == {}


def test_attach_to_a_silent_driver_domain_says_what_xenstore_shows_of_it(
    run_cli: CliRunner, cli_env: dict[str, str], make_image: ImageFactory, cli_store: XenStore
) -> None:
    """With --backend-domain, dom0's own blkback and engines are beside the point (issue 14)."""
    image = make_image()
    cli_store.write("/local/domain/7/name", "storage")
    cli_store.write("/local/domain/7/backend/vbd/9/51712/state", "4")  # it serves another guest,
    cli_store.write("/local/domain/7/backend/vbd/9/51712/opened", "1")  # with our engine
    result = run_cli("attach", "5", str(image), "--backend-domain", "7", "--engine", "--wait", "1")
    assert result.code == 1, result.err
    first, hint = result.err.splitlines()
    assert first.startswith(
        "xenblockctl: no-backend: no backend took backend/vbd/5/51712 within 1 s (state still 1): "
        "domain 7 ('storage'): it was not created as a driver domain"
    ), first
    assert (
        "1 of its 1 other vbd backends are past Initialising (1 vbd by our engine); "
        "none carries a hotplug-status (no sign `xl devd` ran there)"
    ) in first
    assert "cannot be seen from this domain" in first
    assert "kernel blkback is" not in first
    assert "engine uses this xenstored" not in first
    assert (
        hint == "hint: in domain 7: load xen-blkback (or start the engine with --kind vbd) and run `xl devd`"
    )
    assert cli_store.read_optional("/local/domain/7/backend/vbd/5") in (None, ""), "rolled back"
    assert cli_store.read_optional("/local/domain/5/device/vbd/51712") is None
    assert bound_loops_under(image.parent) == {}


def test_writable_disk_cannot_be_attached_twice(
    run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory, cli_store: XenStore
) -> None:
    image = make_image()
    assert run_cli("attach", "5", str(image), "--wait", "0").code == 0
    cli_store.write("/local/domain/7/name", "other")
    again = run_cli("attach", "other", str(image), "--wait", "0")
    assert again.code == 4, again.err
    assert again.err.startswith("xenblockctl: busy: target already in use writable")
    assert cli_store.read_optional("/local/domain/0/backend/vbd/7") in (None, ""), "rolled back"
    assert cli_store.ls("/local/domain/0/backend/vbd") == ["5"]
    assert run_cli("detach", "5", "xvda").code == 0
    assert bound_loops_under(image.parent) == {}


def test_detach_of_a_disk_the_guest_holds_is_stuck_until_forced(
    run_cli: CliRunner, guest: Guest, make_image: ImageFactory, cli_store: XenStore
) -> None:
    image = make_image()
    guest.start()
    assert run_cli("attach", "5", str(image), "--vdev", "xvdb", "--wait", "20").code == 0
    guest.thread.join(20)
    stuck = run_cli("detach", "5", "xvdb", "--wait", "0.5")
    assert stuck.code == 4, stuck.err
    assert "detach-stuck" in stuck.err
    assert "the guest still uses the disk" in stuck.err
    assert cli_store.read_optional("/local/domain/0/backend/vbd/5/51728/physical-device") is not None
    # The guest never answers; --force removes its frontend, the engine lets go, remove runs.
    forced = run_cli("detach", "5", "xvdb", "--force", "--wait", "10", "--json")
    assert forced.code == 0, forced.err
    assert forced.json()["forced"] is True
    assert forced.json()["gone"] is True
    assert bound_loops_under(image.parent) == {}


def test_list_flags_a_device_whose_diskseq_moved_on(
    run_cli: CliRunner, cli_engine: Engine, make_image: ImageFactory, cli_store: XenStore, tmp_path: Path
) -> None:
    image = make_image()
    assert run_cli("attach", "5", str(image), "--wait", "0").code == 0
    be = "/local/domain/0/backend/vbd/5/51712"
    luid = cli_store.read(f"{be}/physical-device-luid")
    # What a re-used number looks like from xenstore: the published luid names an older binding.
    cli_store.write(f"{be}/physical-device-luid", f"{int(luid, 16) - 1:x}")
    vbd = run_cli("show", "5", "xvda", "--json").json()["vbd"]
    assert vbd["identity"] == "mismatch"
    assert vbd["health"] == "broken"
    assert vbd["live_diskseq"] == int(luid, 16)
    cli_store.write(f"{be}/physical-device-luid", luid)
    assert run_cli("detach", "5", "xvda").code == 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("snapshot:/srv/base.img", "snapshot:/srv/base.img"),
        ("uuid:XENBLOCKCTL-x", "uuid:XENBLOCKCTL-x"),
        ("raw:/srv/a.img", "raw:/srv/a.img"),
        ("/srv/a.img", "/srv/a.img"),
        ("a.img", os.path.join(os.getcwd(), "a.img")),
    ],
)
def test_target_forms_are_passed_through_and_file_names_made_absolute(given: str, expected: str) -> None:
    from xenblockctl.cli.attach import resolve_target

    assert resolve_target(given) == expected


class FakeDriverDomain:
    """Domain 7 as a storage driver domain looks from dom0's xenstore: its backend driver takes the
    directory (InitWait) and later answers Closing with Closed; its `xl devd` runs the block script
    (add publishes, remove reads the owner record) and then deletes the backend directory itself,
    half a second after Closed, as devd does once `remove` has run."""

    def __init__(self, socket_path: str, owner: str, *, kind: str = "vbd", engine: bool = False) -> None:
        self.store = XenStore.connect(socket_path, timeout=10)
        self.backend = f"/local/domain/7/backend/{kind}/5/{XVDB}"
        self.owner = owner
        self.engine = engine
        self.script: str | None = None
        self.owner_at_remove: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _until(self, what: str, check: Any, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"driver domain: no {what}"
            time.sleep(0.01)

    def _run(self) -> None:
        be = self.backend
        try:
            self._until("backend directory", lambda: self.store.read_optional(f"{be}/state") == "1")
            self.script = self.store.read_optional(f"{be}/script")
            if self.engine:
                self.store.write(f"{be}/opened", "0")
            self.store.write(f"{be}/state", "2")
            self.store.write(f"{be}/physical-device", "7:0")
            self.store.write(f"{be}/physical-device-luid", "9")
            self.store.write(f"{be}/physical-device-path", "/dev/loop0")
            self.store.write(f"{be}/xenblockctl-owner", self.owner)
            self.store.write(f"{be}/hotplug-status", "connected")
            self._until("Closing", lambda: self.store.read_optional(f"{be}/online") == "0")
            self.store.write(f"{be}/state", "6")
            time.sleep(0.5)
            self.owner_at_remove = self.store.read_optional(f"{be}/xenblockctl-owner")
            self.store.rm(be)
        except BaseException as exc:
            self.error = exc

    def start(self) -> FakeDriverDomain:
        self.thread.start()
        return self

    def close(self) -> None:
        self.thread.join(30)
        self.store.close()


@pytest.fixture
def driver_domain_for(xenstored: EmbeddedXenstored, cli_env: dict[str, str]) -> Iterator[Any]:
    made: list[FakeDriverDomain] = []

    def make(owner: str, **how: Any) -> FakeDriverDomain:
        dd = FakeDriverDomain(xenstored.socket_path, owner, **how)
        made.append(dd)
        return dd.start()

    yield make
    for dd in made:
        dd.close()


def _attach_in_driver_domain(run_cli: CliRunner) -> None:
    result = run_cli(
        "attach", "5", "/srv/in-dd.img", "--vdev", "xvdb", "--backend-domain", "7", "--kernel", "--wait", "0"
    )
    assert result.code == 0, result.err


def test_attach_into_a_driver_domain_names_its_script_and_detach_lets_its_devd_remove(
    run_cli: CliRunner, driver_domain_for: Any, cli_store: XenStore
) -> None:
    """The driver domain's `xl devd` runs the script named in the backend: a path in *that*
    domain (no script is installed here, so this domain's fallback would name its own checkout,
    which the driver domain lacks). On detach its devd runs remove after Closed and deletes the
    directory; deleting it first left remove without the owner record (issue 14, lane 21)."""
    owner = OWNER
    dd = driver_domain_for(owner)
    _attach_in_driver_domain(run_cli)
    assert dd.script == "/etc/xen/scripts/block-xenblockctl"
    detached = run_cli("detach", "5", "xvdb", "--json", "--wait", "5")
    dd.thread.join(10)
    assert dd.error is None, dd.error
    assert detached.code == 0, detached.err
    assert dd.owner_at_remove == owner, "remove in the driver domain found the owner record"
    doc = detached.json()
    assert (doc["removed"], doc["stuck"], doc["gone"]) == ("by domain 7", [], True)
    assert cli_store.read_optional("/local/domain/7/backend/vbd/5/51728") is None
    assert cli_store.read_optional("/local/domain/5/device/vbd/51728") is None


def test_detach_from_a_driver_domain_ignores_this_domains_devices_with_the_same_numbers(
    run_cli: CliRunner,
    driver_domain_for: Any,
    make_image: ImageFactory,
    loop_devices: list[Any],
) -> None:
    """The owner record names a device of the driver domain; a loop device here with the same
    number and diskseq (both kernels count from boot) is not it and must not make detach stuck."""
    from xenblockctl.blockscript.owner import OwnerRecord
    from xenblockctl.kernel import loop

    here = loop.attach_file(str(make_image()), read_only=False, tag="xenblockctl:test:dd")
    loop_devices.append(here)
    dd = driver_domain_for(OwnerRecord.for_device(here, writable=True).format())
    _attach_in_driver_domain(run_cli)
    detached = run_cli("detach", "5", "xvdb", "--json", "--wait", "2")
    dd.thread.join(10)
    assert dd.error is None, dd.error
    assert detached.code == 0, detached.err
    assert detached.json()["stuck"] == []


OWNER = "v1 kind=loop dev=7:0 seq=9 mode=w autoclear=1 tag=xenblockctl:5:51728"


@pytest.mark.parametrize(("engine", "consumer"), [(True, "engine"), (False, "kernel-blkback")])
def test_attach_into_a_driver_domain_reports_what_its_script_published_and_who_took_it(
    run_cli: CliRunner, driver_domain_for: Any, engine: bool, consumer: str
) -> None:
    """Which consumer took the disk in the driver domain shows in its backend directory: our engine
    writes `opened`, kernel blkback does not (dom0's own modules say nothing about it)."""
    dd = driver_domain_for(OWNER, engine=engine)
    result = run_cli(
        "attach", "5", "/srv/in-dd.img", "--vdev", "xvdb", "--backend-domain", "7", "--wait", "0", "--json"
    )
    assert result.code == 0, result.err
    doc = result.json()
    assert (doc["consumer"], doc["physical_device"], doc["luid"], doc["device_path"]) == (
        consumer,
        "7:0",
        "9",
        "/dev/loop0",
    )
    assert run_cli("detach", "5", "xvdb", "--wait", "5").code == 0
    dd.thread.join(10)
    assert dd.error is None, dd.error


def test_attach_engine_into_a_driver_domain_whose_blkback_serves_vbd_uses_vbd3(
    run_cli: CliRunner, driver_domain_for: Any, cli_store: XenStore
) -> None:
    """Kernel blkback takes every `vbd` of its domain: another guest's vbd there, past InitWait
    without `opened`, shows it is loaded, so the engine can only be reached through vbd3."""
    cli_store.write("/local/domain/7/backend/vbd/9/51712/state", "4")
    dd = driver_domain_for(OWNER, kind="vbd3", engine=True)
    result = run_cli(
        "attach", "5", "/srv/in-dd.img", "--vdev", "xvdb", "--backend-domain", "7", "--engine", "--wait", "0"
    )
    assert result.code == 0, result.err
    assert dd.script is not None, "the attach went to backend/vbd3"
    assert run_cli("detach", "5", "xvdb", "--wait", "5").code == 0
    dd.thread.join(10)
    assert dd.error is None, dd.error


@pytest.mark.parametrize(
    ("served", "kind"),
    [
        ({}, "vbd"),
        ({"vbd/9/51712/opened": "1"}, "vbd"),
        ({"vbd3/9/51712/opened": "1"}, "vbd3"),
        ({"vbd/9/51712/hotplug-status": "connected"}, "vbd3"),
    ],
)
def test_engine_kind_in_a_driver_domain_follows_what_its_other_vbds_show(
    cli_store: XenStore, served: dict[str, str], kind: str
) -> None:
    from xenblockctl.toolstack import lifecycle

    for node, value in served.items():
        base = "/local/domain/7/backend/" + node.rsplit("/", 1)[0]
        cli_store.write(f"{base}/state", "4")
        cli_store.write(f"/local/domain/7/backend/{node}", value)
    assert lifecycle.choose_kind("engine", remote=True, store=cli_store, backend_domid=7) == kind
    assert lifecycle.choose_kind("kernel", remote=True, store=cli_store, backend_domid=7) == "vbd"
