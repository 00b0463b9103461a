"""Building our ownership record from what the kernel layer opened or created.

The record's format, parser and node name live with the rest of the published identity in
xenstore/identity.py (readers in every layer parse it there); this module adds only the
constructors that need kernel types, so that module stays free of the kernel layer."""

from __future__ import annotations

from xenblockctl.kernel.blockdev import BlockDevice, BlockIdentity
from xenblockctl.kernel.loop import LoopDevice
from xenblockctl.xenstore import identity
from xenblockctl.xenstore.identity import OwnerRecordError

__all__ = ["OwnerRecord", "OwnerRecordError"]


class OwnerRecord(identity.OwnerRecord):
    """identity.OwnerRecord, with constructors from an opened device."""

    __slots__ = ()

    @classmethod
    def for_device(cls, device: BlockDevice, *, writable: bool) -> OwnerRecord:
        ident = device.identity
        if isinstance(device, LoopDevice):
            return cls(
                kind="loop",
                major=ident.major,
                minor=ident.minor,
                diskseq=ident.diskseq,
                mode="w" if writable else "r",
                autoclear=device.autoclear,
                backing=(device.status.backing_dev, device.status.backing_ino),
                tag=device.tag,
            )
        return cls("device", ident.major, ident.minor, ident.diskseq, "w" if writable else "r")

    @classmethod
    def for_dm(
        cls, ident: BlockIdentity, *, uuid: str, backing: tuple[int, int] | None, writable: bool
    ) -> OwnerRecord:
        """A dm device we created with deferred remove armed (autoclear=1: its last close removes it)."""
        return cls(
            "dm", ident.major, ident.minor, ident.diskseq, "w" if writable else "r", True, backing, None, uuid
        )
