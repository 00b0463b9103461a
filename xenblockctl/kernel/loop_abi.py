"""Loop device ABI (linux/loop.h): ioctl numbers, flags, and codecs for loop_info64 / loop_config.

The loop ioctls are plain numbers with magic 'L' (0x4C), not _IOC-encoded."""

from __future__ import annotations

import _struct as struct  # what struct.py re-exports, without its file: tests/lint/test_hotplug_imports.py

from xenblockctl.enums import IntFlag
from xenblockctl.records import NamedTuple

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CHANGE_FD = 0x4C06
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82

LOOP_MAJOR = 7
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32


class LoopFlags(IntFlag):
    READ_ONLY = 1
    AUTOCLEAR = 4
    PARTSCAN = 8
    DIRECT_IO = 16


#: Flags LOOP_CONFIGURE accepts; any other bit is EINVAL.
CONFIGURE_SETTABLE = LoopFlags.READ_ONLY | LoopFlags.AUTOCLEAR | LoopFlags.PARTSCAN | LoopFlags.DIRECT_IO
#: Flags LOOP_SET_STATUS64 may set and clear (AUTOCLEAR can be turned on and off on a bound device).
SET_STATUS_SETTABLE = LoopFlags.AUTOCLEAR | LoopFlags.PARTSCAN
SET_STATUS_CLEARABLE = LoopFlags.AUTOCLEAR

_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_CONFIG_HEAD = struct.Struct("=II")
_CONFIG_RESERVED = struct.Struct("=8Q")
LOOP_INFO64_SIZE = _INFO64.size  # 232
LOOP_CONFIG_SIZE = _CONFIG_HEAD.size + _INFO64.size + _CONFIG_RESERVED.size  # 304


def _cstr(raw: bytes) -> bytes:
    """A fixed-size C char array up to its first NUL."""
    return raw.split(b"\0", 1)[0]


class LoopInfo64(NamedTuple):
    """struct loop_info64. Only lo_offset, lo_sizelimit, lo_flags and lo_file_name matter to us;
    the crypt fields must stay zero (the kernel removed loop encryption)."""

    lo_device: int = 0
    lo_inode: int = 0
    lo_rdevice: int = 0
    lo_offset: int = 0
    lo_sizelimit: int = 0
    lo_number: int = 0
    lo_encrypt_type: int = 0
    lo_encrypt_key_size: int = 0
    lo_flags: int = 0
    lo_file_name: bytes = b""
    lo_crypt_name: bytes = b""
    lo_encrypt_key: bytes = b""
    lo_init: tuple[int, int] = (0, 0)

    def pack(self) -> bytes:
        if len(self.lo_file_name) >= LO_NAME_SIZE or len(self.lo_crypt_name) >= LO_NAME_SIZE:
            raise ValueError("loop name fields hold at most 63 bytes plus NUL")
        if len(self.lo_encrypt_key) > LO_KEY_SIZE:
            raise ValueError("lo_encrypt_key holds at most 32 bytes")
        return _INFO64.pack(
            self.lo_device,
            self.lo_inode,
            self.lo_rdevice,
            self.lo_offset,
            self.lo_sizelimit,
            self.lo_number,
            self.lo_encrypt_type,
            self.lo_encrypt_key_size,
            self.lo_flags,
            self.lo_file_name,
            self.lo_crypt_name,
            self.lo_encrypt_key,
            *self.lo_init,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> LoopInfo64:
        f = _INFO64.unpack(raw[: _INFO64.size])
        return cls(
            lo_device=f[0],
            lo_inode=f[1],
            lo_rdevice=f[2],
            lo_offset=f[3],
            lo_sizelimit=f[4],
            lo_number=f[5],
            lo_encrypt_type=f[6],
            lo_encrypt_key_size=f[7],
            lo_flags=f[8],
            lo_file_name=_cstr(f[9]),
            lo_crypt_name=_cstr(f[10]),
            lo_encrypt_key=f[11].rstrip(b"\0"),
            lo_init=(f[12], f[13]),
        )


class LoopConfig(NamedTuple):
    """struct loop_config for LOOP_CONFIGURE (Linux >= 5.8): bind + configure in one atomic ioctl."""

    fd: int
    block_size: int = 0
    info: LoopInfo64 = LoopInfo64()
    reserved: tuple[int, ...] = (0,) * 8

    def pack(self) -> bytes:
        if len(self.reserved) != 8:
            raise ValueError("loop_config.__reserved has 8 entries")
        return (
            _CONFIG_HEAD.pack(self.fd, self.block_size)
            + self.info.pack()
            + _CONFIG_RESERVED.pack(*self.reserved)
        )

    @classmethod
    def unpack(cls, raw: bytes) -> LoopConfig:
        fd, block_size = _CONFIG_HEAD.unpack_from(raw, 0)
        info = LoopInfo64.unpack(raw[_CONFIG_HEAD.size : _CONFIG_HEAD.size + _INFO64.size])
        reserved = _CONFIG_RESERVED.unpack_from(raw, _CONFIG_HEAD.size + _INFO64.size)
        return cls(fd=fd, block_size=block_size, info=info, reserved=tuple(reserved))
