"""Debian's `xenstore-*` CLIs (libxenstore) against both daemons, cross-checked with our client.

Admins and the stock Xen hotplug scripts use these tools; they must work unchanged against the
embedded daemon. Outputs below were measured with xenstore-utils 4.17 against C xenstored."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.cxenstored import Daemon, Unavailable, find_tools
from xenblockctl.xenstore.client import XenStore

Run = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture(scope="module")
def cli_env() -> dict[str, str]:
    """Where the CLIs are: installed (xenstore-utils) or in the extracted .deb cache."""
    if shutil.which("xenstore-read"):
        return {}
    try:
        tools = find_tools()
    except Unavailable as exc:
        pytest.skip(f"xenstore-utils unavailable: {exc}")
    if tools.cli("xenstore-read") is None:
        pytest.skip("xenstore-utils not installed (.ci/apt-packages)")
    assert tools.bindir is not None
    env = {"PATH": f"{tools.bindir}:{os.environ.get('PATH', '')}"}
    if tools.libdir is not None:
        env["LD_LIBRARY_PATH"] = str(tools.libdir)
    return env


@pytest.fixture
def run(daemon: Daemon, cli_env: dict[str, str]) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
    env.update(cli_env)
    env["XENSTORED_PATH"] = str(daemon.socket)

    def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(list(argv), env=env, capture_output=True, timeout=30, check=False)

    return run


@pytest.fixture
def store(daemon: Daemon) -> Iterator[XenStore]:
    with XenStore.connect(str(daemon.socket), timeout=5) as s:
        yield s


def test_write_several_and_read_back(run: Run, store: XenStore) -> None:
    # several pairs run in one transaction (xenstore_client.c); an empty value is valid
    assert run("xenstore-write", "/cli/a", "1", "/cli/b", "", "/cli/c/d", "x y").returncode == 0
    assert store.read_dir("/cli") == {"a": "1", "b": "", "c": ""}
    assert store.read("/cli/c/d") == "x y"
    result = run("xenstore-read", "/cli/a", "/cli/b", "/cli/c/d")
    assert (result.returncode, result.stdout) == (0, b"1\n\nx y\n")


def test_read_missing(run: Run) -> None:
    result = run("xenstore-read", "/cli/missing")
    assert result.returncode == 1
    assert b"couldn't read path /cli/missing" in result.stderr


def test_ls_and_list(run: Run, store: XenStore) -> None:
    store.write_many({"/cli/a": "1", "/cli/b": "", "/cli/c/d": "x y"})
    result = run("xenstore-ls", "-f", "/cli")
    assert result.stdout == b'/cli/a = "1"\n/cli/b = ""\n/cli/c = ""\n/cli/c/d = "x y"\n'
    assert run("xenstore-ls", "/cli").stdout == b'a = "1"\nb = ""\nc = ""\n d = "x y"\n'
    assert run("xenstore-list", "/cli").stdout == b"a\nb\nc\n"
    store.set_perms("/cli/a", ["n0", "r5"])
    perms = run("xenstore-ls", "-p", "/cli").stdout.decode().splitlines()
    assert perms[0].startswith('a = "1" ')
    assert perms[0].endswith("(n0,r5)")


def test_escaped_values(run: Run, store: XenStore) -> None:
    store.write_bytes("/cli/bin", b"a\nb\x01\x80\\")
    assert run("xenstore-read", "/cli/bin").stdout == b"a\\nb\\001\\x80\\\\\n"
    assert run("xenstore-read", "-R", "/cli/bin").stdout == b"a\nb\x01\x80\\"
    assert run("xenstore-write", "/cli/esc", "a\\nb\\x01").returncode == 0
    assert store.read_bytes("/cli/esc") == b"a\nb\x01"


def test_exists_and_rm(run: Run, store: XenStore) -> None:
    store.write("/cli/a", "1")
    store.write("/cli/c/d", "2")
    assert run("xenstore-exists", "/cli/a").returncode == 0
    assert run("xenstore-exists", "/cli/zz").returncode == 1
    assert run("xenstore-rm", "/cli/a").returncode == 0
    assert not store.exists("/cli/a")
    assert run("xenstore-rm", "/cli/zz").returncode == 0  # missing node, parent exists
    result = run("xenstore-rm", "/zz/zz")
    assert result.returncode == 1
    assert b"could not remove path /zz/zz" in result.stderr
    assert run("xenstore-rm", "-t", "/cli/c/d").returncode == 0  # -t also removes emptied parents
    assert not store.exists("/cli/c")


def test_relative_paths(run: Run, store: XenStore) -> None:
    assert run("xenstore-write", "backend/vbd/5/51712/hotplug-status", "connected").returncode == 0
    assert store.read("/local/domain/0/backend/vbd/5/51712/hotplug-status") == "connected"
    assert run("xenstore-read", "backend/vbd/5/51712/hotplug-status").stdout == b"connected\n"


def test_cli_and_client_agree_on_the_whole_tree(run: Run, store: XenStore) -> None:
    store.write_many({"/agree/x": "1", "/agree/y/z": "two words", "/agree/e": ""})
    listed = run("xenstore-ls", "-f", "/agree").stdout.decode().splitlines()
    ours = []
    for name in store.ls("/agree"):
        ours.append(f'/agree/{name} = "{store.read(f"/agree/{name}")}"')
        ours.extend(
            f'/agree/{name}/{c} = "{store.read(f"/agree/{name}/{c}")}"' for c in store.ls(f"/agree/{name}")
        )
    assert listed == ours
