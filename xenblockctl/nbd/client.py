"""Connect to an NBD export: the fixed-newstyle handshake with NBD_OPT_GO, and a synchronous client.

The handshake is the spec's baseline (doc/proto.md, "Baseline"): fixed newstyle, NBD_OPT_GO with
NBD_INFO_EXPORT, simple replies. We ask for NBD_INFO_BLOCK_SIZE too, and so promise to honour the
server's constraints: an export whose minimum block is above 512 bytes is refused here, because a
guest's 512-byte sectors could not be served on it. Structured replies are never negotiated, so a
structured reply is a protocol violation, not something to parse.

Every read from the peer is bounded in time (`timeout`, per operation) and in size (nothing is
allocated from a length the server sent before that length is checked), and every way a peer can
go wrong is a coded NbdError: a server is as untrusted as a guest.

The synchronous client (`NbdClient`) serves the block script (one handshake to check an export),
`identify`, and the tests; the engine pipelines requests by cookie on its own connection (issue 17).
"""

from __future__ import annotations

import contextlib
import os
import socket

from xenblockctl.nbd import proto
from xenblockctl.nbd.errors import NbdError
from xenblockctl.nbd.uri import NbdUri

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the NBD add path)
if TYPE_CHECKING:
    from collections.abc import Callable

#: seconds one connect, handshake step or request may take before the peer counts as gone
DEFAULT_TIMEOUT = 10.0
#: the block size a guest's sectors need the export to accept
SECTOR = 512
#: the oldstyle negotiation's second magic ("cliserv_magic"): recognised only to name it
_OLDSTYLE_MAGIC = 0x00420281861253


class ExportInfo:
    """What the server told us of the export in NBD_OPT_GO's replies."""

    __slots__ = ("description", "flags", "max_payload", "min_block", "preferred_block", "size")

    def __init__(
        self,
        size: int,
        flags: int,
        *,
        min_block: int = 1,
        preferred_block: int = 4096,
        max_payload: int = 32 << 20,
        description: str = "",
    ) -> None:
        self.size = size
        self.flags = flags
        self.min_block = min_block
        self.preferred_block = preferred_block
        self.max_payload = max_payload
        self.description = description

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def read_only(self) -> bool:
        return self.has(proto.TFLAG_READ_ONLY)

    def __repr__(self) -> str:
        return (
            f"ExportInfo(size={self.size}, flags={self.flags:#x} {proto.flag_names(self.flags)},"
            f" blocks={self.min_block}/{self.preferred_block}/{self.max_payload})"
        )


def _peer(uri: NbdUri) -> str:
    return uri.socket_path if uri.is_unix else f"{uri.host}:{uri.port}"


