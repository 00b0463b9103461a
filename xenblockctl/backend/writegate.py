"""How a device's buffered I/O may wait, and the ring group's write gate (issue 20, wiso20).

A ring group (backend/ringgroup.py) serves many guests' rings on one thread, so anything one ring's
I/O waits for, every ring of the group waits for. A buffered write waits when the kernel's dirty
throttle (balance_dirty_pages) pauses its writer, up to tens of ms a write once the host's dirty
pages reach the throttle (bench/README.md, issue 20 write isolation: 43.5 ms on xfs, 35.6 ms on a
loop device with a 16 MiB dirty limit). What the kernel lets us ask depends on the file's kind, so
each device gets a class when its data plane starts (`classify`: S_ISBLK, else fstatfs's f_type),
corrected by the kernel's first RWF_NOWAIT answer (io.Executor.run_now):

- NOWAIT (xfs, btrfs, and any kind not known to refuse): a buffered pwritev2(RWF_NOWAIT) is
  answered; the throttle, a contended lock or a timestamp update (once a jiffy per file on xfs)
  make it EAGAIN or short. In a group such a write is tried with RWF_NOWAIT; a refusal leaves the
  group for the ring's own thread, which writes it there, blocking (io.Executor.run_now), so the
  throttle sleeps that ring alone and the ring's requests finish in ring order.
- GATED (ext4, a block device's page cache, overlayfs, and a NOWAIT kind that answered
  EOPNOTSUPP): RWF_NOWAIT writes are refused outright, so they are written blocking, in the group
  while its write gate (write_gate.h) is open: the host's dirty pages well below the throttle and
  no write of the device slept in a group lately; closed, they leave for the ring's thread.
- MEMORY (tmpfs, ramfs): no writeback, so never dirty-throttled, and no disk for a read to wait
  for either (only swap). Their RWF_NOWAIT reads are refused too (EOPNOTSUPP, no FMODE_NOWAIT),
  which used to send every read to the I/O pool: both directions run inline, in a group too.

Overlayfs reads are refused with EOPNOTSUPP as well but may wait for the disk below: they stay on
the pool (inline when alone on their ring), as before.

`DeviceWrites` is one device's class and gate state, shared by its queues (the gate's hold is
per device: ext4 holds the inode lock across a buffered write, so a second queue of the same file
waits behind a throttled first). The C pass reads and updates `state` without the GIL; every hand-
off and gate closure is counted there or here, and logged with its reason, at most once per
LOG_EVERY seconds per device (`report`, `refused`).
"""

from __future__ import annotations

import array
import ctypes
import enum
import logging
import os
import stat
import threading
import time
import weakref
from typing import Final

log = logging.getLogger(__name__)

# the state's int64 slots, as write_gate.h numbers them (tests/unit/test_writegate.py holds them equal)
WG_HOLD_UNTIL: Final = 0
WG_HOLD_NS: Final = 1
WG_SLEPT: Final = 2
WG_CLOSED: Final = 3
WG_LEFT_DIRTY: Final = 4
WG_LEFT_HELD: Final = 5
WG_DIRTY_PERMILLE: Final = 6
WG_LAST: Final = 7
WG_SIZE: Final = 8

#: seconds between two log lines of one device's hand-offs (the counts in between are summed)
LOG_EVERY = 10.0

# statfs f_type values (<linux/magic.h>)
_TMPFS = 0x01021994
_RAMFS = 0x858458F6
_XFS = 0x58465342
_BTRFS = 0x9123683E
_EXT4 = 0xEF53  # ext2/3/4 share it; ext2/3 mounted by ext4's driver take the same path
_OVERLAYFS = 0x794C7630


class WriteClass(enum.IntEnum):
    """How a device's buffered I/O may wait (the module docstring)."""

    NOWAIT = 1
    GATED = 2
    MEMORY = 3


_KINDS: Final = {
    _TMPFS: WriteClass.MEMORY,
    _RAMFS: WriteClass.MEMORY,
    _XFS: WriteClass.NOWAIT,
    _BTRFS: WriteClass.NOWAIT,
    _EXT4: WriteClass.GATED,
    _OVERLAYFS: WriteClass.GATED,
}


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type first (__fsword_t); the rest is not read
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
_libc.fstatfs.restype = ctypes.c_int


def fs_type(fd: int) -> int | None:
    """fstatfs(fd)'s f_type, or None if the call fails."""
    buf = _Statfs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


