"""Third-party clients against the embedded xenstored: pyxs 0.4.1 and Debian's xenstore-* tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import pyxs

from tests.fixtures.xenstore import EmbeddedXenstored


@pytest.fixture
def client(xenstored: EmbeddedXenstored) -> Iterator[pyxs.Client]:
    with pyxs.Client(unix_socket_path=xenstored.socket_path) as c:
        yield c


def test_pyxs_basic_operations(client: pyxs.Client) -> None:
    client.write(b"/vm/1/name", b"guest")
    assert client.read(b"/vm/1/name") == b"guest"
    assert client.list(b"/vm/1") == [b"name"]
    assert client.exists(b"/vm/1/name")
    client.mkdir(b"/vm/1/dir")
    assert sorted(client.list(b"/vm/1")) == [b"dir", b"name"]
    client.set_perms(b"/vm/1/name", [b"n0", b"r5"])
    assert client.get_perms(b"/vm/1/name") == [b"n0", b"r5"]
    client.delete(b"/vm/1")
    assert not client.exists(b"/vm/1")
    assert client.get_domain_path(7) == b"/local/domain/7"
    with pytest.raises(pyxs.PyXSError) as excinfo:
        client.read(b"/vm/missing")
    assert excinfo.value.args[0] == 2  # ENOENT, mapped from the wire name


def test_pyxs_transactions_and_eagain(xenstored: EmbeddedXenstored, client: pyxs.Client) -> None:
    client.write(b"/counter", b"0")
    client.transaction()
    assert client.read(b"/counter") == b"0"
    with pyxs.Client(unix_socket_path=xenstored.socket_path) as other:
        other.write(b"/counter", b"5")
    client.write(b"/counter", b"1")
    assert client.commit() is False  # EAGAIN
    client.transaction()
    value = int(client.read(b"/counter"))
    client.write(b"/counter", str(value + 1).encode())
    assert client.commit() is True
    assert client.read(b"/counter") == b"6"


def test_pyxs_monitor_receives_events(client: pyxs.Client) -> None:
    monitor = client.monitor()
    try:
        monitor.watch(b"/mon", b"tok")
        assert monitor.events.get(timeout=5) == (b"/mon", b"tok")
        client.write(b"/mon/child", b"x")
        assert monitor.events.get(timeout=5) == (b"/mon/child", b"tok")
        monitor.watch(b"@introduceDomain", b"intro")
        assert monitor.events.get(timeout=5) == (b"@introduceDomain", b"intro")
        client.introduce_domain(9, 1, 2)
        assert monitor.events.get(timeout=5) == (b"@introduceDomain", b"intro")
        assert client.is_domain_introduced(9)
    finally:
        monitor.close()


XENSTORE_TOOLS = ("xenstore-write", "xenstore-read", "xenstore-ls", "xenstore-rm", "xenstore-list")
missing_tools = [t for t in XENSTORE_TOOLS if shutil.which(t) is None]


@pytest.mark.skipif(bool(missing_tools), reason=f"Debian xenstore-utils not installed: {missing_tools}")
def test_xenstore_utils_cli_against_embedded_daemon(xenstored: EmbeddedXenstored) -> None:
    env = {**os.environ, **xenstored.env}

    def run(*argv: str) -> str:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10, check=False)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result.stdout

    base = f"/cli/{uuid.uuid4().hex[:8]}"
    # Several pairs: libxenstore runs them in one transaction with EAGAIN retry.
    run("xenstore-write", f"{base}/a", "one", f"{base}/b", "two")
    assert run("xenstore-read", f"{base}/a", f"{base}/b") == "one\ntwo\n"
    assert run("xenstore-list", base) == "a\nb\n"
    assert run("xenstore-ls", base) == 'a = "one"\nb = "two"\n'
    run("xenstore-chmod", f"{base}/a", "n0", "r5")
    assert "(n0,r5)" in run("xenstore-ls", "-p", base)
    run("xenstore-rm", f"{base}/a")
    assert run("xenstore-list", base) == "b\n"
    missing = subprocess.run(
        ["xenstore-read", f"{base}/a"], env=env, capture_output=True, text=True, timeout=10, check=False
    )
    assert missing.returncode != 0
    assert "couldn't read path" in missing.stderr
