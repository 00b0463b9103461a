"""Typed errors of the kernel layer. Codes are documented in xenblockctl(1), ERROR CODES."""

from __future__ import annotations

from xenblockctl.errors import XenblockError


class DeviceError(XenblockError):
    """Something about a target or device is wrong; the message names it."""

    code = "device-error"


class TargetNotFound(DeviceError):
    code = "target-missing"


class TargetTypeError(DeviceError):
    """The target is neither a regular file nor a block device (directory, FIFO, char device...)."""

    code = "target-type"


class TargetEmpty(DeviceError):
    code = "target-empty"


class TargetPermission(DeviceError):
    code = "target-permission"


class LoopError(DeviceError):
    code = "loop-error"


class LoopExhausted(LoopError):
    """Every bounded retry of the LOOP_CTL_GET_FREE / LOOP_CONFIGURE race lost."""

    code = "loop-busy"


class UnsupportedKernel(DeviceError):
    """The kernel lacks an ioctl we need (LOOP_CONFIGURE < 5.8, BLKGETDISKSEQ < 5.15)."""

    code = "kernel-unsupported"


class IdentityMismatch(DeviceError):
    """The device behind a number is not the one we were promised (diskseq, tag or backing file)."""

    code = "identity-mismatch"


class NotOurs(DeviceError):
    """Refused to touch a device whose ownership record does not match."""

    code = "not-ours"
