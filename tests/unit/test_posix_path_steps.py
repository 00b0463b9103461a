"""The hotplug path never imports os (tests/lint/test_hotplug_imports.py), so the few os.path and
os.environ steps it needs are spelled with posix: each must give what the os spelling gave."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from xenblockctl import config
from xenblockctl.blockscript import handoff, locks
from xenblockctl.environment import Environment
from xenblockctl.journal import Journal
from xenblockctl.xenstore import endpoints


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


def test_existence_checks_are_os_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").touch()
    for path in (tmp_path / "d", tmp_path / "f", tmp_path / "missing", "/dev/null", "a\0b"):
        assert endpoints._exists(str(path)) == os.path.exists(str(path))
        assert handoff._is_dir(str(path)) == os.path.isdir(str(path))


def test_the_journal_finds_its_socket_without_os(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xenblockctl.journal.JOURNAL_SOCKET", str(tmp_path / "missing"))
    monkeypatch.setattr("xenblockctl.journal.SYSLOG_SOCKET", str(tmp_path))
    assert Journal("t", stderr=False)._target == str(tmp_path)
    monkeypatch.setattr("xenblockctl.journal.SYSLOG_SOCKET", str(tmp_path / "missing too"))
    assert Journal("t", stderr=False)._target is None


def test_the_process_environment_is_decoded_as_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENBLOCKCTL_TEST_UNDECODABLE", "caf\udce9")  # a non-UTF-8 byte, as os keeps it
    assert Environment.of_process().variables == dict(os.environ)
