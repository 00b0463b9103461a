"""The NBD protocol's numbers, each from NetworkBlockDevice/nbd `doc/proto.md`, and its wire layouts.

Every value here is checked by a test: against the kernel's `linux/nbd.h` where it defines the
same thing, and the transmission flags against libnbd's `nbdinfo --json` view of real servers.
A flag at the wrong bit is not a cosmetic bug: a server once advertised SEND_CACHE at bit 8,
which the spec (and Linux since 4.10) reads as CAN_MULTI_CONN, and clients that trusted it spread
writes over connections whose caches were not shared.

Bit positions are written as `1 << n` with n as the spec numbers them, so a reader can compare
line by line. Command flags are the 16-bit wire field: `linux/nbd.h`'s `NBD_CMD_FLAG_FUA` is
`1 << 16` because the kernel packs flags into the upper half of its 32-bit type word; on the wire
FUA is bit 0 (see CMD_FLAG_FUA).
"""

from __future__ import annotations

import struct

# --- magics ---------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes from every server
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle servers, and every client option
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # never negotiated by us; recognised to name the violation

#: the IANA-assigned port, the default of an `nbd://` URI without one
DEFAULT_PORT = 10809

# --- handshake flags (server, 16 bits) and client flags (32 bits) ---------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# --- options ------------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

# --- option reply types ---------------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR + 1
REP_ERR_POLICY = REP_FLAG_ERROR + 2
REP_ERR_INVALID = REP_FLAG_ERROR + 3
REP_ERR_PLATFORM = REP_FLAG_ERROR + 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR + 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9
REP_ERR_EXT_HEADER_REQD = REP_FLAG_ERROR + 10

#: what an admin reads in an error: the spec's name, without the prefix
REP_ERROR_NAMES = {
    REP_ERR_UNSUP: "unsupported option",
    REP_ERR_POLICY: "refused by server policy",
    REP_ERR_INVALID: "invalid request",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "the server requires TLS (xenblockctl speaks NBD without TLS)",
    REP_ERR_UNKNOWN: "no such export",
    REP_ERR_SHUTDOWN: "the server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "the server requires block-size negotiation",
    REP_ERR_TOO_BIG: "request too big",
    REP_ERR_EXT_HEADER_REQD: "the server requires extended headers",
}

# --- NBD_INFO types (in NBD_REP_INFO replies) -----------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission flags (16 bits) -----------------------------------------------------------------
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

#: flag -> the name libnbd's `nbdinfo --json` gives the same capability (the tests compare)
TFLAG_NAMES = {
    TFLAG_READ_ONLY: "is_read_only",
    TFLAG_SEND_FLUSH: "can_flush",
    TFLAG_SEND_FUA: "can_fua",
    TFLAG_ROTATIONAL: "is_rotational",
    TFLAG_SEND_TRIM: "can_trim",
    TFLAG_SEND_WRITE_ZEROES: "can_zero",
    TFLAG_SEND_DF: "can_df",
    TFLAG_CAN_MULTI_CONN: "can_multi_conn",
    TFLAG_SEND_CACHE: "can_cache",
    TFLAG_SEND_FAST_ZERO: "can_fast_zero",
}

# --- commands and command flags (16-bit wire fields) ----------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# --- error values in replies: fixed numbers, not the host's errno ---------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERROR_NAMES = {
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# --- limits ---------------------------------------------------------------------------------------
#: the spec's bound on every string (export names, descriptions, error messages)
MAX_STRING = 4096
#: the largest option reply we read: an NBD_REP_INFO or an error string is far smaller; a longer
#: one is a broken or hostile server, not a reason to allocate its length
MAX_OPTION_REPLY = 2 * MAX_STRING

# --- wire layouts (network byte order) ------------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
INFO_EXPORT_BODY = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie


def flag_names(flags: int) -> list[str]:
    """The transmission flags set in `flags`, by their nbdinfo names (HAS_FLAGS left out)."""
    return [name for bit, name in TFLAG_NAMES.items() if flags & bit]


def pack_request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
