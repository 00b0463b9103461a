"""Hand-written loop/block ABI against the kernel headers, and codec round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.cheaders import c_values
from xenblockctl.kernel import ioctls, loop_abi
from xenblockctl.kernel.loop_abi import LoopConfig, LoopFlags, LoopInfo64

LOOP_NUMBERS = [
    "LOOP_SET_FD",
    "LOOP_CLR_FD",
    "LOOP_SET_STATUS64",
    "LOOP_GET_STATUS64",
    "LOOP_CHANGE_FD",
    "LOOP_SET_CAPACITY",
    "LOOP_SET_DIRECT_IO",
    "LOOP_SET_BLOCK_SIZE",
    "LOOP_CONFIGURE",
    "LOOP_CTL_ADD",
    "LOOP_CTL_REMOVE",
    "LOOP_CTL_GET_FREE",
    "LO_NAME_SIZE",
    "LO_KEY_SIZE",
]
BLOCK_NUMBERS = [
    "BLKROSET",
    "BLKROGET",
    "BLKRRPART",
    "BLKGETSIZE",
    "BLKFLSBUF",
    "BLKSSZGET",
    "BLKBSZGET",
    "BLKGETSIZE64",
    "BLKDISCARD",
    "BLKIOMIN",
    "BLKIOOPT",
    "BLKPBSZGET",
    "BLKZEROOUT",
    "BLKGETDISKSEQ",
]
INFO64_FIELDS = {
    "lo_device": 0,
    "lo_inode": 8,
    "lo_rdevice": 16,
    "lo_offset": 24,
    "lo_sizelimit": 32,
    "lo_number": 40,
    "lo_encrypt_type": 44,
    "lo_encrypt_key_size": 48,
    "lo_flags": 52,
    "lo_file_name": 56,
    "lo_crypt_name": 120,
    "lo_encrypt_key": 184,
    "lo_init": 216,
}


@pytest.fixture(scope="module")
def header_values() -> dict[str, int]:
    exprs = {name: name for name in LOOP_NUMBERS + BLOCK_NUMBERS}
    exprs |= {f"LO_FLAGS_{flag.name}": f"LO_FLAGS_{flag.name}" for flag in LoopFlags}
    exprs["sizeof_info64"] = "sizeof(struct loop_info64)"
    exprs["sizeof_config"] = "sizeof(struct loop_config)"
    exprs["config_info"] = "offsetof(struct loop_config, info)"
    exprs["config_reserved"] = "offsetof(struct loop_config, __reserved)"
    exprs["config_block_size"] = "offsetof(struct loop_config, block_size)"
    for field, _ in INFO64_FIELDS.items():
        exprs[f"off_{field}"] = f"offsetof(struct loop_info64, {field})"
    return c_values(["linux/loop.h", "linux/fs.h"], exprs)


@pytest.mark.parametrize("name", LOOP_NUMBERS)
def test_loop_numbers_match_headers(header_values: dict[str, int], name: str) -> None:
    assert getattr(loop_abi, name) == header_values[name]


@pytest.mark.parametrize("name", BLOCK_NUMBERS)
def test_block_ioctls_match_headers(header_values: dict[str, int], name: str) -> None:
    assert getattr(ioctls, name) == header_values[name]


def test_loop_flags_match_headers(header_values: dict[str, int]) -> None:
    for flag in LoopFlags:
        assert flag.value == header_values[f"LO_FLAGS_{flag.name}"]


def test_struct_layouts_match_headers(header_values: dict[str, int]) -> None:
    assert loop_abi.LOOP_INFO64_SIZE == header_values["sizeof_info64"] == 232
    assert loop_abi.LOOP_CONFIG_SIZE == header_values["sizeof_config"] == 304
    assert header_values["config_block_size"] == 4
    assert header_values["config_info"] == 8
    assert header_values["config_reserved"] == 240
    for field, offset in INFO64_FIELDS.items():
        assert header_values[f"off_{field}"] == offset, field


def test_field_offsets_in_packed_bytes() -> None:
    """Place a marker in each field and find it at the header's offset in our packed bytes."""
    raw = LoopInfo64(lo_offset=0x1111, lo_flags=0x14, lo_file_name=b"tag").pack()
    assert int.from_bytes(raw[24:32], "little") == 0x1111
    assert int.from_bytes(raw[52:56], "little") == 0x14
    assert raw[56:60] == b"tag\0"
    cfg = LoopConfig(fd=9, block_size=512, info=LoopInfo64(lo_flags=4)).pack()
    assert int.from_bytes(cfg[0:4], "little") == 9
    assert int.from_bytes(cfg[4:8], "little") == 512
    assert int.from_bytes(cfg[8 + 52 : 8 + 56], "little") == 4
    assert len(cfg) == 304


u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
cname = st.binary(max_size=63).map(lambda b: b.replace(b"\0", b"a"))


@st.composite
def infos(draw: st.DrawFn) -> LoopInfo64:
    return LoopInfo64(
        lo_device=draw(u64),
        lo_inode=draw(u64),
        lo_rdevice=draw(u64),
        lo_offset=draw(u64),
        lo_sizelimit=draw(u64),
        lo_number=draw(u32),
        lo_encrypt_type=draw(u32),
        lo_encrypt_key_size=draw(u32),
        lo_flags=draw(u32),
        lo_file_name=draw(cname),
        lo_crypt_name=draw(cname),
        lo_encrypt_key=draw(st.binary(max_size=32).map(lambda b: b.rstrip(b"\0"))),
        lo_init=(draw(u64), draw(u64)),
    )


@given(infos())
def test_info64_round_trips(info: LoopInfo64) -> None:
    raw = info.pack()
    assert len(raw) == 232
    assert LoopInfo64.unpack(raw) == info


@given(infos(), u32, u32, st.tuples(*[u64] * 8))
def test_config_round_trips(info: LoopInfo64, fd: int, block_size: int, reserved: tuple[int, ...]) -> None:
    cfg = LoopConfig(fd=fd, block_size=block_size, info=info, reserved=reserved)
    assert LoopConfig.unpack(cfg.pack()) == cfg


def test_name_overflow_is_refused() -> None:
    with pytest.raises(ValueError, match="63 bytes"):
        LoopInfo64(lo_file_name=b"x" * 64).pack()


def test_make_tag_bounds() -> None:
    from xenblockctl.kernel import loop

    assert loop.make_tag(3, 51712) == "xenblockctl:3:51712"
    with pytest.raises(ValueError, match="too long"):
        loop.make_tag("x" * 60)


def test_ioc_encoding() -> None:
    assert ioctls.ior(0x12, 128, 8) == 0x80081280
    assert ioctls.iowr(0xFD, 0, 312) == 0xC138FD00
    assert ioctls.io(0x12, 94) == 0x125E
