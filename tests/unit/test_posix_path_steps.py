"""The hotplug path never imports os (tests/lint/test_hotplug_imports.py), so the few os.path and
os.environ steps it needs are spelled with posix (xenblockctl/pathsteps.py, environment.py): each
must give what the os spelling gave."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from xenblockctl import config, pathsteps
from xenblockctl.blockscript import locks
from xenblockctl.environment import Environment
from xenblockctl.journal import Journal


@pytest.mark.parametrize(
    "main", ["/etc/xenblockctl/xenblockctl.conf", "/x.conf", "x.conf", "a/b/x.conf", "/etc/a/", "/"]
)
def test_the_dropin_directory_is_os_paths(main: str) -> None:
    assert config.paths({config.PATH_ENV: main}) == (
        main,
        os.path.join(os.path.dirname(main), config.DROPIN_DIR),
    )


def test_only_a_regular_main_file_is_read(tmp_path: Path) -> None:
    for name, make in (("dir", Path.mkdir), ("file", Path.touch)):
        make(tmp_path / name)
    assert config.config_files({config.PATH_ENV: str(tmp_path / "dir")}) == []
    assert config.config_files({config.PATH_ENV: str(tmp_path / "missing")}) == []
    assert config.config_files({config.PATH_ENV: str(tmp_path / "file")}) == [str(tmp_path / "file")]


def test_the_lock_directory_is_made_as_os_makedirs_made_it(tmp_path: Path) -> None:
    lock_dir = tmp_path / "a" / "b" / "locks"
    old = os.umask(0o022)
    try:
        with locks.target_lock("k", timeout=1, lock_dir=f"{lock_dir}/"):
            pass
        with locks.target_lock("k", timeout=1, lock_dir=str(lock_dir)):  # exists: reused
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755, "parents: the default mode"
    assert (lock_dir / "k").is_file()
    (tmp_path / "file").touch()
    with (
        pytest.raises(NotADirectoryError),
        locks.target_lock("k", timeout=1, lock_dir=str(tmp_path / "file")),
    ):
        pass


def _kinds(tmp_path: Path) -> list[str]:
    """A directory, a file, a missing path, a device, a dangling and a good link, one below a file,
    one we may not search (as root, stat gets through) and a NUL."""
    (tmp_path / "d").mkdir()
    (tmp_path / "f").touch()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    return [
        *(str(tmp_path / n) for n in ("d", "d/", "f", "missing", "dangling", "link", "f/x")),
        "/dev/null",
        "/proc/1/root/x",
        "a\0b",
    ]


@pytest.mark.parametrize(
    ("step", "spelling"), [("exists", os.path.exists), ("is_dir", os.path.isdir), ("is_file", os.path.isfile)]
)
def test_type_and_existence_are_os_paths(tmp_path: Path, step: str, spelling: Callable[[str], bool]) -> None:
    for path in _kinds(tmp_path):
        assert getattr(pathsteps, step)(path) == spelling(path), path


@pytest.mark.parametrize(
    "path", ["/etc/xen/scripts/block-xenblockctl", "block-xenblockctl", "a/b/", "/", "", "a//b"]
)
def test_basename_is_os_paths(path: str) -> None:
    assert pathsteps.basename(path) == os.path.basename(path)


def test_the_journal_finds_its_socket_without_os(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xenblockctl.journal.JOURNAL_SOCKET", str(tmp_path / "missing"))
    monkeypatch.setattr("xenblockctl.journal.SYSLOG_SOCKET", str(tmp_path))
    assert Journal("t", stderr=False)._target == str(tmp_path)
    monkeypatch.setattr("xenblockctl.journal.SYSLOG_SOCKET", str(tmp_path / "missing too"))
    assert Journal("t", stderr=False)._target is None


def test_the_process_environment_is_decoded_as_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENBLOCKCTL_TEST_UNDECODABLE", "caf\udce9")  # a non-UTF-8 byte, as os keeps it
    assert Environment.of_process().variables == dict(os.environ)
