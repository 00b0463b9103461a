"""Mapping a file's pages at an address we chose, owned by a Python mmap object, without an fd per mapping.

Both transports need grant pages at a place they pick: the local one to lay a ring's memfd pages
side by side, gntdev to map a grant range at all without CPython's `mmap.mmap(fd, ...)`, which
dup()s the fd for every mapping object (CPython 3.11: a persistent-grant cache of 1056 pages per
ring went past RLIMIT_NOFILE and valid writes failed with EMFILE, issue 13). So a `Reservation`
is an anonymous `mmap.mmap(-1, ...)` (no fd at all), which keeps ownership: it munmaps the whole
range on close and refuses to close while views of it exist; `place()` replaces pages of it in
place with a MAP_SHARED|MAP_FIXED mapping of the file via libc.

A MAP_FIXED mmap that fails may already have unmapped the range (Linux unmaps before it calls the
driver's mmap, and gntdev's fails for a bad grant ref, i.e. whenever a guest wants). Another
thread's mmap could then land in that hole, and closing the reservation later would unmap it.
So every reservation and placement here happens under one process-wide lock (our own mappings
are the small ones that would fit a small hole), and after a failure the hole is covered again
at once with MAP_FIXED_NOREPLACE, which never replaces anything. If that finds the range taken,
/proc/self/maps says whether it is still our reservation (the failure came before the unmap) or
someone else's; in the second case the reservation is never unmapped (kept referenced for the
life of the process) and the caller gets an error.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from typing import Final

from xenblockctl.backend.blkif import PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

MAP_FIXED: Final = 0x10  # not exported by the mmap module
MAP_FIXED_NOREPLACE: Final = 0x100000  # Linux 4.17
_MAP_FAILED: Final = ctypes.c_void_p(-1).value

#: every reservation and MAP_FIXED placement in the process (see the module docstring)
_lock = threading.Lock()
#: reservations whose range another mapping took after a failed placement: never unmapped
_abandoned: list[mmap.mmap] = []


class RangeLost(OSError):
    """A failed placement left part of the range to another mapping: the reservation is abandoned."""


class Reservation:
    """`pages` pages of anonymous memory owned by `map`, at address `base`."""

    def __init__(self, pages: int) -> None:
        if pages <= 0:
            raise ValueError("a reservation needs at least one page")
        self.length = pages * PAGE_SIZE
        with _lock:  # a reservation must never land in a hole a failed placement left (see above)
            self.map: mmap.mmap | None = mmap.mmap(-1, self.length)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.base = ctypes.addressof(anchor)
        del anchor  # release the buffer export so close() can succeed later

    def place(self, page: int, fd: int, offset: int, pages: int, *, writable: bool) -> None:
        """Map `pages` pages of `fd` at byte `offset` over pages [page, page + pages) of the range,
        MAP_SHARED. OSError (with errno) on failure; the range is then ours again, or RangeLost."""
        if self.map is None:
            raise OSError(errno.EBADF, "reservation already closed")
        if page < 0 or pages <= 0 or (page + pages) * PAGE_SIZE > self.length:
            raise ValueError(f"pages {page}+{pages} outside a {self.length // PAGE_SIZE}-page reservation")
        addr, length = self.base + page * PAGE_SIZE, pages * PAGE_SIZE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        with _lock:
            got = _libc.mmap(addr, length, prot, mmap.MAP_SHARED | MAP_FIXED, fd, offset)
            if got == addr:
                return
            err = ctypes.get_errno() or errno.ENOMEM
            if got not in (None, _MAP_FAILED):  # cannot happen with MAP_FIXED; never leave it mapped
                _libc.munmap(got, length)
            if not _recover(addr, length):
                _abandoned.append(self.map)
                self.map = None
                raise RangeLost(err, f"{os.strerror(err)}; the reserved range was taken meanwhile")
        raise OSError(err, os.strerror(err))

    def close(self) -> None:
        """munmap the whole range (whatever is placed in it). BufferError while views exist."""
        if self.map is not None:
            self.map.close()
            self.map = None


def _recover(addr: int, length: int) -> bool:
    """After a failed MAP_FIXED (lock held): make [addr, addr + length) ours again. False if
    another mapping took part of it."""
    got = _libc.mmap(
        addr,
        length,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
        -1,
        0,
    )
    if got == addr:
        return True  # the failure had unmapped the range; covered again
    if got not in (None, _MAP_FAILED):
        _libc.munmap(got, length)  # a kernel without MAP_FIXED_NOREPLACE took it as a hint
    # Occupied: our reservation still (the failure came before the unmap: ENOMEM at the VMA
    # limit, a refused mode), or a mapping that raced into the hole. Ours is shared anonymous
    # memory covering the whole range, which nothing else in the engine maps at a fixed place.
    return _anonymous_shared(addr, addr + length)


def _anonymous_shared(start: int, end: int) -> bool:
    """Whether /proc/self/maps shows [start, end) wholly covered by shared anonymous memory."""
    covered = start
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo_text, _, hi_text = fields[0].partition("-")
                lo, hi = int(lo_text, 16), int(hi_text, 16)
                if hi <= covered or lo >= end:
                    continue
                if lo > covered or "s" not in fields[1] or not line.rstrip().endswith("/dev/zero (deleted)"):
                    return False
                covered = hi
                if covered >= end:
                    return True
    except OSError:
        return False
    return False


__all__ = ["RangeLost", "Reservation"]
