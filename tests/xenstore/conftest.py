"""`link`: run a client test module over both of the client's links (xenblockctl/xenstore/link.py).

    pytestmark = pytest.mark.usefixtures("link")

makes every `XenStore.connect()` of the module's tests use the threaded link (pyxs's reader
thread; engine, CLI) in one run and the synchronous one (no thread; the block script) in the
other, so both answer to the same tests. Tests that share one store between threads (only the
threaded link allows that) ask for `threaded_only`.

`fake_peer(behaviour)`: a scripted xenstored (test_client_faults.FakePeer) on a socket of its own,
closed at teardown; for the client's fault and framing tests.

`c`, `w`: two raw wire clients (tests.fixtures.xenstore.RawClient) of the session daemon, for the
server's node, watch and transaction tests; `base`: a unique directory `c` makes there, removed
after the test (the daemon is shared, so every test works below a path of its own)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.xenstore import EmbeddedXenstored, RawClient
from tests.xenstore.test_client_faults import Behaviour, FakePeer
from xenblockctl.xenstore import wire
from xenblockctl.xenstore.client import XenStore


@pytest.fixture(params=["threaded", "synchronous"])
def link(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "synchronous":
        connect = XenStore.connect.__func__  # type: ignore[attr-defined]
        monkeypatch.setattr(XenStore, "connect", classmethod(functools.partial(connect, synchronous=True)))
    return str(request.param)


@pytest.fixture
def threaded_only(link: str) -> None:
    if link != "threaded":
        pytest.skip("shares one store between threads: only the threaded link allows that")


@pytest.fixture
def fake_peer() -> Iterator[Callable[[Behaviour], FakePeer]]:
    peers: list[FakePeer] = []

    def start(behaviour: Behaviour) -> FakePeer:
        peer = FakePeer(behaviour)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()


@pytest.fixture
def c(xenstored_session: EmbeddedXenstored) -> Iterator[RawClient]:
    """A raw client of the session daemon: the one that makes `base`."""
    with RawClient(xenstored_session.socket_path) as client:
        yield client


@pytest.fixture
def w(xenstored_session: EmbeddedXenstored) -> Iterator[RawClient]:
    """A second raw client of the session daemon (a watcher, the other side of a transaction)."""
    with RawClient(xenstored_session.socket_path) as client:
        yield client


@pytest.fixture
def base(c: RawClient) -> Iterator[str]:
    """A unique directory per test in the shared daemon, made by `c` and removed afterwards."""
    path = f"/test/{uuid.uuid4().hex}"
    c.call(wire.MKDIR, path.encode())
    yield path
    c.call(wire.RM, path.encode())
