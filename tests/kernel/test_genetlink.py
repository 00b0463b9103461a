"""Generic netlink and kernel NBD numbers against the kernel's headers, and a real netlink socket.

The host kernel has no nbd module: the NBD commands themselves run in the dm lane's QEMU guest
(tests/dm/scenarios.py, nbd_delete_on_close). Here the generic netlink client talks to the real
kernel's controller, and asking for the missing NBD family gives the coded error with its hint.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xenblockctl.kernel import genetlink, nbd
from xenblockctl.kernel.errors import DeviceError

INCLUDE = Path("/usr/include/linux")


def _header(name: str) -> str:
    path = INCLUDE / name
    if not path.exists():
        pytest.skip(f"{path} missing (Debian package linux-libc-dev)")
    return path.read_text()


def _defines(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, base, shift in re.findall(
        r"#define\s+(\w+)\s+\(?\s*(0x[0-9a-fA-F]+|\d+)\s*(?:<<\s*(\d+))?\s*\)?", text
    ):
        out[name] = int(base, 0) << int(shift or 0)
    return out


def _enums(text: str) -> dict[str, int]:
    """Values of every plain `enum { A, B = 3, C }` member in `text`."""
    out: dict[str, int] = {}
    for body in re.findall(r"enum\s*\w*\s*\{([^}]*)\}", text):
        value = -1
        for raw in body.split(","):
            item = re.sub(r"/\*.*?\*/", "", raw, flags=re.S).strip()
            if not item:
                continue
            name, _, expr = item.partition("=")
            value = (
                int(expr.strip(), 0)
                if expr.strip() and re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*", expr)
                else value + 1
            )
            out[name.strip()] = value
    return out


def test_netlink_numbers() -> None:
    d = _defines(_header("netlink.h"))
    assert d["NETLINK_GENERIC"] == genetlink.NETLINK_GENERIC
    assert d["NLM_F_REQUEST"] == genetlink.NLM_F_REQUEST
    assert d["NLM_F_ACK"] == genetlink.NLM_F_ACK
    assert d["NLMSG_ERROR"] == genetlink.NLMSG_ERROR
    assert d["NLMSG_DONE"] == genetlink.NLMSG_DONE
    assert d["NLA_F_NESTED"] == genetlink.NLA_F_NESTED
    g = _header("genetlink.h")
    assert re.search(r"#define\s+GENL_ID_CTRL\s+NLMSG_MIN_TYPE\b", g)
    assert d["NLMSG_MIN_TYPE"] == genetlink.GENL_ID_CTRL
    e = _enums(g)
    assert e["CTRL_CMD_GETFAMILY"] == genetlink.CTRL_CMD_GETFAMILY
    assert e["CTRL_ATTR_FAMILY_ID"] == genetlink.CTRL_ATTR_FAMILY_ID
    assert e["CTRL_ATTR_FAMILY_NAME"] == genetlink.CTRL_ATTR_FAMILY_NAME


NBD_PAIRS = {
    "NBD_CMD_CONNECT": nbd.CMD_CONNECT,
    "NBD_CMD_DISCONNECT": nbd.CMD_DISCONNECT,
    "NBD_CMD_RECONFIGURE": nbd.CMD_RECONFIGURE,
    "NBD_CMD_STATUS": nbd.CMD_STATUS,
    "NBD_ATTR_INDEX": nbd.ATTR_INDEX,
    "NBD_ATTR_SIZE_BYTES": nbd.ATTR_SIZE_BYTES,
    "NBD_ATTR_BLOCK_SIZE_BYTES": nbd.ATTR_BLOCK_SIZE_BYTES,
    "NBD_ATTR_TIMEOUT": nbd.ATTR_TIMEOUT,
    "NBD_ATTR_SERVER_FLAGS": nbd.ATTR_SERVER_FLAGS,
    "NBD_ATTR_CLIENT_FLAGS": nbd.ATTR_CLIENT_FLAGS,
    "NBD_ATTR_SOCKETS": nbd.ATTR_SOCKETS,
    "NBD_ATTR_DEAD_CONN_TIMEOUT": nbd.ATTR_DEAD_CONN_TIMEOUT,
    "NBD_ATTR_DEVICE_LIST": nbd.ATTR_DEVICE_LIST,
    "NBD_ATTR_BACKEND_IDENTIFIER": nbd.ATTR_BACKEND_IDENTIFIER,
    "NBD_SOCK_ITEM": nbd.SOCK_ITEM,
    "NBD_SOCK_FD": nbd.SOCK_FD,
    "NBD_DEVICE_ITEM": nbd.DEVICE_ITEM,
    "NBD_DEVICE_INDEX": nbd.DEVICE_INDEX,
    "NBD_DEVICE_CONNECTED": nbd.DEVICE_CONNECTED,
}


@pytest.mark.parametrize("name", sorted(NBD_PAIRS))
def test_nbd_netlink_numbers(name: str) -> None:
    enums = _enums(_header("nbd-netlink.h"))
    assert enums[name] == NBD_PAIRS[name]


def test_nbd_client_flags_and_family() -> None:
    d = _defines(_header("nbd.h"))
    assert d["NBD_CFLAG_DESTROY_ON_DISCONNECT"] == nbd.CFLAG_DESTROY_ON_DISCONNECT
    assert d["NBD_CFLAG_DISCONNECT_ON_CLOSE"] == nbd.CFLAG_DISCONNECT_ON_CLOSE
    text = _header("nbd-netlink.h")
    assert re.search(r'#define\s+NBD_GENL_FAMILY_NAME\s+"nbd"', text)
    assert _defines(text)["NBD_GENL_VERSION"] == nbd.VERSION
    assert _defines(_header("major.h"))["NBD_MAJOR"] == nbd.NBD_MAJOR


def test_attribute_encoding_round_trips() -> None:
    raw = genetlink.attr_u32(1, 7) + genetlink.attr_str(10, "xenblockctl:x") + genetlink.attr_u64(2, 1 << 40)
    parsed = genetlink.parse_attrs(raw)
    assert parsed[1] == (7).to_bytes(4, "little")
    assert parsed[10] == b"xenblockctl:x\0"
    assert parsed[2] == (1 << 40).to_bytes(8, "little")
    nest = genetlink.nested(7, genetlink.nested(1, genetlink.attr_u32(1, 5)))
    (outer,) = genetlink.parse_attrs(nest).values()
    (inner,) = genetlink.parse_attrs(outer).values()
    assert genetlink.parse_attrs(inner)[1] == (5).to_bytes(4, "little")
    with pytest.raises(OSError, match="malformed"):
        genetlink.parse_attrs(b"\x20\x00\x01\x00abcd")  # claims 32 bytes, has 8


def test_the_real_controller_resolves_itself() -> None:
    with genetlink.GenlSocket("nlctrl") as sock:
        assert sock.family_id == genetlink.GENL_ID_CTRL


def test_missing_nbd_family_is_a_coded_error_with_the_fix() -> None:
    if Path("/sys/module/nbd").exists():
        pytest.skip("this kernel has nbd loaded: the dm lane covers the real commands")
    with pytest.raises(DeviceError) as info:
        nbd.connect(0, 1 << 20, 1, "xenblockctl:test")
    assert info.value.code == "nbd-device"
    assert "modprobe nbd nbds_max=0" in str(info.value)
