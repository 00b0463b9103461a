"""The one exception type every layer raises, carrying a stable code.

libxl prints `hotplug-error` verbatim and that line is often the only thing an admin sees, so
every failure carries a short machine-stable *code* (kebab-case, documented in xenblockctl(1))
plus a one-line human message, and the errno when the kernel or xenstored gave one.
"""

from __future__ import annotations

import errno as _errno
import posix


class XenblockError(Exception):
    """A failure with a stable code, a one-line message and an optional errno."""

    #: Default code for the class; instances may override it.
    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.errno = errno

    def __str__(self) -> str:
        suffix = ""
        if self.errno is not None:
            name = _errno.errorcode.get(self.errno, str(self.errno))
            suffix = f" ({name}: {posix.strerror(self.errno)})"
        return f"{self.code}: {self.message}{suffix}"

    def one_line(self, limit: int = 400) -> str:
        """The text fit for `hotplug-error`: one line, bounded, printable ASCII only."""
        text = " ".join(str(self).split())
        text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
        return text[:limit]

    @classmethod
    def from_oserror(cls, exc: OSError, message: str, *, code: str | None = None) -> XenblockError:
        return cls(message, code=code, errno=exc.errno)
