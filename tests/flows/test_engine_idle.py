"""An idle engine sleeps (issue 20): its loop waits for xenstore events until the next rescan or a
device's deadline, and wake() and stop() interrupt that wait instead of the loop polling for them
every 0.2 s. Under TCG the polling cost dom0 2-3 % of a vCPU, which the guest's vCPU pays for
(bench/README.md, engine_connect)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.engine import InprocEngine, attach_guest, wait_for
from tests.fixtures.kernel import ImageFactory
from tests.fixtures.libxl import Libxl
from xenblockctl.backend import engine as engine_module
from xenblockctl.toolstack.daemons import ReadyDaemon

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def waits(engine_inproc: InprocEngine) -> Iterator[list[float]]:
    """The timeout of every wait the engine's loop starts (drain_watches' zero waits left out)."""
    seen: list[float] = []
    store: Any = engine_inproc.engine.store
    wait_watch = store.wait_watch

    def counting(timeout: float | None = None) -> Any:
        if timeout:
            seen.append(timeout)
        return wait_watch(timeout)

    store.wait_watch = counting
    yield seen
    del store.wait_watch


def test_an_idle_engine_sleeps_until_its_next_rescan(engine_inproc: InprocEngine, waits: list[float]) -> None:
    time.sleep(0.3)  # the wait in progress when the counting began
    before = len(waits)
    time.sleep(2.0)
    # one wait per rescan interval (5 s), and the one a rescan inside these 2 s starts
    assert len(waits) - before <= 1, waits[before:]


def test_wake_and_stop_interrupt_the_wait(
    libxl: Libxl,
    engine_inproc: InprocEngine,
    make_image: ImageFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no rescan due for a minute, a broken ring (the data plane's wake()) still fails the
    device at once, and stop() ends the loop at once."""
    monkeypatch.setattr(engine_module, "RESCAN_INTERVAL", 60.0)
    be, guest = attach_guest(libxl, engine_inproc.transport, make_image(), 41)
    try:
        time.sleep(0.5)  # the loop asleep again, its next rescan a minute away
        dev = engine_inproc.device(41)
        start = time.monotonic()
        assert dev.dataplane is not None
        dev._broken_callback(None)("test: ring broken")  # what the ring thread calls
        assert wait_for(lambda: libxl.nodes(be).get("state") == "5", 5), libxl.nodes(be)
        assert time.monotonic() - start < 2.0
    finally:
        # a failed device: libxl's detach without the guest's handshake (it saw the error node)
        libxl.store.write_many({be.node("online"): "0", be.node("state"): "5"})
        guest.close()
        guest.store.close()
        assert wait_for(lambda: libxl.nodes(be).get("state") == "6"), libxl.nodes(be)
        assert libxl.run("remove", be).returncode == 0
    engine = engine_inproc.engine
    loop = next(t for t in threading.enumerate() if t.name == "xbc-test-engine")
    time.sleep(0.5)
    start = time.monotonic()
    engine.stop()
    loop.join(5)
    assert not loop.is_alive()
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_stops_an_idle_engine_at_once(
    libxl: Libxl, tmp_path: Path, transport_path: str, attempt: int
) -> None:
    """The signal handler's stop() interrupts the wait it interrupted: the engine exits without
    waiting for its next rescan (up to 5 s later), each of three times."""
    argv = [sys.executable, "-m", "xenblockctl", "backend", "--transport", f"local:{transport_path}"]
    argv += ["--xenstore", libxl.xenstored.socket_path]
    daemon = ReadyDaemon("engine", argv, "engine ready", tmp_path / "engine.log", timeout=60, cwd=REPO)
    time.sleep(0.5)  # asleep in its wait
    start = time.monotonic()
    status = daemon.stop()
    assert status == 0, daemon.log_path.read_text()[-2000:]
    assert time.monotonic() - start < 1.5, daemon.log_path.read_text()[-2000:]
