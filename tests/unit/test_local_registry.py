"""The local transport's registry under hostile and careless clients, and several disks of one
domain: every bad request gets a coded refusal and a log line and touches its connection alone; a
client that never reads, or a thousand idle ones, stall nobody; the thread never dies silently;
and each disk's ring refs and port name that disk's memory, whatever order its domain registers in."""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.backend import ring_params_of
from xenblockctl.backend import blkif
from xenblockctl.backend.dataplane import DataPlane
from xenblockctl.backend.frontend import LocalFrontend
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.transport import TransportError
from xenblockctl.backend.transport import local as local_mod
from xenblockctl.backend.transport.local import LocalDomainClient, LocalTransport, create_grant_memfd
from xenblockctl.journal import Journal


class Recorder(Journal):
    """A journal that keeps its lines (and still prints them)."""

    def __init__(self) -> None:
        super().__init__("xbc-test-registry", stderr=True)
        self._target = None  # tests must not write to the host's journal
        self.lines: list[tuple[int, str]] = []

    def log(self, priority: int, message: str, **fields: object) -> None:
        self.lines.append((priority, message))
        super().log(priority, message, **fields)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[LocalTransport, Recorder]]:
    transport = LocalTransport(str(tmp_path / "grants.sock"))
    journal = Recorder()
    transport.journal = journal
    yield transport, journal
    transport.close()


