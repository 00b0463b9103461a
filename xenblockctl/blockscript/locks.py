"""Short, per-target BSD locks. No global lock: two adds of *different* targets never wait for
each other; two adds of the same target are serialised between the sharing check and publishing
the claim. flock is released by the kernel when the holder dies, so a SIGKILLed script never
leaves a lock behind."""

from __future__ import annotations

import errno
import fcntl
import posix
import time

from xenblockctl import pathsteps
from xenblockctl.errors import XenblockError


class LockTimeout(XenblockError):
    code = "lock-timeout"


class target_lock:
    """Hold an exclusive flock on `<lock_dir>/<key>` (key: e.g. `file-fe00-20c0f6`, `dev-7-3`)
    from `__enter__` to `__exit__`. `lock_dir` is the environment's (environment.LOCK_DIR unless a
    test points elsewhere); `holder` names whom a waiter waits for, in the timeout error. A class,
    not a contextlib.contextmanager: contextlib (with collections and functools) is kept off the
    block script's start-up.

    Lock files are never unlinked: unlinking races with a waiter that opened the old inode."""

    def __init__(
        self, key: str, *, timeout: float, lock_dir: str, holder: str = "another attach of the same target"
    ) -> None:
        self.key, self.timeout, self.lock_dir, self.holder = key, timeout, lock_dir, holder
        self.fd = -1

    def __enter__(self) -> None:
        # an existing non-directory: the open below refuses it (ENOTDIR)
        pathsteps.makedirs(self.lock_dir, 0o700)
        fd = posix.open(
            f"{self.lock_dir}/{self.key}",
            posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC | posix.O_NOFOLLOW,
            0o600,
        )
        try:
            deadline = time.monotonic() + self.timeout
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{self.holder} held its lock ({self.key}) for {self.timeout:g} s")
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        except BaseException:
            posix.close(fd)
            raise
        self.fd = fd

    def detach(self) -> int:
        """The locked fd, now the caller's to close (the lock is held until it does); `__exit__`
        then closes nothing. For a holder that outlives the `with` block (autoclear.py's job)."""
        fd, self.fd = self.fd, -1
        return fd

    def __exit__(self, *exc_info: object) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            posix.close(fd)


def device_lock(major: int, minor: int, *, timeout: float, lock_dir: str) -> target_lock:
    """The lock of one loop device we bound, `loop-<major>-<minor>`: held by the job that turns
    AUTOCLEAR off after a kernel-blkback hand-off (blockscript/autoclear.py) and by `remove`
    around its detach, so that the job's ioctl can never cancel the AUTOCLEAR remove armed."""
    return target_lock(
        f"loop-{major}-{minor}",
        timeout=timeout,
        lock_dir=lock_dir,
        holder=f"the AUTOCLEAR job of loop{minor} (or a remove of it)",
    )
