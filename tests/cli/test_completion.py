"""TAB completion through the real bash completion function: the shipped completions/xenblockctl.bash
is sourced, registered (`complete -p`), and called with COMP_WORDS/COMP_CWORD as bash sets them;
COMPREPLY is what the user would be offered. The function runs the installed `xenblockctl`, which
asks the embedded xenstored for domains and vdevs."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from xenblockctl.toolstack.vbd_dirs import DiskSpec, write_vbd
from xenblockctl.xenstore.client import XenStore
from xenblockctl.xenstore.vdev import Vdev

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "completions" / "xenblockctl.bash"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")
Completer = Callable[..., list[str]]


def _bash(env: dict[str, str], script: str) -> subprocess.CompletedProcess[str]:
    assert BASH is not None
    return subprocess.run(
        [BASH, "--norc", "--noprofile", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def complete(cli_env: dict[str, str]) -> Completer:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **cli_env, "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def run(line: str, *, extra_env: dict[str, str] | None = None) -> list[str]:
        """COMPREPLY for the command line `line` with the cursor at its end (a trailing space
        starts a new, empty word)."""
        words = line.split()
        if line.endswith(" "):
            words.append("")
        script = (
            f"source {shlex.quote(str(SCRIPT))}\n"
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\n"
            "_xenblockctl_completion xenblockctl\n"
            "printf '%s\\n' \"${COMPREPLY[@]}\"\n"
        )
        result = _bash({**env, **(extra_env or {})}, script)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr
        return [w for w in result.stdout.split("\n") if w]

    return run


def test_the_function_is_registered(cli_env: dict[str, str]) -> None:
    result = _bash(dict(os.environ), f"source {shlex.quote(str(SCRIPT))}; complete -p xenblockctl")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "complete -o nosort -F _xenblockctl_completion xenblockctl"


def test_commands(complete: Completer) -> None:
    assert complete("xenblockctl de") == ["detach"]
    assert complete("xenblockctl li") == ["list"]  # aliases (ls, l) are accepted, not offered


def test_file_names_for_attach_target_and_identify_path(complete: Completer, tmp_path: Path) -> None:
    for name in ("disk-a.img", "disk-b.img", "other.img"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "disks").mkdir()
    expected = [str(tmp_path / n) for n in ("disk-a.img", "disk-b.img", "disks")]
    assert sorted(complete(f"xenblockctl attach guest5 {tmp_path}/disk")) == expected
    assert sorted(complete(f"xenblockctl identify {tmp_path}/disk")) == expected
    assert complete(f"xenblockctl identify --writable {tmp_path}/oth") == [str(tmp_path / "other.img")]


def test_domain_names_and_ids(complete: Completer) -> None:
    assert complete("xenblockctl attach g") == ["guest5"]
    assert complete("xenblockctl at g") == ["guest5"]
    assert complete("xenblockctl detach Dom") == ["Domain-0"]
    assert complete("xenblockctl show ") == ["Domain-0", "guest5", "0", "5"]
    assert complete("xenblockctl list --domain gu") == ["guest5"]
    assert complete("xenblockctl attach guest5 /srv/a.img --backend-domain Do") == ["Domain-0"]


def test_vdevs_of_the_domain(complete: Completer, cli_store: XenStore) -> None:
    for vdev in ("xvda", "xvdc", "sdb"):
        write_vbd(cli_store, DiskSpec(5, Vdev.parse(vdev), f"/srv/{vdev}.img", "w"))
    assert complete("xenblockctl detach guest5 ") == ["sdb", "xvda", "xvdc"]  # by device number
    assert complete("xenblockctl detach guest5 xvd") == ["xvda", "xvdc"]
    assert complete("xenblockctl show 5 s") == ["sdb"]
    assert complete("xenblockctl show 0 ") == []


def test_no_xenstored_offers_nothing_and_says_nothing(complete: Completer) -> None:
    gone = {"XENSTORED_PATH": f"/tmp/no-such-xenstored-{os.getpid()}"}
    assert complete("xenblockctl attach g", extra_env=gone) == []
    assert complete("xenblockctl detach guest5 ", extra_env=gone) == []
