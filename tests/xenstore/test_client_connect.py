"""Where the client connects: libxenstore's order, explicit overrides, a full listen backlog."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.cxenstored import Daemon
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.endpoints import Endpoint, default_endpoints, endpoint_for
from xenblockctl.xenstore.errors import XenstoreInvalid, XenstoreUnavailable

#: Every test runs over both links: threaded (pyxs reader) and synchronous (the block script's).
pytestmark = pytest.mark.usefixtures("link")


@pytest.mark.parametrize(
    ("env", "socket"),
    [
        ({}, "/run/xenstored/socket"),
        ({"XENSTORED_RUNDIR": "/srv/xs"}, "/srv/xs/socket"),
        ({"XENSTORED_PATH": "/p/sock", "XENSTORED_RUNDIR": "/srv/xs"}, "/p/sock"),
        ({"XENSTORED_PATH": "", "XENSTORED_RUNDIR": "/srv/xs"}, "/srv/xs/socket"),  # empty = unset
    ],
)
def test_endpoint_order_follows_libxenstore(env: dict[str, str], socket: str) -> None:
    endpoints = default_endpoints(env)
    assert endpoints[0] == Endpoint("socket", socket)
    assert endpoints[1].kind == "xenbus"
    assert endpoints[1].path in ("/dev/xen/xenbus", "/proc/xen/xenbus")
    assert len(endpoints) == 2  # no fall-through to the host's socket when XENSTORED_PATH is set


def test_explicit_character_device_means_xenbus() -> None:
    assert endpoint_for("/dev/null") == Endpoint("xenbus", "/dev/null")
    assert endpoint_for("/tmp/no-such-socket") == Endpoint("socket", "/tmp/no-such-socket")


@pytest.fixture
def rundir(daemon: Daemon) -> Iterator[Path]:
    """A directory whose `socket` is the daemon's socket, as $XENSTORED_RUNDIR expects."""
    path = Path(tempfile.mkdtemp(prefix="xbc-rundir-"))
    (path / "socket").symlink_to(daemon.socket)
    yield path
    shutil.rmtree(path)


def test_connects_through_xenstored_rundir(rundir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENSTORED_PATH")
    monkeypatch.setenv("XENSTORED_RUNDIR", str(rundir))
    with XenStore.connect(timeout=5) as store:
        assert store.endpoint == Endpoint("socket", str(rundir / "socket"))
        store.write("/via/rundir", "1")
        assert store.read("/via/rundir") == "1"


def test_explicit_path_overrides_the_environment(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENSTORED_PATH", "/nonexistent/socket")
    with pytest.raises(XenstoreUnavailable) as info:
        XenStore.connect(timeout=1)
    assert "/nonexistent/socket" in str(info.value)
    with XenStore.connect(str(daemon.socket), timeout=5) as store:
        assert store.get_domain_path(0) == "/local/domain/0"


def test_many_clients_connect_at_once(daemon: Daemon) -> None:
    """Parallel hotplug scripts at VM start: C xenstored's listen backlog is 1, and a socket with
    a timeout gets EAGAIN from connect() instead of waiting. Every client must still get in."""
    failures: list[BaseException] = []
    start = threading.Barrier(16)

    def client(i: int) -> None:
        try:
            start.wait(10)
            with XenStore.connect(timeout=10) as store:
                store.write(f"/par/{i}", str(i))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    with XenStore.connect(timeout=5) as store:
        assert sorted(store.ls("/par"), key=int) == [str(i) for i in range(16)]


def test_timeout_must_be_positive() -> None:
    with pytest.raises(XenstoreInvalid):
        XenStore.connect("/nonexistent", timeout=0)


def test_import_does_not_start_threads_or_touch_xen() -> None:
    # The block script imports the client on every VM start; importing must be side-effect free.
    code = (
        "import threading, sys; import xenblockctl.xenstore.client as c; "
        "assert threading.active_count() == 1; assert 'click' not in sys.modules; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr
