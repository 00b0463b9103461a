"""An object that owns one file descriptor: the kernel handles (an open block device, the
device-mapper control node) are their fd, closed exactly once, also by `with`."""

from __future__ import annotations

import posix

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self


class FdHandle:
    """Owns `fd` (set by the subclass): close() closes it once and leaves -1 behind, so a second
    close, or a close after a failed hand-off, never closes a number reused by someone else."""

    fd: int

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            posix.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
