"""Ioctl request encoding (asm-generic/ioctl.h) and the block-layer ioctls (linux/fs.h).

Numbers are checked against the installed UAPI headers by tests/unit/test_abi_headers.py."""

from __future__ import annotations

import _struct as struct  # what struct.py re-exports, without its file: tests/lint/test_hotplug_imports.py
import fcntl

# asm-generic/ioctl.h layout (x86, arm, riscv; not alpha/mips/powerpc/sparc, which Xen dom0 is not).
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def io(kind: int, nr: int) -> int:
    return ioc(IOC_NONE, kind, nr, 0)


def ior(kind: int, nr: int, size: int) -> int:
    return ioc(IOC_READ, kind, nr, size)


def iow(kind: int, nr: int, size: int) -> int:
    return ioc(IOC_WRITE, kind, nr, size)


def iowr(kind: int, nr: int, size: int) -> int:
    return ioc(IOC_READ | IOC_WRITE, kind, nr, size)


_SIZE_T = struct.calcsize("N")
_U64 = 8

# linux/fs.h, type 0x12. Several historic ones are _IO although they take a pointer: the kernel
# defined them before _IOR existed and the numbers are ABI now.
BLKROSET = io(0x12, 93)
BLKROGET = io(0x12, 94)
BLKRRPART = io(0x12, 95)
BLKGETSIZE = io(0x12, 96)
BLKFLSBUF = io(0x12, 97)
BLKSSZGET = io(0x12, 104)
BLKBSZGET = ior(0x12, 112, _SIZE_T)
BLKGETSIZE64 = ior(0x12, 114, _SIZE_T)
BLKDISCARD = io(0x12, 119)
BLKIOMIN = io(0x12, 120)
BLKIOOPT = io(0x12, 121)
BLKPBSZGET = io(0x12, 123)
BLKZEROOUT = io(0x12, 127)
BLKGETDISKSEQ = ior(0x12, 128, _U64)


def ioctl_int(fd: int, request: int) -> int:
    """An ioctl that writes a C int (signed) through its pointer argument."""
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf, True)
    value: int = struct.unpack("=i", buf)[0]
    return value


def ioctl_uint(fd: int, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf, True)
    value: int = struct.unpack("=I", buf)[0]
    return value


def ioctl_u64(fd: int, request: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, request, buf, True)
    value: int = struct.unpack("=Q", buf)[0]
    return value


def ioctl_range(fd: int, request: int, start: int, length: int) -> None:
    """BLKDISCARD / BLKZEROOUT: a u64[2] {start, length} in bytes."""
    fcntl.ioctl(fd, request, struct.pack("=QQ", start, length))