def raw_client(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:  # the listen backlog is full: the registry is not accepting
            if time.monotonic() > deadline:
                sock.close()
                raise TimeoutError(f"registry did not accept within {timeout} s") from None
            time.sleep(0.01)
        except BaseException:
            sock.close()
            raise


def answers(path: str, timeout: float = 5.0) -> bool:
    """Does the registry still answer a new client (any reply) within `timeout`?"""
    try:
        with raw_client(path, timeout) as sock:
            sock.send(json.dumps({"op": "alloc-unbound", "domid": 1}).encode())
            data, fds, _, _ = socket.recv_fds(sock, 4096, 4)
    except OSError:  # timeout, or refused
        return False
    for fd in fds:
        os.close(fd)
    return bool(data)


HOSTILE = {
    "huge-float": b'{"op": "grant-table", "domid": 1e999}',
    "nested-10k": b"[" * 10_000,
    "nested-small": b'{"op": "alloc-unbound", "domid": ' + b"[" * 400 + b"]" * 400 + b"}",
    "not-json": b"\xff\xfe{",
    "array": b"[1, 2]",
    "nan": b'{"op": "alloc-unbound", "domid": NaN}',
    "float": b'{"op": "alloc-unbound", "domid": 5.0}',
    "bool": b'{"op": "alloc-unbound", "domid": true}',
    "string": b'{"op": "alloc-unbound", "domid": "5"}',
    "negative": b'{"op": "alloc-unbound", "domid": -1}',
    "reserved-domid": b'{"op": "alloc-unbound", "domid": 32752}',
    "big-int": b'{"op": "alloc-unbound", "domid": ' + b"9" * 400 + b"}",
    "duplicate-key": b'{"op": "alloc-unbound", "domid": 5, "domid": 6}',
    "extra-key": b'{"op": "alloc-unbound", "domid": 5, "port": 1}',
    "missing-key": b'{"op": "alloc-unbound"}',
    "unknown-op": b'{"op": "evtchn", "domid": 5, "port": 1}',
    "no-fd": b'{"op": "grant-table", "domid": 5}',
    "oversized": b'{"op": "alloc-unbound", "domid": 5, "pad": "' + b"x" * 70_000 + b'"}',
}


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_bad_request_is_refused_with_a_code_and_the_registry_keeps_serving(
    registry: tuple[LocalTransport, Recorder], payload: bytes
) -> None:
    transport, journal = registry
    with raw_client(transport.socket_path) as sock:
        sock.send(payload)
        try:
            reply = json.loads(sock.recv(4096))
        except TimeoutError:
            reply = None
        # the same connection is still served after its refusal
        assert answers(transport.socket_path), "the registry stopped answering after a bad request"
        assert reply is not None, "no reply to a bad request"
        assert reply["ok"] is False
        assert reply["code"] == "transport-message", reply
        sock.send(json.dumps({"op": "alloc-unbound", "domid": 5}).encode())
        data, fds, _, _ = socket.recv_fds(sock, 4096, 4)
        assert json.loads(data) == {"ok": True, "port": 1}
        assert len(fds) == 2
        for fd in fds:
            os.close(fd)
    assert any("refused a request" in line and "transport-message" in line for _, line in journal.lines)
    assert transport.failure is None
    with LocalFrontend(transport.socket_path, 9) as fe:  # and a real frontend still registers
        assert fe.gref_base == 0


def test_a_connection_acts_for_one_domain(registry: tuple[LocalTransport, Recorder]) -> None:
    transport, _ = registry
    client = LocalDomainClient(transport.socket_path, 4)
    try:
        client.alloc_unbound_port().close()
        client.domid = 5
        with pytest.raises(TransportError) as exc:
            client.alloc_unbound_port()
        assert exc.value.code == "transport-message"
        assert "acts for domain 4" in str(exc.value)
    finally:
        client.close()


def test_a_client_that_never_reads_its_replies_stalls_nobody(
    registry: tuple[LocalTransport, Recorder],
) -> None:
    transport, _ = registry
    hog = raw_client(transport.socket_path)
    hog.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    try:
        # Requests until our own send blocks: the registry's replies to us fill the socket first.
        while time.monotonic() < deadline and sent < 200_000:
            try:
                hog.send(b'{"op": "alloc-unbound", "domid": 1e999}')
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    hog.send(b"{}")
                except BlockingIOError:
                    break
            sent += 1
        assert answers(transport.socket_path), (
            f"registry stalled by a client that does not read ({sent} sent)"
        )
    finally:
        hog.close()
    deadline = time.monotonic() + 5
    while transport.stats().connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert transport.stats().connections == 0


def test_a_thousand_idle_connections_stall_nobody(registry: tuple[LocalTransport, Recorder]) -> None:
    transport, _ = registry
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"needs 4096 fds (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    idle: list[socket.socket] = []
    try:
        for _ in range(1100):  # each costs the registry one fd: past select()'s 1024
            idle.append(raw_client(transport.socket_path))
        assert answers(transport.socket_path), "registry stopped answering with 1100 idle connections"
        assert transport.failure is None
        assert transport.stats().connections >= 1100
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_registry_thread_never_dies_silently(
    registry: tuple[LocalTransport, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    transport, journal = registry

    def broken(*args: object) -> None:
        raise RuntimeError("injected registry bug")

    monkeypatch.setattr(transport, "_accept", broken)
    refused = None
    for _ in range(50):  # the first connection kills the thread; later ones are refused at once
        try:
            raw_client(transport.socket_path, timeout=1).close()
        except OSError as exc:
            refused = exc
            break
        time.sleep(0.05)
    assert isinstance(refused, ConnectionRefusedError), refused
    assert transport.failure == "RuntimeError: injected registry bug"
    errors = [line for prio, line in journal.lines if prio <= 3]
    assert any("registry died" in line and "injected registry bug" in line for line in errors), errors


def test_a_client_gives_up_on_a_registry_that_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(4)  # accepts into the backlog, never answers
    monkeypatch.setattr(local_mod, "CLIENT_TIMEOUT", 0.5, raising=False)
    outcome: list[BaseException | None] = []

    def register() -> None:
        fd = create_grant_memfd(1)
        try:
            client = LocalDomainClient(str(tmp_path / "mute.sock"), 3)
            try:
                client.register_grant_table(fd)
                outcome.append(None)
            finally:
                client.close()
        except BaseException as exc:
            outcome.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=register, daemon=True)
    thread.start()
    thread.join(5)
    mute.close()  # also ends a client that waits forever (the code before the fix)
    thread.join(5)
    assert outcome, "the client still waits"
    assert isinstance(outcome[0], TransportError), outcome
    assert "did not answer" in str(outcome[0])


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


def test_departed_frontends_are_unregistered(registry: tuple[LocalTransport, Recorder]) -> None:
    transport, _ = registry
    fds, maps = _fds(), _memfd_maps()
    frontends = [LocalFrontend(transport.socket_path, 20 + i % 3) for i in range(12)]
    stats = transport.stats()
    assert (stats.connections, stats.domains, stats.ports) == (12, 3, 12)
    for fe in frontends:
        fe.close()
    deadline = time.monotonic() + 5
    while transport.stats().connections and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = transport.stats()
    assert (stats.connections, stats.domains, stats.grant_pages, stats.ports) == (0, 0, 0, 0)
    assert _fds() == fds, "fds left behind by departed frontends"
    assert _memfd_maps() == maps, "grant tables still mapped after their frontends left"


def test_several_disks_of_one_domain_each_read_their_own_data(
    registry: tuple[LocalTransport, Recorder], tmp_path: Path
) -> None:
    """Three disks of domain 7 register (grant table and port) before any handshake, as a guest
    bringing up three blkfronts at once does: each ring must reach its own disk. Before grant refs
    and ports were unique per domain, the last registration replaced the others: two rings never
    got an answer and the third read another disk's data."""
    transport, _ = registry
    fills = [b"A", b"B", b"C"]
    targets, frontends, planes = [], [], []
    try:
        for fill in fills:
            path = tmp_path / f"disk-{fill.decode()}.img"
            path.write_bytes(fill * (1 << 20))
            targets.append(DeviceTarget.from_fd(os.open(path, os.O_RDWR | os.O_CLOEXEC)))
        frontends = [LocalFrontend(transport.socket_path, 7, data_pages=8) for _ in fills]
        for fe, target in zip(frontends, targets, strict=True):
            dp = DataPlane(transport, 7, ring_params_of(fe), target, target.limits(), workers=1)
            planes.append(dp)
            dp.start()
        for fe, fill in zip(frontends, fills, strict=True):
            got = fe.read(0, 4096, timeout=5)
            assert got == fill * 4096, f"disk {fill!r} read {got[:1]!r}: another disk's data"
            assert fe.write(8, fill.lower() * 4096, timeout=5) == blkif.RSP_OKAY
        for fe, fill in zip(frontends, fills, strict=True):
            assert fe.read(8, 4096, timeout=5) == fill.lower() * 4096
        ports = [fe.evtchn.local_port for fe in frontends]
        assert len(set(ports)) == 3, f"ports collide within the domain: {ports}"
        bases = [fe.gref_base for fe in frontends]
        assert bases[0] == 0, bases
        assert len(set(bases)) == 3, bases
    finally:
        for dp in planes:
            assert dp.stop(timeout=10)
        for fe in frontends:
            fe.close()
        for target in targets:
            os.close(target.fd)
