"""Host facts doctor relies on, against a fabricated /proc (the real one is shared with every
other process on the machine, so its answers cannot be pinned down in a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenblockctl.toolstack import host


@pytest.mark.parametrize(
    ("argv", "engine"),
    [
        (["/usr/bin/python3", "/usr/local/bin/xenblockctl", "backend", "--transport", "xen"], True),
        (["python", "-m", "xenblockctl", "--debug", "backend"], True),
        (["xenblockctl", "identify", "backend"], False),
        (["python", "-m", "xenblockctl", "xenstored", "--socket", "/run/x"], False),
        (["/usr/bin/backend", "xenblockctl"], False),
        ([], False),
    ],
)
def test_engine_argv(argv: list[str], engine: bool) -> None:
    assert host.is_engine_argv(argv) is engine


def _process(proc: Path, pid: int, argv: list[str], env: dict[str, str] | None) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    if env is not None:
        (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))


def test_engines_are_matched_to_their_xenstored(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    ours, theirs = tmp_path / "ours.sock", tmp_path / "theirs.sock"
    _process(proc, 10, ["python", "-m", "xenblockctl", "backend"], {"XENSTORED_PATH": str(ours)})
    _process(proc, 11, ["python", "-m", "xenblockctl", "backend"], {"XENSTORED_PATH": str(theirs)})
    _process(proc, 12, ["xenblockctl", "backend", "--xenstore", str(ours)], {})
    _process(proc, 13, ["xenblockctl", "backend"], None)  # environ unreadable: unknown store
    _process(proc, 14, ["python", "-m", "xenblockctl", "list"], {"XENSTORED_PATH": str(ours)})
    (proc / "self").mkdir()
    assert host.engine_pids(str(proc)) == [10, 11, 12, 13]
    assert host.engine_pids(str(proc), xenstore_socket=str(ours)) == [10, 12]
    assert host.engine_pids(str(proc), xenstore_socket="/run/xenstored/socket") == []
    _process(proc, 15, ["xenblockctl", "backend"], {"PATH": "/bin"})  # libxenstore's default socket
    assert host.engine_pids(str(proc), xenstore_socket="/run/xenstored/socket") == [15]
