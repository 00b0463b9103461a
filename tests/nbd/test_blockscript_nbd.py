"""NBD targets through the real block script (`add` run as libxl runs it, real xenstored).

The host kernel has no nbd module, so here the script gets as far as the kernel can take it: the
URI is parsed, the server reached and the export negotiated in userspace, then NBD_CMD_CONNECT
fails with the coded `nbd-device` error and its fix. Each failure is a coded hotplug-error for
libxl with nothing published and the server's connection closed. The kernel-NBD success path
runs in the dm lane's guest (tests/dm/scenarios.py: script_nbd_kernel)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.fixtures.libxl import Libxl
from tests.fixtures.nbd import NbdServerFactory
from tests.flows.test_bad_input import assert_clean_failure
from xenblockctl.blockscript.target import parse_target
from xenblockctl.nbd.errors import NbdError

pytestmark = [pytest.mark.root]


def test_nbd_uris_are_targets() -> None:
    t = parse_target("nbd+unix:///disk?socket=/run/x.sock")
    assert t.nbd is not None
    assert t.path == "nbd+unix:///disk?socket=/run/x.sock"
    assert parse_target("NBD://Host/d").path == "nbd://host:10809/d"
    with pytest.raises(NbdError) as info:
        parse_target("nbds://h/d")
    assert info.value.code == "nbd-uri-unsupported"
    assert parse_target("/srv/nbd://x").nbd is None  # a path that merely contains the text


def _connections(server_pid: int) -> int:
    """Established unix-socket connections the server process holds (its listener excluded)."""
    fds = Path(f"/proc/{server_pid}/fd")
    return sum(1 for fd in fds.iterdir() if "socket:" in str(fd.readlink())) - 1


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ("nbd+unix:///disk?socket=relative.sock", "nbd-uri-invalid"),
        ("nbds://127.0.0.1/disk", "nbd-uri-unsupported"),
        ("nbd+unix:///disk?socket=/nonexistent/x.sock", "nbd-unreachable"),
    ],
)
def test_bad_nbd_targets_fail_cleanly(libxl: Libxl, params: str, code: str) -> None:
    be = libxl.create_backend(5, 51712, params, "w")
    assert_clean_failure(libxl, be, libxl.run("add", be, XENBLOCKCTL_HANDOFF_TIMEOUT="1"), code)


def test_refused_export_fails_cleanly(libxl: Libxl, nbd_server: NbdServerFactory) -> None:
    server = nbd_server("qemu-nbd", export="disk")
    be = libxl.create_backend(5, 51712, f"nbd+unix:///other?socket={server.socket_path}", "w")
    assert_clean_failure(libxl, be, libxl.run("add", be), "nbd-export-refused")


def test_without_kernel_nbd_the_add_fails_with_the_fix_and_closes_the_connection(
    libxl: Libxl, nbd_server: NbdServerFactory
) -> None:
    if Path("/sys/module/nbd").exists():
        pytest.skip("this kernel has nbd: the dm lane's scenario covers the success path")
    server = nbd_server("nbdkit", extra=["memory", "size=16M"])
    # kernel blkback's backend (no `opened`=0): the engine would serve the export itself
    # (tests/nbd/test_engine_served.py)
    be = libxl.create_backend(5, 51712, server.uri, "w", engine=False)
    result = libxl.run("add", be, XENBLOCKCTL_HANDOFF_TIMEOUT="1")
    assert_clean_failure(libxl, be, result, "nbd-device")
    assert "modprobe nbd nbds_max=0" in libxl.nodes(be)["hotplug-error"]
    deadline = time.monotonic() + 5
    while _connections(server.proc.pid) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _connections(server.proc.pid) == 0, "the script left its NBD connection open"
    with socket.socket(socket.AF_UNIX) as s:  # the server still serves others
        s.connect(str(server.socket_path))
