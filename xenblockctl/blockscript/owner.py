"""Our private ownership record in the backend directory: what `add` created, so that `remove`
needs nothing else and never touches a device it cannot prove is ours.

One node, `xenblockctl-owner`, so it is written in the same transaction as `physical-device` and
read back in one request. Format (space-separated key=value, version first):

    v1 kind=loop dev=7:3 seq=1db mode=w autoclear=1 backing=fe00:20c0f6 tag=xenblockctl:5:51712
    v1 kind=dm dev=fe:2 seq=1dd mode=w autoclear=1 backing=fe00:20c0f6 uuid=XENBLOCKCTL-812-4711-...

`kind` is `loop` (we created the loop device), `device` (an existing block device we only
opened: remove never detaches it) or `dm` (a dm device we created, e.g. a `snapshot:` disk, with
deferred remove armed: `autoclear=1` means its last close removes it, so there is nothing to
detach; `uuid` proves it is ours and `backing` names the read-only base image). Numbers are
lowercase hex like the public nodes. Readers that predate `kind=dm` refuse such a record as
malformed, which makes them touch nothing: the safe reading."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from xenblockctl.errors import XenblockError
from xenblockctl.kernel.blockdev import BlockDevice, BlockIdentity
from xenblockctl.kernel.loop import TAG_PREFIX, LoopDevice

NODE = "xenblockctl-owner"
VERSION = "v1"
_HEX = re.compile(r"[0-9a-f]{1,16}")
_TAG = re.compile(r"[A-Za-z0-9:._-]{1,63}")
#: Our dm uuids (kernel/dm.py make_owned_uuid); the prefix is repeated here so that parsing a record
#: on the hotplug path does not import the dm module.
_DM_UUID = re.compile(r"XENBLOCKCTL-[!-.0-~]{1,116}")
KINDS = ("loop", "device", "dm")


class OwnerRecordError(XenblockError):
    code = "owner-record-invalid"


class OwnerRecord(NamedTuple):
    kind: str  # "loop" | "device" | "dm"
    major: int
    minor: int
    diskseq: int
    mode: str  # "r" | "w"
    autoclear: bool = False
    backing: tuple[int, int] | None = None  # (st_dev, st_ino) of a loop's backing file
    tag: str | None = None
    uuid: str | None = None  # kind=dm: the device's dm uuid (ours: XENBLOCKCTL- prefix)

    @property
    def devt(self) -> int:
        return os.makedev(self.major, self.minor)

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

    def with_autoclear(self, on: bool) -> OwnerRecord:
        return self._replace(autoclear=on)

    def format(self) -> str:
        parts = [
            VERSION,
            f"kind={self.kind}",
            f"dev={self.major:x}:{self.minor:x}",
            f"seq={self.diskseq:x}",
            f"mode={self.mode}",
            f"autoclear={int(self.autoclear)}",
        ]
        if self.backing is not None:
            parts.append(f"backing={self.backing[0]:x}:{self.backing[1]:x}")
        if self.tag is not None:
            parts.append(f"tag={self.tag}")
        if self.uuid is not None:
            parts.append(f"uuid={self.uuid}")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> OwnerRecord:
        """Strict: anything unexpected means we cannot prove ownership, so it is an error."""
        words = text.split(" ")
        if not words or words[0] != VERSION:
            raise OwnerRecordError(f"unknown owner record version in {text[:60]!r}")
        fields: dict[str, str] = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or key in fields:
                raise OwnerRecordError(f"malformed owner record {text[:80]!r}")
            fields[key] = value
        try:
            kind = fields["kind"]
            major, minor = (_hex(x) for x in fields["dev"].split(":", 1))
            diskseq = _hex(fields["seq"])
            mode = fields["mode"]
            autoclear = {"0": False, "1": True}[fields["autoclear"]]
        except (KeyError, ValueError) as exc:
            raise OwnerRecordError(f"malformed owner record {text[:80]!r}") from exc
        if kind not in KINDS or mode not in ("r", "w") or diskseq == 0:
            raise OwnerRecordError(f"malformed owner record {text[:80]!r}")
        backing = None
        if "backing" in fields:
            try:
                dev, ino = (_hex(x) for x in fields["backing"].split(":", 1))
            except ValueError as exc:
                raise OwnerRecordError(f"malformed backing in {text[:80]!r}") from exc
            backing = (dev, ino)
        tag = fields.get("tag")
        if tag is not None and (not _TAG.fullmatch(tag) or not tag.startswith(TAG_PREFIX)):
            raise OwnerRecordError(f"malformed tag in {text[:80]!r}")
        if kind == "loop" and (tag is None or backing is None):
            raise OwnerRecordError("a loop owner record needs tag and backing")
        uuid = fields.get("uuid")
        if (kind == "dm") != (uuid is not None):
            raise OwnerRecordError(f"uuid belongs to kind=dm records only, and they need one: {text[:80]!r}")
        if uuid is not None and not _DM_UUID.fullmatch(uuid):
            raise OwnerRecordError(f"malformed dm uuid in {text[:80]!r}")
        if kind == "dm" and tag is not None:
            raise OwnerRecordError(f"a dm owner record has no loop tag: {text[:80]!r}")
        return cls(kind, major, minor, diskseq, mode, autoclear, backing, tag, uuid)


def _hex(text: str) -> int:
    if not _HEX.fullmatch(text) or (len(text) > 1 and text.startswith("0")):
        raise ValueError(text)
    return int(text, 16)


def parse_luid(text: str) -> int:
    """`physical-device-luid`: lowercase hex diskseq, 1-16 chars, no leading zero, never 0."""
    if not _HEX.fullmatch(text) or text.startswith("0"):
        raise OwnerRecordError(f"physical-device-luid {text[:40]!r} is not a lowercase hex diskseq")
    return int(text, 16)