def classify(fd: int) -> WriteClass:
    """The class of the file or block device open as `fd`: a block device's page cache has no
    RWF_NOWAIT writes (blkdev_write_iter); a file's by its filesystem; an unknown one is tried
    (NOWAIT: its first answer corrects it)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return WriteClass.NOWAIT
    if stat.S_ISBLK(st.st_mode):
        return WriteClass.GATED
    kind = fs_type(fd)
    return _KINDS.get(kind, WriteClass.NOWAIT) if kind is not None else WriteClass.NOWAIT


class _Every:
    """Counts per reason, logged together at most once per LOG_EVERY seconds (the first at once)."""

    __slots__ = ("_counts", "_last")

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._last = -LOG_EVERY

    def add(self, name: str, reason: str, n: int = 1) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + n
        now = time.monotonic()
        if now - self._last < LOG_EVERY:
            return
        self._last = now
        said = "; ".join(f"{count} {why}" for why, count in self._counts.items())
        self._counts.clear()
        log.info("%s: ring group write hand-offs and gate closures: %s", name, said)


class DeviceWrites:
    """One device's class and write gate state (the module docstring); `of(fd)` finds it."""

    __slots__ = (
        "__weakref__",
        "_key",
        "_lock",
        "_log",
        "_seen",
        "_users",
        "cls",
        "name",
        "refused_writes",
        "state",
    )

    def __init__(self, cls: WriteClass, name: str) -> None:
        self.cls = cls
        self.name = name
        #: write_gate.h's state, read and written by the C pass without the GIL
        self.state = array.array("q", bytes(8 * WG_SIZE))
        self._seen = [0] * WG_SIZE  # the counts as last logged
        #: RWF_NOWAIT writes of a group's ring refused and written on the ring's own thread
        self.refused_writes = 0
        self._lock = threading.Lock()
        self._log = _Every()
        self._key: tuple[int, int, int] | None = None
        self._users = 0  # executors holding it (of() .. release()): shared only while one is open

    @classmethod
    def of(cls, fd: int, name: str) -> DeviceWrites:
        """The state of the device open as `fd`: the same for every queue on it while one of them
        holds it (`release` when done: a later file on a reused inode starts afresh)."""
        try:
            st = os.fstat(fd)
            key = (st.st_rdev, 0, 0) if stat.S_ISBLK(st.st_mode) else (0, st.st_dev, st.st_ino)
        except OSError:
            return cls(classify(fd), name)  # nothing to share it by; its queues learn on their own
        with _known_lock:
            known = _known.get(key)
            if known is None:
                known = cls(classify(fd), name)
                known._key = key
                _known[key] = known
            known._users += 1
            return known

    def release(self) -> None:
        """One holder less (io.Executor.close); the last one forgets the device."""
        with _known_lock:
            self._users -= 1
            if self._users <= 0 and self._key is not None and _known.get(self._key) is self:
                del _known[self._key]

    def unsupported(self) -> None:
        """The kernel refused a RWF_NOWAIT write with EOPNOTSUPP: the device is GATED from now on."""
        if self.cls is WriteClass.NOWAIT:
            self.cls = WriteClass.GATED
            log.info(
                "%s: buffered writes have no RWF_NOWAIT here (EOPNOTSUPP): in a ring group they are"
                " written while its write gate is open",
                self.name,
            )

    def refused(self) -> None:
        """A RWF_NOWAIT write was refused (EAGAIN or short) and is written on its ring's thread."""
        with self._lock:
            self.refused_writes += 1
            self._log.add(self.name, "refused by RWF_NOWAIT (dirty throttle, timestamp update or lock)")

    def report(self) -> None:
        """Log what the C pass counted since the last report (rate-limited)."""
        state = self.state
        with self._lock:
            seen = self._seen
            closed = state[WG_CLOSED] - seen[WG_CLOSED]
            dirty = state[WG_LEFT_DIRTY] - seen[WG_LEFT_DIRTY]
            held = state[WG_LEFT_HELD] - seen[WG_LEFT_HELD]
            slept = state[WG_SLEPT] - seen[WG_SLEPT]
            if not (closed or dirty or held or slept):
                return
            for i in (WG_CLOSED, WG_LEFT_DIRTY, WG_LEFT_HELD, WG_SLEPT):
                seen[i] = state[i]
            if closed:
                level = state[WG_DIRTY_PERMILLE] / 1000
                why = f"gate closures (dirty pages at {level:.2f} of the throttle's ceiling)"
                self._log.add(self.name, why, closed)
            if dirty:
                self._log.add(self.name, "with the dirty pages near the throttle", dirty)
            if slept:
                hold = state[WG_HOLD_NS] / 1e9
                self._log.add(self.name, f"writes that slept in the group (held out {hold:g} s)", slept)
            if held:
                self._log.add(self.name, "held out after a write slept in the group", held)


#: the devices some executor holds (DeviceWrites.of), by block device or by file
_known: weakref.WeakValueDictionary[tuple[int, int, int], DeviceWrites] = weakref.WeakValueDictionary()
_known_lock = threading.Lock()

__all__ = ["LOG_EVERY", "DeviceWrites", "WriteClass", "classify", "fs_type"]
