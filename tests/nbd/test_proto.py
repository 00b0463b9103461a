"""Every NBD constant we send or trust, checked against an independent source.

Where the kernel's `linux/nbd.h` defines the same thing, it must agree (it is a second reading of
the spec). The header lacks transmission bits 4, 6, 7, 9, 10 and 11, so the flags are also checked
against libnbd's `nbdinfo --json` view of real servers, which decodes them with its own table.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.nbd import NbdServerFactory
from xenblockctl.nbd import client, proto, uri

HEADER = Path("/usr/include/linux/nbd.h")


def _header_values() -> dict[str, int]:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} missing (Debian package linux-libc-dev)")
    text = HEADER.read_text()
    values: dict[str, int] = {}
    for name, expr in re.findall(r"#define\s+(NBD_\w+)\s+\(?\s*([0-9x]+\s*(?:<<\s*\d+)?)\s*\)?", text):
        base, _, shift = expr.partition("<<")
        values[name] = int(base.strip(), 0) << (int(shift) if shift else 0)
    for name, value in re.findall(r"\b(NBD_CMD_\w+)\s*=\s*(\d+)", text):
        values[name] = int(value)
    return values


#: header name -> our value, for everything both define
PAIRS = {
    "NBD_REQUEST_MAGIC": proto.REQUEST_MAGIC,
    "NBD_REPLY_MAGIC": proto.SIMPLE_REPLY_MAGIC,
    "NBD_CMD_READ": proto.CMD_READ,
    "NBD_CMD_WRITE": proto.CMD_WRITE,
    "NBD_CMD_DISC": proto.CMD_DISC,
    "NBD_CMD_FLUSH": proto.CMD_FLUSH,
    "NBD_CMD_TRIM": proto.CMD_TRIM,
    "NBD_FLAG_HAS_FLAGS": proto.TFLAG_HAS_FLAGS,
    "NBD_FLAG_READ_ONLY": proto.TFLAG_READ_ONLY,
    "NBD_FLAG_SEND_FLUSH": proto.TFLAG_SEND_FLUSH,
    "NBD_FLAG_SEND_FUA": proto.TFLAG_SEND_FUA,
    "NBD_FLAG_SEND_TRIM": proto.TFLAG_SEND_TRIM,
    "NBD_FLAG_CAN_MULTI_CONN": proto.TFLAG_CAN_MULTI_CONN,
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_constant_agrees_with_the_kernel_header(name: str) -> None:
    values = _header_values()
    assert name in values, f"{HEADER} no longer defines {name}"
    assert values[name] == PAIRS[name], f"{name}: header {values[name]:#x}, ours {PAIRS[name]:#x}"


def test_fua_is_bit_0_on_the_wire_though_the_kernel_header_says_bit_16() -> None:
    # The kernel packs command flags into the upper 16 bits of its 32-bit type word; the wire's
    # command-flags field is its own 16 bits (doc/proto.md). Taking the header's value would send 0.
    assert _header_values()["NBD_CMD_FLAG_FUA"] == proto.CMD_FLAG_FUA << 16
    packed = proto.pack_request(proto.CMD_WRITE, 7, 512, 4096, proto.CMD_FLAG_FUA)
    assert packed[4:6] == b"\x00\x01"
    assert packed[6:8] == b"\x00\x01"


def test_multi_conn_and_cache_bits_are_the_specs() -> None:
    # the seed lesson: SEND_CACHE once shipped at bit 8, which is CAN_MULTI_CONN
    assert proto.TFLAG_CAN_MULTI_CONN == 0x100
    assert proto.TFLAG_SEND_CACHE == 0x400
    assert len(set(proto.TFLAG_NAMES)) == len(proto.TFLAG_NAMES) == 10
    assert all(bit & (bit - 1) == 0 for bit in proto.TFLAG_NAMES)


def test_request_and_reply_layouts() -> None:
    assert proto.REQUEST.size == 28
    assert proto.SIMPLE_REPLY.size == 16
    assert proto.OPTION_REPLY.size == 20
    assert proto.GREETING.size == 18
    assert proto.INFO_EXPORT_BODY.size == 12
    assert proto.INFO_BLOCK_SIZE_BODY.size == 14


# --- transmission flags against nbdinfo -------------------------------------------------------------
# SEND_DF is set only when structured replies were negotiated (doc/proto.md): nbdinfo negotiates
# them and we never do, so that one bit legitimately differs.
NOT_COMPARABLE = {"can_df"}
#: facts from ../shared/reference/remote-storage.md: what these servers advertise
EXPECTED = {
    "nbdkit": {"can_multi_conn": True, "can_cache": True},
    "qemu-nbd": {"can_multi_conn": False, "can_cache": True},
    "qsd": {"can_multi_conn": True, "can_cache": True},
}


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd", "qsd"])
def test_transmission_flags_agree_with_nbdinfo(
    nbd_server: NbdServerFactory, kind: str, tmp_path: Path
) -> None:
    nbdinfo = shutil.which("nbdinfo")
    if nbdinfo is None:
        pytest.skip("nbdinfo not installed (Debian package libnbd-bin)")
    if kind == "nbdkit":
        image = tmp_path / "kit.raw"
        image.write_bytes(b"\0" * (1 << 20))
        server = nbd_server(kind, extra=["file", f"file={image}"])
    else:
        server = nbd_server(kind)
    parsed = uri.parse(server.uri)
    with client.NbdClient.connect(parsed, timeout=5) as c:
        ours = c.info.flags
    out = subprocess.run(
        [nbdinfo, "--json", server.uri], capture_output=True, text=True, timeout=30, check=True
    )
    (theirs,) = json.loads(out.stdout)["exports"]
    for bit, name in proto.TFLAG_NAMES.items():
        if name in NOT_COMPARABLE:
            continue
        assert bool(ours & bit) == theirs[name], (
            f"{kind}: {name}: ours {bool(ours & bit)}, nbdinfo {theirs[name]}"
        )
    for name, want in EXPECTED[kind].items():
        assert theirs[name] is want, f"{kind} {name}: the reference says {want}"
    assert theirs["export-size"] > 0
