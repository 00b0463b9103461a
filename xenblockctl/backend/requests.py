"""Validate one decoded (already copied) request against the device before any I/O.

The output is either an `IoPlan` (byte offsets on the device, page-relative segments) or a
`Rejection` carrying the status to answer with. Nothing here raises for guest input: a bad request
is an answer, never an engine crash. The rules follow Linux blkback (`dispatch_rw_block_io`,
`xen_vbd_translate`, `dispatch_discard_io`) and QEMU's minimum (xen-block-protocol.md §6.4).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xenblockctl.backend import blkif
from xenblockctl.backend.blkif import (
    DiscardRequest,
    IndirectRequest,
    Request,
    Segment,
    SegmentRequest,
    UnknownRequest,
)


class Kind(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"  # FLUSH_DISKCACHE: fdatasync, plus a write (with flushes around it) if it has data
    BARRIER = "barrier"  # WRITE_BARRIER: like FLUSH, and ordered against all other requests
    DISCARD = "discard"


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """What the device is and what we advertised; every check is against this."""

    sectors: int  # device size in 512-byte units (the `sectors` node)
    logical_block_size: int = 512  # `sector-size`
    read_only: bool = False
    flush: bool = True  # feature-flush-cache
    barrier: bool = False  # feature-barrier
    discard: bool = False  # feature-discard
    discard_secure: bool = False  # discard-secure
    max_indirect_segments: int = blkif.DEFAULT_MAX_INDIRECT_SEGMENTS  # 0: indirect not advertised


@dataclass(frozen=True, slots=True)
class IoSegment:
    """Bytes [offset, offset+length) of the page granted as `gref`."""

    gref: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class IoPlan:
    """A validated request: what to do, where on the device, and with which page ranges."""

    id: int
    operation: int  # echoed in the response (for indirect: the indirect_op, as Linux does)
    kind: Kind
    offset: int  # byte offset on the device
    length: int  # total bytes (for DISCARD: bytes to discard; FLUSH without data: 0)
    segments: tuple[IoSegment, ...] = ()
    secure: bool = False  # DISCARD with BLKIF_DISCARD_SECURE and discard-secure advertised


@dataclass(frozen=True, slots=True)
class Rejection:
    id: int
    operation: int
    status: int  # blkif.RSP_ERROR or RSP_EOPNOTSUPP
    reason: str


Verdict = IoPlan | Rejection

#: Copies the indirect pages named by the grefs (`nr_pages` of them) and returns their bytes; raises
#: any exception if a ref cannot be mapped (the request is then answered with an error).
IndirectReader = Callable[[Sequence[int]], bytes]

_KIND_OF = {
    blkif.OP_READ: Kind.READ,
    blkif.OP_WRITE: Kind.WRITE,
    blkif.OP_FLUSH_DISKCACHE: Kind.FLUSH,
    blkif.OP_WRITE_BARRIER: Kind.BARRIER,
}


def validate(req: Request, limits: DeviceLimits, read_indirect: IndirectReader | None = None) -> Verdict:
    """Check `req` fully; never raises for any field values."""
    if isinstance(req, UnknownRequest):
        return Rejection(req.id, req.operation, blkif.RSP_EOPNOTSUPP, f"unknown operation {req.operation}")
    if isinstance(req, DiscardRequest):
        return _validate_discard(req, limits)
    if isinstance(req, IndirectRequest):
        return _validate_indirect(req, limits, read_indirect)
    return _validate_segments(req, limits)


def _reject(
    req: Request, reason: str, status: int = blkif.RSP_ERROR, operation: int | None = None
) -> Rejection:
    return Rejection(req.id, req.operation if operation is None else operation, status, reason)


def _validate_segments(req: SegmentRequest, limits: DeviceLimits) -> Verdict:
    kind = _KIND_OF[req.operation]
    if kind is Kind.FLUSH and not limits.flush:
        return _reject(req, "flush not advertised", blkif.RSP_EOPNOTSUPP)
    if kind is Kind.BARRIER and not limits.barrier:
        return _reject(req, "barrier not advertised", blkif.RSP_EOPNOTSUPP)
    nseg = req.nr_segments
    if nseg > blkif.MAX_SEGMENTS_PER_REQUEST:
        return _reject(req, f"nr_segments {nseg} > {blkif.MAX_SEGMENTS_PER_REQUEST}")
    if nseg == 0 and kind in (Kind.READ, Kind.WRITE):
        return _reject(req, "read/write without segments")
    if limits.read_only and kind is not Kind.READ:
        return _reject(req, "write to a read-only device")
    return _plan(req, req.operation, kind, req.sector_number, req.segments, limits=limits)


def _validate_indirect(
    req: IndirectRequest, limits: DeviceLimits, read_indirect: IndirectReader | None
) -> Verdict:
    # Linux answers with the indirect_op as the response operation; blkfront checks it.
    op = req.indirect_op
    if limits.max_indirect_segments <= 0 or read_indirect is None:
        return _reject(req, "indirect not advertised", blkif.RSP_EOPNOTSUPP, op)
    if op not in (blkif.OP_READ, blkif.OP_WRITE):
        return _reject(req, f"indirect_op {op} is not READ/WRITE", operation=op)
    nseg = req.nr_segments
    if not 1 <= nseg <= limits.max_indirect_segments:
        return _reject(
            req, f"indirect nr_segments {nseg} outside 1..{limits.max_indirect_segments}", operation=op
        )
    kind = _KIND_OF[op]
    if limits.read_only and kind is Kind.WRITE:
        return _reject(req, "write to a read-only device", operation=op)
    pages = blkif.indirect_pages_needed(nseg)  # <= 8 because nseg <= advertised <= 4096
    try:
        data = read_indirect(req.indirect_grefs[:pages])
        # Decoding the copy: later guest writes to the indirect pages cannot change these segments.
        segments = blkif.decode_indirect_segments(data, nseg)
    except Exception as exc:  # a bad gref is the guest's error, answered, not raised
        return _reject(req, f"indirect pages unusable: {exc}", operation=op)
    return _plan(req, op, kind, req.sector_number, segments, limits=limits)


def _plan(
    req: Request, op: int, kind: Kind, sector: int, segments: Sequence[Segment], *, limits: DeviceLimits
) -> Verdict:
    io: list[IoSegment] = []
    total_sectors = 0
    for seg in segments:
        if seg.last_sect >= blkif.SECTORS_PER_PAGE or seg.first_sect > seg.last_sect:
            return _reject(req, f"bad segment sectors {seg.first_sect}..{seg.last_sect}", operation=op)
        n = seg.last_sect - seg.first_sect + 1
        total_sectors += n
        io.append(IoSegment(seg.gref, seg.first_sect * blkif.SECTOR_SIZE, n * blkif.SECTOR_SIZE))
    if not io:
        return IoPlan(req.id, op, kind, 0, 0)  # pure flush/barrier: no range to check
    if sector + total_sectors > limits.sectors:
        return _reject(
            req, f"sectors {sector}+{total_sectors} beyond device end {limits.sectors}", operation=op
        )
    block_mask = limits.logical_block_size // blkif.SECTOR_SIZE - 1
    if (sector | total_sectors) & block_mask:
        return _reject(
            req, f"I/O not aligned to the {limits.logical_block_size}-byte block size", operation=op
        )
    return IoPlan(req.id, op, kind, sector * blkif.SECTOR_SIZE, total_sectors * blkif.SECTOR_SIZE, tuple(io))


def _validate_discard(req: DiscardRequest, limits: DeviceLimits) -> Verdict:
    if not limits.discard:
        return _reject(req, "discard not advertised", blkif.RSP_EOPNOTSUPP)
    if limits.read_only:
        return _reject(req, "discard on a read-only device")
    if req.sector_number + req.nr_sectors > limits.sectors:
        return _reject(
            req, f"discard {req.sector_number}+{req.nr_sectors} beyond device end {limits.sectors}"
        )
    block_mask = limits.logical_block_size // blkif.SECTOR_SIZE - 1
    if (req.sector_number | req.nr_sectors) & block_mask:
        return _reject(req, "discard not aligned to the block size")
    secure = bool(req.flag & blkif.DISCARD_SECURE) and limits.discard_secure
    return IoPlan(
        req.id,
        req.operation,
        Kind.DISCARD,
        req.sector_number * blkif.SECTOR_SIZE,
        req.nr_sectors * blkif.SECTOR_SIZE,
        secure=secure,
    )
