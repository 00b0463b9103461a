"""tests/flows/test_kill.py's own tests, unchanged, with libxl's script run as the C client of the
warm server (tests/fixtures/warm.py). The harness's kill of a paused process finds the worker (a
fork of the server, whose command line names `block-xenblockctl.py`) and waits until it is gone,
as it does for the AUTOCLEAR child, so each invariant is checked after the worker's last close."""

from __future__ import annotations

import pytest

from tests.fixtures.warm import WarmServer
from tests.flows.test_kill import *  # noqa: F403 (every test of test_kill.py, collected here again)


@pytest.fixture(autouse=True)
def _through_the_server(warm: WarmServer) -> WarmServer:
    return warm