def open_socket(uri: NbdUri, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """A connected socket to the server `uri` names (nbd-unreachable otherwise)."""
    try:
        if uri.is_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(timeout)
                sock.connect(uri.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError:
        raise NbdError(
            f"no connection to {_peer(uri)} within {timeout:g} s", code="nbd-unreachable"
        ) from None
    except OSError as exc:
        raise NbdError(
            f"cannot connect to NBD server {_peer(uri)}: {exc.strerror or exc}",
            code="nbd-unreachable",
            errno=exc.errno,
        ) from None
    return sock


def recv_exact(sock: socket.socket, buf: memoryview, stalled: Callable[[], None]) -> bool:
    """Fill `buf` exactly; False on EOF. `stalled` runs on every socket timeout: it raises to give
    up, or returns to wait again (the engine's link checks its own deadline there).

    Every slice taken of `buf` is released before returning: the engine's data plane releases the
    guest's page views when the request completes, and a live slice would make that fail."""
    got = 0
    while got < buf.nbytes:
        view = buf[got:]
        try:
            n = sock.recv_into(view)
        except TimeoutError:
            stalled()
            continue
        except InterruptedError:
            continue
        finally:
            view.release()
        if n == 0:
            return False
        got += n
    return True


class _Wire:
    """Exact reads and whole writes on a socket, every failure a coded NbdError naming the step."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.timeout = timeout
        sock.settimeout(timeout)

    def recv(self, n: int, step: str, code: str = "nbd-handshake") -> bytes:
        buf = bytearray(n)

        def stalled() -> None:
            raise NbdError(f"{self.peer}: no answer within {self.timeout:g} s ({step})", code=code)

        try:
            complete = recv_exact(self.sock, memoryview(buf), stalled)
        except OSError as exc:
            raise NbdError(
                f"{self.peer}: {step}: {exc.strerror or exc}", code=code, errno=exc.errno
            ) from None
        if not complete:
            raise NbdError(f"{self.peer}: connection closed by the server ({step})", code=code)
        return bytes(buf)

    def send(self, data: bytes, step: str, code: str = "nbd-handshake") -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise NbdError(f"{self.peer}: send stalled for {self.timeout:g} s ({step})", code=code) from None
        except OSError as exc:
            raise NbdError(
                f"{self.peer}: {step}: {exc.strerror or exc}", code=code, errno=exc.errno
            ) from None


def _printable(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def handshake(sock: socket.socket, uri: NbdUri, timeout: float = DEFAULT_TIMEOUT) -> ExportInfo:
    """Negotiate `uri`'s export on the connected `sock`; on return the socket is in transmission."""
    wire = _Wire(sock, _peer(uri), timeout)
    magic, second, hflags = proto.GREETING.unpack(wire.recv(proto.GREETING.size, "greeting"))
    if magic != proto.NBDMAGIC:
        raise NbdError(f"{wire.peer}: not an NBD server (greeting {magic:#018x})")
    if second == _OLDSTYLE_MAGIC:
        raise NbdError(f"{wire.peer}: the server speaks only oldstyle negotiation (no export names)")
    if second != proto.IHAVEOPT:
        raise NbdError(f"{wire.peer}: unknown negotiation magic {second:#018x}")
    if not hflags & proto.FLAG_FIXED_NEWSTYLE:
        raise NbdError(f"{wire.peer}: the server lacks fixed newstyle negotiation, which NBD_OPT_GO needs")
    cflags = proto.FLAG_C_FIXED_NEWSTYLE
    if hflags & proto.FLAG_NO_ZEROES:
        cflags |= proto.FLAG_C_NO_ZEROES
    name = uri.export.encode()
    infos = (proto.INFO_BLOCK_SIZE, proto.INFO_DESCRIPTION)
    data = (
        len(name).to_bytes(4, "big")
        + name
        + len(infos).to_bytes(2, "big")
        + b"".join(i.to_bytes(2, "big") for i in infos)
    )
    wire.send(
        proto.CLIENT_FLAGS.pack(cflags) + proto.OPTION.pack(proto.IHAVEOPT, proto.OPT_GO, len(data)) + data,
        "NBD_OPT_GO",
    )
    return _go_replies(wire, uri)


def _go_replies(wire: _Wire, uri: NbdUri) -> ExportInfo:
    size_flags: tuple[int, int] | None = None
    blocks = (1, 4096, 32 << 20)
    description = ""
    while True:
        magic, option, kind, length = proto.OPTION_REPLY.unpack(
            wire.recv(proto.OPTION_REPLY.size, "option reply")
        )
        if magic != proto.OPTION_REPLY_MAGIC:
            raise NbdError(f"{wire.peer}: bad option reply magic {magic:#x}")
        if option != proto.OPT_GO:
            raise NbdError(f"{wire.peer}: reply to option {option}, but we sent NBD_OPT_GO")
        if length > proto.MAX_OPTION_REPLY:
            raise NbdError(f"{wire.peer}: option reply of {length} bytes (at most {proto.MAX_OPTION_REPLY})")
        body = wire.recv(length, "option reply data") if length else b""
        if kind & proto.REP_FLAG_ERROR:
            why = proto.REP_ERROR_NAMES.get(kind, f"error {kind - proto.REP_FLAG_ERROR}")
            said = f" (server: {_printable(body)})" if body else ""
            raise NbdError(f"{wire.peer}: export {uri.export!r}: {why}{said}", code="nbd-export-refused")
        if kind == proto.REP_ACK:
            if length:
                raise NbdError(f"{wire.peer}: NBD_REP_ACK with {length} bytes of data")
            break
        if kind != proto.REP_INFO:
            raise NbdError(f"{wire.peer}: unexpected reply type {kind} to NBD_OPT_GO")
        if length < 2:
            raise NbdError(f"{wire.peer}: NBD_REP_INFO of {length} bytes")
        info_type = int.from_bytes(body[:2], "big")
        if info_type == proto.INFO_EXPORT:
            if length != proto.INFO_EXPORT_BODY.size:
                raise NbdError(f"{wire.peer}: NBD_INFO_EXPORT of {length} bytes (must be 12)")
            _i, size, tflags = proto.INFO_EXPORT_BODY.unpack(body)
            size_flags = (size, tflags)
        elif info_type == proto.INFO_BLOCK_SIZE:
            if length != proto.INFO_BLOCK_SIZE_BODY.size:
                raise NbdError(f"{wire.peer}: NBD_INFO_BLOCK_SIZE of {length} bytes (must be 14)")
            _i, *got = proto.INFO_BLOCK_SIZE_BODY.unpack(body)
            blocks = (got[0], got[1], got[2])
        elif info_type == proto.INFO_DESCRIPTION:
            description = _printable(body[2:], proto.MAX_STRING)
        # other information types: the spec says a client MUST ignore what it does not know
    if size_flags is None:
        raise NbdError(f"{wire.peer}: NBD_REP_ACK without NBD_INFO_EXPORT")
    info = ExportInfo(
        *size_flags,
        min_block=blocks[0],
        preferred_block=blocks[1],
        max_payload=blocks[2],
        description=description,
    )
    _check_export(wire.peer, uri, info)
    return info


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_export(peer: str, uri: NbdUri, info: ExportInfo) -> None:
    """Refuse an export we could not serve a guest honestly."""
    size, tflags = info.size, info.flags
    if not tflags & proto.TFLAG_HAS_FLAGS:
        raise NbdError(f"{peer}: transmission flags {tflags:#x} lack NBD_FLAG_HAS_FLAGS")
    if size == 0:
        raise NbdError(f"{peer}: export {uri.export!r} has size 0", code="nbd-export-empty")
    if size >= 1 << 63:
        raise NbdError(f"{peer}: export size {size} is beyond what a block device can address")
    min_block, preferred, max_payload = info.min_block, info.preferred_block, info.max_payload
    if not (_power_of_two(min_block) and min_block <= 65536 and _power_of_two(preferred)):
        raise NbdError(f"{peer}: invalid block sizes {min_block}/{preferred}/{max_payload}")
    if preferred < min_block or max_payload < min_block:
        raise NbdError(f"{peer}: inconsistent block sizes {min_block}/{preferred}/{max_payload}")
    if min_block > SECTOR:
        raise NbdError(
            f"{peer}: export {uri.export!r} needs {min_block}-byte blocks; a guest's {SECTOR}-byte"
            " sectors could not be served",
            code="nbd-export-refused",
        )
    if size % SECTOR:
        raise NbdError(
            f"{peer}: export {uri.export!r} is {size} bytes, not a whole number of {SECTOR}-byte sectors",
            code="nbd-export-refused",
        )


class NbdClient:
    """One connection in transmission, one request at a time (simple replies).

    Commands the server did not advertise are refused here with `nbd-io` before anything is sent:
    the spec forbids sending them, and a guest must see an error, never a silent no-op."""

    def __init__(self, sock: socket.socket, uri: NbdUri, info: ExportInfo, timeout: float) -> None:
        self.uri = uri
        self.info = info
        self._sock = sock
        self._wire = _Wire(sock, _peer(uri), timeout)
        self._cookie = 0

    @classmethod
    def connect(cls, uri: NbdUri, timeout: float = DEFAULT_TIMEOUT) -> NbdClient:
        sock = open_socket(uri, timeout)
        try:
            info = handshake(sock, uri, timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock, uri, info, timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _request(self, command: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> int:
        if offset < 0 or length < 0 or offset + length > self.info.size:
            raise NbdError(
                f"{self._wire.peer}: request {offset}+{length} beyond the export's {self.info.size} bytes",
                code="nbd-io",
            )
        self._cookie += 1
        self._wire.send(
            proto.pack_request(command, self._cookie, offset, length, flags) + payload, "request", "nbd-io"
        )
        magic, error, cookie = proto.SIMPLE_REPLY.unpack(
            self._wire.recv(proto.SIMPLE_REPLY.size, "reply", "nbd-io")
        )
        if magic == proto.STRUCTURED_REPLY_MAGIC:
            raise NbdError(f"{self._wire.peer}: structured reply, which we never negotiated", code="nbd-io")
        if magic != proto.SIMPLE_REPLY_MAGIC:
            raise NbdError(f"{self._wire.peer}: bad reply magic {magic:#x}", code="nbd-io")
        if cookie != self._cookie:
            raise NbdError(
                f"{self._wire.peer}: reply for cookie {cookie}, expected {self._cookie}", code="nbd-io"
            )
        return int(error)

    def _check(self, error: int, what: str) -> None:
        if error:
            name = proto.ERROR_NAMES.get(error, f"error {error}")
            raise NbdError(f"{self._wire.peer}: {what} failed: {name}", code="nbd-io")

    def _require(self, flag: int, what: str) -> None:
        if not self.info.has(flag):
            raise NbdError(f"{self._wire.peer}: the export does not offer {what}", code="nbd-io")

    def read(self, offset: int, length: int) -> bytes:
        error = self._request(proto.CMD_READ, offset, length)
        self._check(error, f"READ {offset}+{length}")  # a simple reply carries data only on success
        return self._wire.recv(length, "read data", "nbd-io")

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        if self.info.read_only:
            raise NbdError(f"{self._wire.peer}: the export is read-only", code="nbd-io")
        flags = 0
        if fua:
            self._require(proto.TFLAG_SEND_FUA, "FUA")
            flags = proto.CMD_FLAG_FUA
        self._check(
            self._request(proto.CMD_WRITE, offset, len(data), flags, data), f"WRITE {offset}+{len(data)}"
        )

    def flush(self) -> None:
        self._require(proto.TFLAG_SEND_FLUSH, "FLUSH")
        self._check(self._request(proto.CMD_FLUSH, 0, 0), "FLUSH")

    def trim(self, offset: int, length: int) -> None:
        self._require(proto.TFLAG_SEND_TRIM, "TRIM")
        self._check(self._request(proto.CMD_TRIM, offset, length), f"TRIM {offset}+{length}")

    def close(self) -> None:
        """NBD_CMD_DISC (the clean end of transmission), then close; never raises."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self._sock.settimeout(1.0)
            self._sock.sendall(proto.pack_request(proto.CMD_DISC, 0, 0, 0))
        self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def socket_identity(uri: NbdUri) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, st_ctime_ns) of a unix socket's file: what tells this server's socket
    from one created later at the same path. The inode number alone does not: tmpfs gave a socket
    re-created at the same path the freed inode's number at once (tests/nbd/test_engine_served.py
    caught it); the change time of a new file differs. None for TCP (an address names no file)."""
    if not uri.is_unix:
        return None
    try:
        st = os.stat(uri.socket_path)
    except OSError as exc:
        raise NbdError(
            f"NBD socket {uri.socket_path}: {exc.strerror or exc}", code="nbd-unreachable", errno=exc.errno
        ) from None
    return st.st_dev, st.st_ino, st.st_ctime_ns
