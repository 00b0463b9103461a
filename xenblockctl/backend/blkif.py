"""The blkif ring ABI (xen/include/public/io/blkif.h, ring.h): constants and byte-exact codecs.

Two layouts exist because `uint64_t` is 8-aligned on x86_64 and 4-aligned on i386; a 32-bit guest on
a 64-bit dom0 writes the 32-bit layout, and says so in its `protocol` node. Offsets are checked against
the public headers by tests/unit/test_blkif_cheaders.py. Every codec works on a *copy* of the ring slot
(see ring.py): decoding never touches shared memory.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from xenblockctl.errors import XenblockError

# --- operations (blkif.h) -------------------------------------------------------------------------
OP_READ: Final = 0
OP_WRITE: Final = 1
OP_WRITE_BARRIER: Final = 2
OP_FLUSH_DISKCACHE: Final = 3
OP_RESERVED_1: Final = 4  # SLES; never valid here
OP_DISCARD: Final = 5
OP_INDIRECT: Final = 6

#: ops that share the `struct blkif_request` (segment) layout.
SEGMENT_OPS: Final = frozenset({OP_READ, OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE})

# --- response statuses (int16) --------------------------------------------------------------------
RSP_OKAY: Final = 0
RSP_ERROR: Final = -1
RSP_EOPNOTSUPP: Final = -2

# --- limits and units -----------------------------------------------------------------------------
MAX_SEGMENTS_PER_REQUEST: Final = 11
MAX_INDIRECT_PAGES_PER_REQUEST: Final = 8
PAGE_SIZE: Final = 4096
SECTOR_SIZE: Final = 512  # ring sector units are 512 bytes whatever `sector-size` says
SECTORS_PER_PAGE: Final = PAGE_SIZE // SECTOR_SIZE  # first_sect/last_sect range is 0..7
SEGMENT_SIZE: Final = 8  # struct blkif_request_segment, both ABIs
SEGMENTS_PER_INDIRECT_PAGE: Final = PAGE_SIZE // SEGMENT_SIZE  # 512
#: the most indirect segments one request can name (8 pages x 512).
MAX_INDIRECT_SEGMENTS_ABI: Final = MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE
#: what we advertise in `feature-max-indirect-segments` by default (Linux blkback: 256, one page).
DEFAULT_MAX_INDIRECT_SEGMENTS: Final = 256
#: `max-ring-page-order` we advertise: 16 pages, as Linux blkback does by default.
MAX_RING_PAGE_ORDER: Final = 4

DISCARD_SECURE: Final = 1 << 0

# --- `info` bits ----------------------------------------------------------------------------------
VDISK_CDROM: Final = 0x1
VDISK_REMOVABLE: Final = 0x2
VDISK_READONLY: Final = 0x4

# --- shared ring header ---------------------------------------------------------------------------
SRING_HEADER_SIZE: Final = 64  # req_prod, req_event, rsp_prod, rsp_event, pvt, __pad[44]

# --- protocol strings (xen/include/public/io/protocols.h) -----------------------------------------
PROTOCOL_X86_32: Final = "x86_32-abi"
PROTOCOL_X86_64: Final = "x86_64-abi"
#: A frontend that writes no `protocol` is assumed to speak x86_32: that is what Linux blkback does on
#: x86 (BLKIF_PROTOCOL_DEFAULT), and matching the kernel backend keeps old guests working the same way
#: whichever backend serves them. (QEMU assumes native instead; see xen-block-protocol.md §6.5.)
DEFAULT_PROTOCOL: Final = PROTOCOL_X86_32


class BlkifError(XenblockError):
    """A frontend-supplied ring parameter we cannot accept (bad protocol, ring order, ...)."""

    code = "blkif-invalid"


@dataclass(frozen=True, slots=True)
class Segment:
    """One `struct blkif_request_segment`: a 512-byte sector range [first_sect, last_sect] of a page."""

    gref: int
    first_sect: int
    last_sect: int


@dataclass(frozen=True, slots=True)
class SegmentRequest:
    """READ / WRITE / WRITE_BARRIER / FLUSH_DISKCACHE (`struct blkif_request`).

    `segments` holds the first min(nr_segments, 11) slots: `nr_segments` is kept as the guest wrote
    it so validation can refuse out-of-range counts.
    """

    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class DiscardRequest:
    """`struct blkif_request_discard`."""

    flag: int
    handle: int
    id: int
    sector_number: int
    nr_sectors: int
    operation: int = OP_DISCARD


@dataclass(frozen=True, slots=True)
class IndirectRequest:
    """`struct blkif_request_indirect`: segments live in up to 8 granted pages (`indirect_grefs`)."""

    indirect_op: int
    nr_segments: int
    id: int
    sector_number: int
    handle: int
    indirect_grefs: tuple[int, ...]  # always 8 entries, as in the slot
    operation: int = OP_INDIRECT


@dataclass(frozen=True, slots=True)
class UnknownRequest:
    """Any other opcode: like Linux blkback we copy only `id`, so the answer can carry it."""

    operation: int
    id: int


Request = SegmentRequest | DiscardRequest | IndirectRequest | UnknownRequest


class Response(NamedTuple):
    """`struct blkif_response` (a NamedTuple: the frontend builds one per completed request)."""

    id: int
    operation: int
    status: int


class Abi:
    """One request/response layout. Use the module-level `X86_64` and `X86_32` instances."""

    def __init__(self, protocol: str, *, id_offset: int, pad_after_handle: bool) -> None:
        self.protocol = protocol
        pad = "xxxx" if pad_after_handle else ""
        self.id_offset = id_offset
        # header + 11 segments in one Struct: one unpack call per request.
        self._segreq = struct.Struct("=BBH" + pad + "QQ" + "IBBxx" * MAX_SEGMENTS_PER_REQUEST)
        #: (operation, nr_segments, handle, id, sector_number) of a segment request without its
        #: descriptors: the data plane reads only the nr_segments descriptors that are in use.
        self.segment_header: Final = struct.Struct("=BBH" + pad + "QQ")
        self._discard = struct.Struct("=BBH" + pad + "QQQ")
        if pad_after_handle:
            # x86_64: handle @24, 2 pad bytes, grefs @28, 4 bytes of tail padding to 64.
            self._indirect = struct.Struct("=BBHxxxxQQHxx8Ixxxx")
            self._response = struct.Struct("=QBxhxxxx")
        else:
            # x86_32: handle @20, 2 pad bytes, grefs @24, explicit `uint64_t pad` to 64.
            self._indirect = struct.Struct("=BBHQQHxx8I8x")
            self._response = struct.Struct("=QBxh")
        self._id = struct.Struct("=Q")
        self._zero_slot = bytes(self._segreq.size)
        #: (id, operation, status) with every padding byte packed as zero.
        self.response_struct: Final = self._response
        self.indirect_struct: Final = self._indirect
        self.discard_struct: Final = self._discard
        #: sizeof(union blkif_sring_entry): the request is the largest member.
        self.entry_size: int = self._segreq.size
        self.response_size: int = self._response.size
        self.indirect_size: int = self._indirect.size
        self.discard_size: int = self._discard.size
        self.segments_offset: int = self._segreq.size - MAX_SEGMENTS_PER_REQUEST * SEGMENT_SIZE
        assert self.segments_offset == self.segment_header.size

    def __repr__(self) -> str:
        return f"Abi({self.protocol!r})"

    # -- requests -------------------------------------------------------------------------------
    def decode_request(self, slot: bytes) -> Request:
        """Decode a copied ring slot (at least `entry_size` bytes)."""
        op = slot[0]
        if op in SEGMENT_OPS:
            v = self._segreq.unpack_from(slot)
            nr = v[1]
            count = min(nr, MAX_SEGMENTS_PER_REQUEST)
            segs = tuple(Segment(v[5 + 3 * i], v[6 + 3 * i], v[7 + 3 * i]) for i in range(count))
            return SegmentRequest(op, nr, v[2], v[3], v[4], segs)
        if op == OP_DISCARD:
            _, flag, handle, rid, sector, nr_sectors = self._discard.unpack_from(slot)
            return DiscardRequest(flag, handle, rid, sector, nr_sectors)
        if op == OP_INDIRECT:
            v = self._indirect.unpack_from(slot)
            return IndirectRequest(v[1], v[2], v[3], v[4], v[5], tuple(v[6:14]))
        (rid,) = self._id.unpack_from(slot, self.id_offset)
        return UnknownRequest(op, rid)

    def encode_request(self, req: Request) -> bytes:
        """Encode into a full `entry_size` slot image (unused bytes zero). Frontend side and tests."""
        out = bytearray(self.entry_size)
        if isinstance(req, SegmentRequest):
            self.pack_segment_request_into(
                out,
                0,
                req.operation,
                req.id,
                req.sector_number,
                segments=[(s.gref, s.first_sect, s.last_sect) for s in req.segments],
                nr_segments=req.nr_segments,
                handle=req.handle,
            )
        elif isinstance(req, DiscardRequest):
            self._discard.pack_into(
                out, 0, req.operation, req.flag, req.handle, req.id, req.sector_number, req.nr_sectors
            )
        elif isinstance(req, IndirectRequest):
            grefs = list(req.indirect_grefs[:MAX_INDIRECT_PAGES_PER_REQUEST])
            grefs += [0] * (MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
            self._indirect.pack_into(
                out,
                0,
                req.operation,
                req.indirect_op,
                req.nr_segments,
                req.id,
                req.sector_number,
                req.handle,
                *grefs,
            )
        else:
            out[0] = req.operation
            self._id.pack_into(out, self.id_offset, req.id)
        return bytes(out)

    def pack_segment_request_into(
        self,
        buf: memoryview | bytearray,
        offset: int,
        operation: int,
        rid: int,
        sector: int,
        *,
        segments: Sequence[tuple[int, int, int]],
        nr_segments: int | None = None,
        handle: int = 0,
    ) -> None:
        """Write a whole segment-request slot (unused descriptors zero) at `offset` of `buf`.

        `segments` are (gref, first_sect, last_sect), at most 11; `nr_segments` defaults to their
        count (a hostile caller may claim another). Frontend side: our blkfront packs straight
        into its ring slot with this."""
        used = segments[:MAX_SEGMENTS_PER_REQUEST]
        nr = len(used) if nr_segments is None else nr_segments
        buf[offset : offset + self.entry_size] = self._zero_slot  # unused descriptors and pads
        self.segment_header.pack_into(buf, offset, operation, nr, handle, rid, sector)
        at = offset + self.segments_offset
        for gref, first, last in used:
            SEGMENT_STRUCT.pack_into(buf, at, gref, first, last)
            at += SEGMENT_SIZE

    # -- responses ------------------------------------------------------------------------------
    def pack_response_into(self, buf: memoryview | bytearray, offset: int, rsp: Response) -> None:
        """Write a response at `offset`, padding bytes included as zeros.

        Packing the whole struct (pad bytes are `x` = zero) is what keeps XSA-216 away: no stale
        byte of ours reaches the guest.
        """
        self._response.pack_into(buf, offset, rsp.id, rsp.operation, rsp.status)

    def encode_response(self, rsp: Response) -> bytes:
        return self._response.pack(rsp.id, rsp.operation, rsp.status)

    def decode_response(self, data: bytes) -> Response:
        rid, op, status = self._response.unpack_from(data)
        return Response(rid, op, status)


X86_64: Final = Abi(PROTOCOL_X86_64, id_offset=8, pad_after_handle=True)
X86_32: Final = Abi(PROTOCOL_X86_32, id_offset=4, pad_after_handle=False)
ABIS: Final = {PROTOCOL_X86_64: X86_64, PROTOCOL_X86_32: X86_32}


def printable(text: str, limit: int = 40) -> str:
    """A guest-written string made safe for one log/error line: printable ASCII, bounded."""
    shown = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text[:limit])
    return shown + ("..." if len(text) > limit else "")


def abi_for_protocol(protocol: str | None) -> Abi:
    """The layout for a frontend's `protocol` node; missing or empty means DEFAULT_PROTOCOL.

    `arm-abi` is refused: its layout equals x86_64 on paper but has not been checked by compilation.
    """
    if protocol is None or protocol.strip("\0 \n") == "":
        return ABIS[DEFAULT_PROTOCOL]
    abi = ABIS.get(protocol.strip("\0 \n"))
    if abi is None:
        raise BlkifError(f"unsupported frontend protocol '{printable(protocol)}'", code="blkif-invalid")
    return abi


# --- indirect segment pages -----------------------------------------------------------------------
#: one `struct blkif_request_segment` (gref, first_sect, last_sect, 2 pad bytes): same in both ABIs,
#: inline in a request slot and in indirect pages alike.
SEGMENT_STRUCT: Final = struct.Struct("=IBBxx")
_SEGMENT = SEGMENT_STRUCT


def decode_indirect_segments(data: bytes, count: int) -> tuple[Segment, ...]:
    """The first `count` segment descriptors of copied indirect pages (512 per page)."""
    if count * SEGMENT_SIZE > len(data):
        raise ValueError("indirect data shorter than the segment count")
    return tuple(Segment(g, f, last) for g, f, last in _SEGMENT.iter_unpack(data[: count * SEGMENT_SIZE]))


def encode_indirect_segments(segments: tuple[Segment, ...] | list[Segment]) -> bytes:
    return pack_descriptors([(s.gref, s.first_sect, s.last_sect) for s in segments])


def pack_descriptors(segments: Sequence[tuple[int, int, int]]) -> bytes:
    """(gref, first_sect, last_sect) triples as consecutive segment descriptors, in one pack call
    (struct still range-checks every field)."""
    flat = [v for seg in segments for v in seg]
    return struct.pack("=" + "IBBxx" * len(segments), *flat)


def whole_page_descriptors(grefs: Sequence[int]) -> bytes:
    """Descriptors (gref, 0, 7) for whole pages: the frontend side of a large request.

    Built with strided byte copies (little-endian gref in bytes 0-3, last_sect 7 in byte 5) instead
    of a Python-level step per page: an indirect request names up to 4096 pages."""
    if sys.byteorder != "little" or array.array("I").itemsize != 4:
        return pack_descriptors([(g, 0, SECTORS_PER_PAGE - 1) for g in grefs])
    n = len(grefs)
    refs = array.array("I", grefs).tobytes()  # refuses a gref outside uint32
    out = bytearray(n * SEGMENT_SIZE)
    for byte in range(4):
        out[byte::SEGMENT_SIZE] = refs[byte::4]
    out[5::SEGMENT_SIZE] = bytes([SECTORS_PER_PAGE - 1]) * n
    return bytes(out)


def indirect_pages_needed(nr_segments: int) -> int:
    """ceil(nr_segments / 512): pages the frontend must grant for this many segments."""
    return -(-nr_segments // SEGMENTS_PER_INDIRECT_PAGE)


# --- ring geometry --------------------------------------------------------------------------------
def _round_down_pow2(n: int) -> int:
    return 0 if n <= 0 else 1 << (n.bit_length() - 1)


def ring_size(nr_pages: int, abi: Abi) -> int:
    """__CONST_RING_SIZE: entries in a ring of `nr_pages` pages, rounded down to a power of two."""
    if nr_pages < 1:
        raise ValueError("a ring has at least one page")
    return _round_down_pow2((nr_pages * PAGE_SIZE - SRING_HEADER_SIZE) // abi.entry_size)


def ring_pages_for_order(order: int, max_order: int = MAX_RING_PAGE_ORDER) -> int:
    """Pages for a frontend's `ring-page-order`, refusing anything above what we advertised."""
    if not 0 <= order <= max_order:
        raise BlkifError(f"ring-page-order {order} outside 0..{max_order}", code="blkif-invalid")
    return 1 << order


def info_bits(*, read_only: bool, cdrom: bool = False, removable: bool = False) -> int:
    """The backend `info` node value."""
    return (
        (VDISK_READONLY if read_only else 0)
        | (VDISK_CDROM if cdrom else 0)
        | (VDISK_REMOVABLE if removable else 0)
    )
