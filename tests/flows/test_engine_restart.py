"""Issue 21: guests keep their disks across an engine crash. A real engine process on the local
transport parks its device fds in a store speaking systemd's exact protocol (tests/fixtures/fdstore.py);
it is SIGKILLed; the store's copies keep the auto-clearing loop device bound; a new engine started
with LISTEN_FDS/LISTEN_FDNAMES (the fds at 3.., as systemd passes them) takes the device back after
re-verifying it, and the reconnecting frontend reads what was written and flushed before the kill.
If no engine comes back, the store's close releases the device (delete-on-close still holds).

The pause is printed (-s): SIGKILL to the first answer on the new ring. On this transport the ring's
grants live in the engine process (its registry), so after a crash the frontend must reconnect (the
new engine says Closed) and re-issue what was not answered, as Linux blkfront does on recovery.
`backend --takeover` hands the registry over with the devices, and the new engine re-attaches to the
live ring as it does on Xen (tests/xen/scenarios/26_engine_restart.sh)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.engine import REPO, attach_guest, wait_for
from tests.fixtures.engine import detach_guest as detach
from tests.fixtures.fdstore import FdStoreManager
from tests.fixtures.kernel import ImageFactory, bound_loops_under
from tests.fixtures.libxl import Backend, Libxl
from tests.xen.scenarios.fdstore_supervisor import LAUNCH
from xenblockctl.backend import blkif
from xenblockctl.backend.frontend import Completion, LocalFrontend
from xenblockctl.backend.guest import XenbusFrontend
from xenblockctl.environment import Environment
from xenblockctl.errors import XenblockError
from xenblockctl.toolstack import doctor, host, inventory
from xenblockctl.toolstack.daemons import ReadyDaemon
from xenblockctl.toolstack.findings import Finding

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_loop")]


class Engines:
    """Engine processes started one after another on one transport socket, all stopped at the end."""

    def __init__(self, libxl: Libxl, store: FdStoreManager, tmp_path: Path, transport: str) -> None:
        self.libxl = libxl
        self.store = store
        self.tmp_path = tmp_path
        self.transport = transport
        # engine-KIND.handover: the engine writes engine-KIND.parked next to it, where doctor looks
        self.handover_socket = str(tmp_path / "engine-vbd.handover")
        self.started: list[ReadyDaemon] = []

    def start(self, *, takeover: bool = False, handover: bool = False, store: bool = True) -> ReadyDaemon:
        """takeover: the fds come from the store (LISTEN_FDS), as at a systemd restart. handover: the
        engine runs with `--takeover` and takes them from the running engine's hand-over socket."""
        argv = [sys.executable, "-m", "xenblockctl", "backend", "--transport", f"local:{self.transport}"]
        argv += ["--xenstore", self.libxl.xenstored.socket_path, "--handover-socket", self.handover_socket]
        if handover:
            argv.append("--takeover")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET"))}
        if store:
            env |= self.store.env
        fds: list[int] = []
        if takeover:
            fds, names = self.store.listen()
            env |= {"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names}
            argv = [sys.executable, "-c", LAUNCH, *map(str, fds), "--", *argv]
        log = self.tmp_path / f"engine{len(self.started)}.log"
        daemon = ReadyDaemon("engine", argv, "engine ready", log, timeout=60, cwd=REPO, env=env, pass_fds=fds)
        self.started.append(daemon)
        return daemon

    def stop_all(self) -> None:
        """SIGTERM the ones still running: each must exit 0 (the killed ones are reaped)."""
        codes = {d.log_path.name: (d.alive(), d.stop()) for d in self.started}
        bad = {name: code for name, (alive, code) in codes.items() if alive and code != 0}
        assert not bad, (bad, [d.log_text()[-2000:] for d in self.started])


@pytest.fixture
def engines(libxl: Libxl, fd_store: FdStoreManager, tmp_path: Path, transport_path: str) -> Iterator[Engines]:
    handle = Engines(libxl, fd_store, tmp_path, transport_path)
    try:
        yield handle
    finally:
        handle.stop_all()


def kill(daemon: ReadyDaemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)


def error_node(libxl: Libxl, be: Backend) -> str | None:
    relative = be.path.split("/local/domain/0/", 1)[1]
    return libxl.store.read_optional(f"/local/domain/0/error/{relative}/error")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_dead_engine_is_taken_over_and_no_acknowledged_write_is_lost(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory, how: str
) -> None:
    """SIGKILL: a crash. SIGTERM: `systemctl restart` (the engine drains and closes its copies but
    leaves them parked: the backend lives on)."""
    image = make_image()
    first = engines.start()
    assert wait_for(lambda: fd_store.ready >= 1), "READY=1 not sent"
    be, guest = attach_guest(libxl, engines.transport, image, 40)
    name = "vbd-40-51712"
    try:
        assert wait_for(lambda: fd_store.names() == {name: 1}), fd_store.messages
        ring = guest.ring
        assert ring is not None
        written = {sector: os.urandom(4096) for sector in (0, 8, 4096, 20480)}
        for sector, data in written.items():
            assert ring.write(sector, data) == blkif.RSP_OKAY
        assert ring.flush() == blkif.RSP_OKAY  # acknowledged: must survive the kill
        loops = bound_loops_under(image.parent)
        assert len(loops) == 1

        killed = time.monotonic()
        if how == "SIGKILL":
            kill(first)
        else:
            assert first.stop() == 0
        assert bound_loops_under(image.parent) == loops, "the store's copy keeps the loop device"

        engines.start(takeover=True)
        ready = time.monotonic()
        guest.reboot()  # the ring's grants died with the old engine: the frontend reconnects
        ring = guest.ring
        assert ring is not None
        for sector, data in written.items():
            assert ring.read(sector, len(data)) == data
        served = time.monotonic()
        print(
            f"\npause: {served - killed:.3f} s from {how} to the first read served"
            f" (new engine ready after {ready - killed:.3f} s)"
        )
        assert bound_loops_under(image.parent) == loops, "the same loop device, not a re-open"
        log = engines.started[-1].log_text()
        # the successor re-derived and re-verified the backing file from the loop device it took
        assert re.search(r"took over \S+ diskseq \S+ \(rw, I/O on its backing file\)", log), log
        assert fd_store.names() == {name: 1}, "taken back, not parked twice"
        assert ring.write(100, b"y" * 4096) == blkif.RSP_OKAY
    finally:
        detach(libxl, be, guest)
    assert wait_for(lambda: fd_store.names() == {}), "FDSTOREREMOVE at detach"
    assert wait_for(lambda: bound_loops_under(image.parent) == {}), "detach releases the device"


def test_a_device_swapped_while_no_engine_ran_is_refused(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory
) -> None:
    image_a, image_b = make_image("a.img", fill=b"A" * 4096), make_image("b.img", fill=b"B" * 4096)
    first = engines.start()
    be_a, guest_a = attach_guest(libxl, engines.transport, image_a, 41)
    be_b, guest_b = attach_guest(libxl, engines.transport, image_b, 42)
    try:
        assert wait_for(lambda: len(fd_store.names()) == 2), fd_store.messages
        kill(first)
        # while no engine runs, A's published identity is made to name B's device
        b = libxl.nodes(be_b)
        identity = ("physical-device", "physical-device-luid", "diskseq")
        libxl.store.write_many({be_a.node(n): b[n] for n in identity})
        engines.start(takeover=True)
        assert wait_for(lambda: error_node(libxl, be_a) is not None), libxl.nodes(be_a)
        assert "taken back from the fd store" in (error_node(libxl, be_a) or "")
        assert wait_for(lambda: fd_store.names() == {"vbd-42-51712": 1}), "A's copy dropped"
        only_b = lambda: list(bound_loops_under(image_b.parent).values()) == [str(image_b)]  # noqa: E731
        assert wait_for(only_b), "A's loop device went when nothing held it any more"
        assert "refusing it" in engines.started[-1].log_text()
        guest_b.reboot()  # B, verified, is served again
        assert guest_b.ring is not None
        assert guest_b.ring.read(0, 4096) == b"B" * 4096
    finally:
        guest_a.close()
        guest_a.store.close()
        detach(libxl, be_b, guest_b)
        libxl.store.write_many({be_a.node("online"): "0", be_a.node("state"): "6"})
        libxl.run("remove", be_a)


def test_no_engine_comes_back_and_the_store_closes_the_device_goes(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory
) -> None:
    image = make_image()
    first = engines.start()
    be, guest = attach_guest(libxl, engines.transport, image, 43)
    try:
        assert wait_for(lambda: fd_store.names() == {"vbd-43-51712": 1}), fd_store.messages
        kill(first)
        assert bound_loops_under(image.parent) != {}, "the store holds it"
        fd_store.close_fds()  # systemd gave up restarting the unit / the admin stopped it
        assert wait_for(lambda: bound_loops_under(image.parent) == {}), "delete-on-close still holds"
    finally:
        guest.close()
        guest.store.close()
        libxl.store.write_many({be.node("online"): "0", be.node("state"): "6"})
        libxl.run("remove", be)


def test_a_parked_device_whose_backend_went_while_no_engine_ran_is_released(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory
) -> None:
    """The toolstack destroyed the domain while the engine was down: the fd names no backend, so the
    new engine closes it, drops the store's copy, and the loop device goes."""
    image = make_image()
    first = engines.start()
    be, guest = attach_guest(libxl, engines.transport, image, 44)
    guest.close()
    guest.store.close()
    assert wait_for(lambda: fd_store.names() == {"vbd-44-51712": 1}), fd_store.messages
    kill(first)
    libxl.store.write_many({be.node("online"): "0", be.node("state"): "6"})
    assert libxl.run("remove", be).returncode == 0
    libxl.store.rm(be.path)
    assert bound_loops_under(image.parent) != {}, "the store still holds it"
    engines.start(takeover=True)
    assert wait_for(lambda: fd_store.names() == {}), fd_store.messages
    assert wait_for(lambda: bound_loops_under(image.parent) == {}), "released once nobody held it"
    assert "names no backend waiting for its device; closed it" in engines.started[-1].log_text()


def test_a_parked_device_whose_published_diskseq_changed_is_refused(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory
) -> None:
    """Same dev_t, but the identity nodes now name another diskseq (the number was reused for
    another disk while no engine ran): the store's fd is not that disk, so it is refused."""
    image = make_image()
    first = engines.start()
    be, guest = attach_guest(libxl, engines.transport, image, 45)
    guest.close()
    guest.store.close()
    try:
        assert wait_for(lambda: fd_store.names() == {"vbd-45-51712": 1}), fd_store.messages
        kill(first)
        other = f"{int(libxl.nodes(be)['diskseq'], 16) + 0x1000:x}"
        libxl.store.write_many({be.node("physical-device-luid"): other, be.node("diskseq"): other})
        engines.start(takeover=True)
        assert wait_for(lambda: error_node(libxl, be) is not None), libxl.nodes(be)
        assert "diskseq mismatch" in (error_node(libxl, be) or "")
        assert wait_for(lambda: fd_store.names() == {}), "the store's copy dropped"
        assert wait_for(lambda: bound_loops_under(image.parent) == {}), "and the device went"
    finally:
        libxl.store.write_many({be.node("online"): "0", be.node("state"): "6"})
        libxl.run("remove", be)


class GuestIO(threading.Thread):
    """A guest doing write + flush + read-verify rounds without pause. A request the backend does not
    answer is not an error: as Linux blkfront (blkif_recover), the guest waits, reconnects when the
    backend asks it to (Closed), and re-issues it on the new ring. Errors are non-OK statuses and
    wrong data; `pauses` is how long each request that was not answered at once waited, from its
    submission to its answer on the new ring."""

    def __init__(self, guest: XenbusFrontend) -> None:
        super().__init__(name="xbc-test-guest-io", daemon=True)
        self.guest = guest
        self.acked: dict[int, bytes] = {}  # sector -> data whose write and a later flush were acknowledged
        self.errors: list[str] = []
        self.pauses: list[float] = []
        self.rounds = 0
        self.reconnects = 0
        self.failure: BaseException | None = None
        self.halt = threading.Event()

    def _op(self, submit: Callable[[LocalFrontend], int]) -> Completion:
        ring = self.guest.ring
        assert ring is not None
        submitted = time.monotonic()
        rid = submit(ring)
        stalled: float | None = None
        while True:
            try:
                done = ring.collect(1, timeout=0.2)
                if stalled is not None:  # from the request's submission to its answer
                    self.pauses.append(time.monotonic() - submitted)
                return done[rid]
            except (XenblockError, OSError):
                pass  # no answer yet (or the engine's end of the event channel is gone)
            if stalled is None:
                stalled = time.monotonic()
            if time.monotonic() - stalled > 60:
                raise TimeoutError("no answer for 60 s")
            if self.guest.backend_state() == 6:  # the new engine asks us to reconnect
                self.guest.reboot()
                self.reconnects += 1
                ring = self.guest.ring
                assert ring is not None
                rid = submit(ring)

    def finish(self) -> None:
        """Stop the rounds and check they ran without a failure or an error."""
        self.halt.set()
        self.join(60)
        assert self.failure is None, repr(self.failure)
        assert self.errors == []

    def check_acknowledged(self) -> None:
        """Every write acknowledged (and flushed) reads back through the guest's current ring."""
        ring = self.guest.ring
        assert ring is not None
        for sector, data in self.acked.items():
            assert ring.read(sector, 4096) == data, f"acknowledged write at {sector} lost"

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                sector, data = (self.rounds % 512) * 8, os.urandom(4096)
                # each lambda is waited on before the loop moves on: no late binding to fear
                status = self._op(lambda r: r.submit_write(sector, data)).response.status  # noqa: B023
                flushed = self._op(lambda r: r.submit_flush()).response.status
                if status != blkif.RSP_OKAY or flushed != blkif.RSP_OKAY:
                    self.errors.append(f"round {self.rounds}: write {status}, flush {flushed}")
                    continue
                self.acked[sector] = data
                got = self._op(lambda r: r.submit_read(sector, 4096))  # noqa: B023
                if got.response.status != blkif.RSP_OKAY or got.data != data:
                    self.errors.append(
                        f"round {self.rounds}: read {got.response.status}, data matches: {got.data == data}"
                    )
                self.rounds += 1
        except BaseException as exc:  # reported by the test
            self.failure = exc


def test_a_guest_doing_io_while_the_engine_is_killed_sees_a_pause_not_an_error(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory
) -> None:
    image = make_image()
    first = engines.start()
    be, guest = attach_guest(libxl, engines.transport, image, 46)
    io = GuestIO(guest)
    try:
        assert wait_for(lambda: fd_store.names() == {"vbd-46-51712": 1}), fd_store.messages
        io.start()
        assert wait_for(lambda: io.rounds >= 50 or io.failure is not None), io.failure
        kill(first)
        before = io.rounds
        engines.start(takeover=True)
        assert wait_for(lambda: io.rounds >= before + 50 or io.failure is not None, timeout=60), io.failure
        io.finish()
        assert io.pauses, "the kill was not noticed"
        assert io.reconnects == 1, io.reconnects
        print(
            f"\nguest pause across SIGKILL + takeover: {max(io.pauses):.3f} s (all: {io.pauses});"
            f" {io.rounds} rounds, 0 errors"
        )
        io.check_acknowledged()
    finally:
        io.halt.set()
        io.join(60)
        detach(libxl, be, guest)
    with open(image, "rb") as f:
        for sector, data in io.acked.items():
            f.seek(sector * 512)
            assert f.read(4096) == data


def test_takeover_without_a_service_manager_hands_the_device_over_while_the_guest_does_io(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory
) -> None:
    """`backend --takeover` (an upgrade without systemd): the running engine drains its ring, passes
    its device fd and its registry (the frontends' connections, grant tables and event channels: this
    transport's "hypervisor") over the hand-over socket and exits 0; the new one re-verifies the
    device and re-attaches to the live ring, as on Xen (tests/xen/scenarios/26_engine_restart.sh): the
    frontend never reconnects, it only waits. The new engine parks the device in the store, since the
    old one (outside it) never did."""
    image = make_image()
    first = engines.start(store=False)
    be, guest = attach_guest(libxl, engines.transport, image, 47)
    io = GuestIO(guest)
    try:
        loops = bound_loops_under(image.parent)
        assert len(loops) == 1
        io.start()
        assert wait_for(lambda: io.rounds >= 50 or io.failure is not None), io.failure
        second = engines.start(handover=True)
        assert first.proc.wait(30) == 0, first.log_text()[-2000:]
        before = io.rounds
        assert wait_for(lambda: io.rounds >= before + 50 or io.failure is not None, timeout=60), io.failure
        io.finish()
        print(
            f"\nguest pause across --takeover: {max(io.pauses, default=0):.3f} s;"
            f" {io.rounds} rounds, 0 errors"
        )
        assert io.reconnects == 0, "re-attached: the frontend kept its ring"
        assert bound_loops_under(image.parent) == loops, "the same loop device, never released"
        assert "handed 1 device(s) over" in first.log_text()
        log = second.log_text()
        assert "adopted the previous engine's registry" in log, log
        assert re.search(r"took over \S+ diskseq \S+ \(rw, I/O on its backing file\)", log), log
        assert "re-attached to a live ring" in log, log
        assert fd_store.names() == {"vbd-47-51712": 1}, "parked by the new engine"
        io.check_acknowledged()
        # the adopted registry goes on serving: the same guest's reboot registers a new ring
        guest.reboot()
        io.check_acknowledged()
    finally:
        io.halt.set()
        io.join(60)
        detach(libxl, be, guest)
    assert wait_for(lambda: bound_loops_under(image.parent) == {}), "detach releases the device"


def test_takeover_with_no_engine_running_is_a_coded_error(
    libxl: Libxl, engines: Engines, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "xenblockctl", "backend", "--transport", f"local:{engines.transport}"]
    argv += [
        "--xenstore",
        libxl.xenstored.socket_path,
        "--takeover",
        "--handover-socket",
        str(tmp_path / "none"),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "handover" in done.stderr, done.stderr
    assert "no engine to take over" in done.stderr, done.stderr


def test_a_frontend_that_left_while_no_engine_ran_is_handled_as_a_fresh_one(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory
) -> None:
    """The guest rebooted its driver while no engine ran (frontend Initialising, backend still
    Connected): the engine taking over shows it InitWait, as for any new frontend, instead of keeping
    Connected for a ring that is gone; the frontend connects and finds its data."""
    image = make_image()
    first = engines.start()
    be, guest = attach_guest(libxl, engines.transport, image, 48)
    try:
        ring = guest.ring
        assert ring is not None
        assert ring.write(8, b"z" * 4096) == blkif.RSP_OKAY
        assert ring.flush() == blkif.RSP_OKAY
        kill(first)
        ring.close()
        guest.ring = None
        libxl.store.write(f"{guest.frontend_path}/state", "1")
        engines.start(takeover=True)
        assert guest.wait_backend((2,), 30) == 2
        ring = guest.connect()
        assert ring.read(8, 4096) == b"z" * 4096
        assert "took over" in engines.started[-1].log_text()
    finally:
        detach(libxl, be, guest)


def test_doctor_reports_the_parked_devices_and_an_engine_that_is_gone(
    libxl: Libxl, engines: Engines, fd_store: FdStoreManager, make_image: ImageFactory, tmp_path: Path
) -> None:
    """The engine writes down what it parked (engine-KIND.parked next to its hand-over socket);
    doctor reports the count, and warns while no engine runs: the manager alone holds them then."""
    image = make_image()
    first = engines.start()
    be, guest = attach_guest(libxl, engines.transport, image, 49)
    record = tmp_path / "engine-vbd.parked"

    def findings() -> list[Finding]:
        engine_pids = host.engine_pids(xenstore_socket=libxl.xenstored.socket_path)
        vbds = inventory.scan(libxl.store, home_domid=0, env=Environment({}))
        return doctor.check_parked(str(tmp_path), vbds, engine_pids)

    try:
        assert wait_for(lambda: record.exists() and "vbd-49-51712" in record.read_text()), fd_store.messages
        assert [(f.status, f.message) for f in findings()] == [
            ("ok", f"1 device(s) parked in the fd store by engine pid {first.proc.pid}")
        ]
        kill(first)
        (gone,) = findings()
        assert gone.status == "warning"
        assert f"engine pid {first.proc.pid} is not running" in gone.message
        assert gone.items == ["vbd-49-51712"]
        second = engines.start(takeover=True)
        assert wait_for(lambda: f'"pid": {second.proc.pid}' in record.read_text())
        assert [f.status for f in findings()] == ["ok"]
        # the unit stops for good: the manager's close releases the device, and doctor says so
        kill(second)
        fd_store.close_fds()
        assert wait_for(lambda: bound_loops_under(image.parent) == {})
        (released,) = findings()
        assert released.status == "info", released
        assert "what it parked is released" in released.message
    finally:
        guest.close()
        guest.store.close()
        libxl.store.write_many({be.node("online"): "0", be.node("state"): "6"})
        libxl.run("remove", be)
