"""The real-Xen transport: /dev/xen/gntdev maps the frontend's grants, /dev/xen/evtchn its events.

ioctl numbers and structs are from include/uapi/xen/gntdev.h and evtchn.h (xen-block-protocol.md §7,
§8), checked against the installed headers by tests/unit/test_transport_xen.py. The class below is
exercised only in the Xen lane (tests/xen); the codecs are unit-tested everywhere.

Without persistent grants the data plane copies the pages of a whole ring pass's requests with one
IOCTL_GNTDEV_GRANT_COPY (backend/grantcopy.py); where gntdev lacks that ioctl (Linux < 4.8, probed
at open) it maps each request's refs here (one MAP ioctl + one mmap for all its pages) and unmaps
them after the I/O. With persistent grants (backend/grantcache.py)
it maps a request's uncached refs on first use (in one call where they fit, else one at a time) and
keeps them: each cached page costs at most one mapping, i.e. one VMA, so a full cache (1056 pages
per ring by default) costs up to 1056 of the process's vm.max_map_count (65530 by default; the
caches share a budget of it, backend/grantcache.py).
Mappings are placed into anonymous reservations (transport/fixedmap.py) and hold no file
descriptor: `mmap.mmap(gntdev_fd, ...)` would dup() the fd for every mapping (issue 13).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Final

from xenblockctl.backend.blkif import PAGE_SIZE
from xenblockctl.backend.fastlock import fast_lock
from xenblockctl.backend.transport.base import (
    WAIT_EVTCHN,
    Bounce,
    CopyItem,
    EventChannel,
    GrantError,
    GrantMapping,
    MmapGrantMapping,
    NativeCopier,
    NativeWaiter,
    Transport,
    TransportError,
)
from xenblockctl.backend.transport.fixedmap import RangeLost, Reservation

log = logging.getLogger(__name__)

_IOC_NONE: Final = 0
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (ord(kind) << _IOC_TYPESHIFT) | nr


# --- gntdev ---------------------------------------------------------------------------------------
_MAP_HEADER = struct.Struct("=IIQ")  # count, pad, index (out)
_GRANT_REF = struct.Struct("=II")  # domid, ref
_UNMAP = struct.Struct("=QII")  # index, count, pad
_GET_OFFSET = struct.Struct("=QQII")  # vaddr, offset (out), count (out), pad
_SET_MAX = struct.Struct("=I")
_UNMAP_NOTIFY = struct.Struct("=QII")  # index, action, event_channel_port

# The MAP number encodes sizeof(struct ioctl_gntdev_map_grant_ref) with its one-element refs[1]
# (24 bytes), whatever `count` is: the kernel copies the rest itself.
IOCTL_GNTDEV_MAP_GRANT_REF: Final = _ioc(_IOC_NONE, "G", 0, _MAP_HEADER.size + _GRANT_REF.size)
IOCTL_GNTDEV_UNMAP_GRANT_REF: Final = _ioc(_IOC_NONE, "G", 1, _UNMAP.size)
IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR: Final = _ioc(_IOC_NONE, "G", 2, _GET_OFFSET.size)
IOCTL_GNTDEV_SET_MAX_GRANTS: Final = _ioc(_IOC_NONE, "G", 3, _SET_MAX.size)
IOCTL_GNTDEV_SET_UNMAP_NOTIFY: Final = _ioc(_IOC_NONE, "G", 7, _UNMAP_NOTIFY.size)
# struct ioctl_gntdev_grant_copy {unsigned count; (pad); struct gntdev_grant_copy_segment *segments}
_GRANT_COPY = struct.Struct("=IIQ")
IOCTL_GNTDEV_GRANT_COPY: Final = _ioc(_IOC_NONE, "G", 8, _GRANT_COPY.size)
# struct gntdev_grant_copy_segment, 24 bytes: `source` and `dest` are each a union of our virtual
# address (u64) and a foreign {u32 ref; u16 offset; u16 domid}, then u16 len, u16 flags, s16
# status, 2 bytes of padding. Little-endian (every dom0 architecture), that is three u64 words:
# address, ref | offset << 32 | domid << 48, len | flags << 16 (status 0), in source/dest order,
# so a batch is built with C-level passes over a request's refs instead of a pack per segment.
COPY_SEGMENT_SIZE: Final = 24
_STATUS_AT: Final = 20  # byte offset of `status` in a segment
GNTCOPY_SOURCE_GREF: Final = 0x1
GNTCOPY_DEST_GREF: Final = 0x2
UNMAP_NOTIFY_CLEAR_BYTE: Final = 0x1
UNMAP_NOTIFY_SEND_EVENT: Final = 0x2


def encode_map_grant_ref(domid: int, refs: Sequence[int]) -> bytearray:
    """struct ioctl_gntdev_map_grant_ref for `refs` of `domid` (index 0, filled in by the kernel)."""
    if not refs:
        raise ValueError("at least one ref")
    buf = bytearray(_MAP_HEADER.pack(len(refs), 0, 0))
    for ref in refs:
        buf += _GRANT_REF.pack(domid, ref)
    return buf


def decode_map_grant_ref(buf: bytes | bytearray) -> tuple[int, int, list[tuple[int, int]]]:
    """(count, index, [(domid, ref), ...])."""
    count, _pad, index = _MAP_HEADER.unpack_from(buf)
    refs = [_GRANT_REF.unpack_from(buf, _MAP_HEADER.size + i * _GRANT_REF.size) for i in range(count)]
    return count, index, [(d, r) for d, r in refs]


def encode_unmap_grant_ref(index: int, count: int) -> bytes:
    return _UNMAP.pack(index, count, 0)


def encode_get_offset_for_vaddr(vaddr: int) -> bytearray:
    return bytearray(_GET_OFFSET.pack(vaddr, 0, 0, 0))


def decode_get_offset_for_vaddr(buf: bytes | bytearray) -> tuple[int, int]:
    """(offset, count)."""
    _vaddr, offset, count, _pad = _GET_OFFSET.unpack_from(buf)
    return offset, count


def encode_set_unmap_notify(index: int, action: int, port: int) -> bytes:
    return _UNMAP_NOTIFY.pack(index, action, port)


def encode_grant_copy(domid: int, items: Sequence[CopyItem], *, to_guest: bool) -> array.array[int]:
    """The array of struct gntdev_grant_copy_segment for every segment of `items`, in order
    (statuses 0 until the kernel writes them)."""
    if sys.byteorder != "little":
        raise TransportError("grant copy segments are built for a little-endian dom0")
    words: array.array[int] = array.array("Q")
    dom = domid << 48
    flags = GNTCOPY_DEST_GREF if to_guest else GNTCOPY_SOURCE_GREF
    for refs, extents, bounce in items:
        base = bounce.address
        if extents is None:
            addrs: Iterable[int] = range(base, base + len(refs) * PAGE_SIZE, PAGE_SIZE)
            foreign: Iterable[int] = map(dom.__or__, refs)
            tails: Iterable[int] = itertools.repeat(PAGE_SIZE | flags << 16, len(refs))
        else:
            at, addr_list, foreign_list, tail_list = base, [], [], []
            for ref, (offset, length) in zip(refs, extents, strict=True):
                addr_list.append(at)
                foreign_list.append(ref | offset << 32 | dom)
                tail_list.append(length | flags << 16)
                at += length
            addrs, foreign, tails = addr_list, foreign_list, tail_list
        if to_guest:
            words.extend(itertools.chain.from_iterable(zip(addrs, foreign, tails, strict=True)))
        else:
            words.extend(itertools.chain.from_iterable(zip(foreign, addrs, tails, strict=True)))
    return words


def decode_copy_statuses(words: array.array[int]) -> list[int]:
    """Each segment's s16 status, in order (one C-level pass: a strided view of the array)."""
    return memoryview(words).cast("B").cast("h")[_STATUS_AT // 2 :: COPY_SEGMENT_SIZE // 2].tolist()


# --- evtchn ---------------------------------------------------------------------------------------
_U32 = struct.Struct("=I")
_BIND_INTERDOMAIN = struct.Struct("=II")  # remote_domain, remote_port
_RESTRICT = struct.Struct("=H")

IOCTL_EVTCHN_BIND_VIRQ: Final = _ioc(_IOC_NONE, "E", 0, _U32.size)
IOCTL_EVTCHN_BIND_INTERDOMAIN: Final = _ioc(_IOC_NONE, "E", 1, _BIND_INTERDOMAIN.size)
IOCTL_EVTCHN_BIND_UNBOUND_PORT: Final = _ioc(_IOC_NONE, "E", 2, _U32.size)
IOCTL_EVTCHN_UNBIND: Final = _ioc(_IOC_NONE, "E", 3, _U32.size)
IOCTL_EVTCHN_NOTIFY: Final = _ioc(_IOC_NONE, "E", 4, _U32.size)
IOCTL_EVTCHN_RESET: Final = _ioc(_IOC_NONE, "E", 5, 0)
IOCTL_EVTCHN_RESTRICT_DOMID: Final = _ioc(_IOC_NONE, "E", 6, _RESTRICT.size)


#: "this domain" in an event channel operation's domain field (xen/include/public/xen.h)
DOMID_SELF: Final = 0x7FF0


def encode_bind_interdomain(remote_domain: int, remote_port: int) -> bytearray:
    return bytearray(_BIND_INTERDOMAIN.pack(remote_domain, remote_port))


def encode_port(port: int) -> bytearray:
    """The argument of BIND_VIRQ, BIND_UNBOUND_PORT (remote domain), UNBIND and NOTIFY."""
    return bytearray(_U32.pack(port))


def decode_pending_ports(data: bytes) -> list[int]:
    """Ports from a read() of /dev/xen/evtchn (whole u32s; a trailing fragment is ignored)."""
    usable = len(data) - len(data) % _U32.size
    return [p for (p,) in _U32.iter_unpack(data[:usable])]


def encode_unmask(ports: Sequence[int]) -> bytes:
    return b"".join(_U32.pack(p) for p in ports)


# --- the transport --------------------------------------------------------------------------------
GNTDEV_PATH: Final = "/dev/xen/gntdev"

EVTCHN_PATH: Final = "/dev/xen/evtchn"


class _GntdevMapping(MmapGrantMapping):
    def __init__(self, gntdev: int, domid: int, refs: tuple[int, ...], writable: bool) -> None:
        self.refs = refs
        self.writable = writable
        self._gntdev = gntdev
        arg = encode_map_grant_ref(domid, refs)
        try:
            fcntl.ioctl(gntdev, IOCTL_GNTDEV_MAP_GRANT_REF, arg, True)
        except OSError as exc:
            raise GrantError.from_oserror(
                exc, f"cannot map grants {list(refs)[:8]} of domain {domid}"
            ) from exc
        _count, self._index, _ = decode_map_grant_ref(arg)
        # Our own reservation replaced in place (transport/fixedmap.py), not mmap.mmap(gntdev, ...):
        # CPython dup()s the fd for every mmap object, and a full grant cache is 1056 of them per ring.
        try:
            reservation = Reservation(len(refs))
        except OSError as exc:
            self._release_index()
            raise GrantError.from_oserror(exc, f"cannot reserve room for grants of domain {domid}") from exc
        last: OSError | None = None
        for _ in range(100):  # EAGAIN: paged-out grants are being brought back (libxengnttab retries)
            try:
                reservation.place(0, gntdev, self._index, len(refs), writable=writable)
                last = None
                break
            except OSError as exc:
                last = exc
                if exc.errno != errno.EAGAIN or isinstance(exc, RangeLost):
                    break
        if last is not None:
            reservation.close()  # munmap first, then release the grant index (libxengnttab order)
            self._release_index()
            raise GrantError.from_oserror(last, f"cannot mmap grants of domain {domid}") from last
        self._map: mmap.mmap | None = reservation.map
        assert self._map is not None
        view = memoryview(self._map)
        self._view: memoryview | None = view if writable else view.toreadonly()

    def _release_index(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.ioctl(
                self._gntdev,
                IOCTL_GNTDEV_UNMAP_GRANT_REF,
                encode_unmap_grant_ref(self._index, len(self.refs)),
            )

    def _after_munmap(self) -> None:
        # munmap first, then release the grant index (libxengnttab order)
        self._release_index()


class XenEventChannel(EventChannel):
    """One /dev/xen/evtchn fd per bound port (closing it unbinds)."""

    def __init__(self, remote_domain: int, remote_port: int) -> None:
        try:
            self._fd = os.open(EVTCHN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise TransportError.from_oserror(exc, f"cannot open {EVTCHN_PATH}", code="transport") from exc
        try:
            self.local_port = fcntl.ioctl(
                self._fd,
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                encode_bind_interdomain(remote_domain, remote_port),
                True,
            )
        except OSError as exc:
            os.close(self._fd)
            raise TransportError.from_oserror(
                exc, f"cannot bind to port {remote_port} of domain {remote_domain}", code="evtchn-bind"
            ) from exc
        self._lock = fast_lock()  # taken for every notify and ack: one that reads no clock
        # both per-event arguments built once: every request's answer notifies, every wake-up acks
        self._notify_arg = bytes(encode_port(self.local_port))
        self._unmask_arg = encode_unmask((self.local_port,))

        #: the blocking wake-up's interrupt (start_blocking): NOTIFY on this port raises an event
        #: on its loopback peer, which this fd also binds; None until then
        self._interrupt_arg: bytes | None = None

    def fileno(self) -> int:
        return self._fd

    def notify(self) -> None:
        # under the lock close() takes: an fd number closed meanwhile may already name another file
        with self._lock:
            if self._fd < 0:
                raise TransportError("event channel closed", code="transport")
            fcntl.ioctl(self._fd, IOCTL_EVTCHN_NOTIFY, self._notify_arg)

    def start_blocking(self) -> bool:
        """A read() of an evtchn fd ends only with an event (evtchn_read waits for a port in the
        fd's queue; closing the fd from another thread does not end it), so the stop comes as one:
        a loopback channel in our own domain, both ends bound on this fd (an unbound port for
        DOMID_SELF, then an interdomain bind to it), whose NOTIFY queues its peer port here. Then
        the fd goes blocking. False, logged, where Xen refuses the loopback (the poll wake-up
        stays)."""
        with self._lock:
            if self._fd < 0:
                return False
            bound: list[int] = []
            try:
                peer = fcntl.ioctl(self._fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, encode_port(DOMID_SELF), True)
                bound.append(peer)
                sender = fcntl.ioctl(
                    self._fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, encode_bind_interdomain(DOMID_SELF, peer), True
                )
                bound.append(sender)
                os.set_blocking(self._fd, True)
            except OSError as exc:
                for port in bound:  # give back what we bound; the fd stays non-blocking
                    with contextlib.suppress(OSError):
                        fcntl.ioctl(self._fd, IOCTL_EVTCHN_UNBIND, encode_port(port))
                log.warning(
                    "event channel %d: no loopback channel for a blocking wake-up (%s); waking by poll",
                    self.local_port,
                    os.strerror(exc.errno or 0),
                )
                return False
            self._interrupt_arg = bytes(encode_port(sender))
            return True

    def take(self) -> bool:
        # no lock: this blocks, and the fd is closed only after the thread that takes has ended
        fd = self._fd
        if fd < 0 or self._interrupt_arg is None:
            raise TransportError("event channel closed or not blocking", code="internal")
        # every port this fd binds is queued at most once until unmasked (evtchn_interrupt
        # disables it), so 3 ports' worth is all there can be
        return self.local_port in decode_pending_ports(os.read(fd, 3 * _U32.size))

    def unmask(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.write(self._fd, self._unmask_arg)  # the late EOI: lets the next event through

    def native_waiter(self) -> NativeWaiter | None:
        # the loop reads, unmasks and notifies on the fd without our lock: close() comes only
        # after the ring thread that runs it has ended (DataPlane.stop)
        if self._fd < 0 or self._interrupt_arg is None:
            return None
        return WAIT_EVTCHN, self._fd, self.local_port, self._fd, IOCTL_EVTCHN_NOTIFY

    def interrupt(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._interrupt_arg is not None:
                fcntl.ioctl(self._fd, IOCTL_EVTCHN_NOTIFY, self._interrupt_arg)

    def ack(self) -> bool:
        with self._lock:
            if self._fd < 0:
                return False  # closed: nothing can be pending
            if self._interrupt_arg is not None:  # a read would block, and could eat the interrupt
                raise TransportError("ack() on an event channel with a blocking wake-up", code="internal")
            try:
                data = os.read(self._fd, PAGE_SIZE)
            except BlockingIOError:
                return False
            # this fd binds one port: whatever the read returned, it is ours to unmask
            if len(data) < _U32.size:
                return False
            os.write(self._fd, self._unmask_arg)  # or no further events arrive
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class XenTransport(Transport):
    # Xen's evtchn_close() puts the frontend's port back to ECS_UNBOUND for our domain when our end
    # closes (the process dying included), and the frontend's grant of the ring stays until it ends it.
    rings_outlive_engine = True

    def __init__(self) -> None:
        try:
            self._gntdev = os.open(GNTDEV_PATH, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TransportError.from_oserror(exc, f"cannot open {GNTDEV_PATH}", code="transport") from exc
        # An empty grant copy costs nothing and says whether this gntdev has the ioctl (Linux >= 4.8);
        # without it the data planes map each request's pages instead.
        try:
            fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_GRANT_COPY, _GRANT_COPY.pack(0, 0, 0))
        except OSError as exc:
            self.copies_grants = False
            log.warning(
                "%s has no grant copy (%s): frontends without persistent grants get each request's"
                " pages mapped",
                GNTDEV_PATH,
                os.strerror(exc.errno or 0),
            )

    def map_grants(
        self, domid: int, refs: Sequence[int], *, writable: bool = True, contiguous: bool = False
    ) -> GrantMapping:
        # gntdev always maps contiguously, so `contiguous` needs nothing extra here.
        if not refs:
            raise GrantError("no grant refs to map")
        return _GntdevMapping(self._gntdev, domid, tuple(refs), writable)

    copies_grants = True

    def grant_copy(self, domid: int, items: Sequence[CopyItem], *, to_guest: bool) -> list[int]:
        words = encode_grant_copy(domid, items, to_guest=to_guest)
        count = len(words) // 3
        if not count:
            return []
        # The kernel reads the segments through this pointer and writes each status back into
        # them (gnttab_batch_copy already retries GNTST_eagain itself).
        address, _n = words.buffer_info()
        try:
            fcntl.ioctl(self._gntdev, IOCTL_GNTDEV_GRANT_COPY, _GRANT_COPY.pack(count, 0, address))
        except OSError as exc:
            raise GrantError.from_oserror(exc, f"grant copy of {count} segments of domain {domid}") from exc
        return decode_copy_statuses(words)

    def native_copier(self, domid: int, bounce: Bounce) -> NativeCopier | None:
        # the C pass makes the same ioctl on our fd (the transport outlives every data plane)
        return (self._gntdev, None) if self.copies_grants and self._gntdev >= 0 else None

    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel:
        return XenEventChannel(domid, remote_port)

    def close(self) -> None:
        if self._gntdev >= 0:
            os.close(self._gntdev)
            self._gntdev = -1
