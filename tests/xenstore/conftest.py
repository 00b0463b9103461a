"""`link`: run a client test module over both of the client's links (xenblockctl/xenstore/link.py).

    pytestmark = pytest.mark.usefixtures("link")

makes every `XenStore.connect()` of the module's tests use the threaded link (pyxs's reader
thread; engine, CLI) in one run and the synchronous one (no thread; the block script) in the
other, so both answer to the same tests. Tests that share one store between threads (only the
threaded link allows that) ask for `threaded_only`.

`fake_peer(behaviour)`: a scripted xenstored (test_client_faults.FakePeer) on a socket of its own,
closed at teardown; for the client's fault and framing tests."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest

from tests.xenstore.test_client_faults import Behaviour, FakePeer
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
