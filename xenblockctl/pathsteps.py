"""The few os.path and os.makedirs steps of the start-up paths, spelled with posix.

The block script and the udev hook never import `os`: in a fresh `python -S` it costs ~1 ms
(`_collections_abc`'s ABCs, `posixpath`, `genericpath`, `stat`) for functions that are posix's
(bench/README.md, issue 18 round 10). Each step here gives what its os spelling gives
(tests/unit/test_posix_path_steps.py); written once, so that the rule cannot drift between the
modules that need it. A leaf: every layer may import it."""

from __future__ import annotations

import _stat
import posix


def exists(path: str) -> bool:
    """os.path.exists: False for a missing path, one we may not stat, or a NUL in it."""
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def is_dir(path: str) -> bool:
    """os.path.isdir (links followed)."""
    try:
        return _stat.S_ISDIR(posix.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def is_file(path: str) -> bool:
    """os.path.isfile (links followed)."""
    try:
        return _stat.S_ISREG(posix.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def basename(path: str) -> str:
    """os.path.basename: what follows the last slash (all of it without one, "" after a trailing one)."""
    return path.rpartition("/")[2]


def makedirs(directory: str, mode: int = 0o777) -> None:
    """os.makedirs(directory, mode, exist_ok=True), but an existing non-directory is not refused
    here: the caller's next open or mkdir below it refuses it (ENOTDIR). Missing parents get the
    default mode, as there, and one made meanwhile by another process is taken as it is."""
    try:
        posix.mkdir(directory, mode)
        return
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = directory.rstrip("/").rpartition("/")[0]
        if not parent:
            raise
    makedirs(parent)
    try:  # noqa: SIM105 (contextlib is kept off the start-up paths)
        posix.mkdir(directory, mode)
    except FileExistsError:
        pass  # made meanwhile by another process
