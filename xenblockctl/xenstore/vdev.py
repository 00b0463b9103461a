"""Virtual block device names <-> numbers, per xen-vbd-interface(7).

The number is the `<devid>` in every vbd path and the frontend's `virtual-device`; the name is
what `xl` configs and the backend's `dev` node say. Encoding (reference xen-block-protocol.md §10):

    xvd<disk><part>, disk <= 15 and part <= 15   (202 << 8) | (disk << 4) | part
    xvd beyond that                              (1 << 28) | (disk << 8) | part   disk < 2^20, part < 256
    sd<disk><part>, disk <= 15, part <= 15       (8 << 8)   | (disk << 4) | part
    hd<disk><part>, disks a-b, part <= 63        (3 << 8)   | (disk << 6) | part
    hd<disk><part>, disks c-d                    (22 << 8)  | ((disk - 2) << 6) | part
    d<disk>p<part> / d<disk>                     same number as xvd

Disk letters are bijective base 26 (a=0 ... z=25, aa=26); partition 0 is the whole disk and is
written without digits. Numbers of 2 << 28 and above are reserved.
"""

from __future__ import annotations

from xenblockctl.errors import XenblockError
from xenblockctl.xenstore.numbers import uint_or_none

XVD_MAJOR = 202
SD_MAJOR = 8
HD_MAJOR_AB = 3
HD_MAJOR_CD = 22
EXTENDED = 1 << 28
RESERVED = 2 << 28
XVD_EXT_DISKS = 1 << 20
XVD_EXT_PARTS = 256

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the hotplug path)
if TYPE_CHECKING:
    import re

#: The name forms, compiled at first use: this module is on the block script's start-up path, which
#: only ever meets device numbers (a compile costs ~0.3-0.6 ms).
_PATTERNS: list[re.Pattern[str]] = []


def _name_patterns() -> list[re.Pattern[str]]:
    if not _PATTERNS:
        import re

        _PATTERNS.append(re.compile(r"(xvd|sd|hd)([a-z]+)([1-9][0-9]*)?"))
        _PATTERNS.append(re.compile(r"d(0|[1-9][0-9]*)(?:p([1-9][0-9]*))?"))
    return _PATTERNS


class VdevError(XenblockError):
    """A virtual device name or number outside xen-vbd-interface(7)."""

    code = "vdev-invalid"


def disk_to_letters(disk: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa' (bijective base 26)."""
    if disk < 0:
        raise VdevError(f"disk index {disk} is negative")
    letters = ""
    n = disk + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return letters


def letters_to_disk(letters: str) -> int:
    if not letters or not all("a" <= ch <= "z" for ch in letters):
        raise VdevError(f"disk letters {letters!r} are not [a-z]+")
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


class Vdev(tuple[str, int, int]):
    """A virtual block device: naming scheme ("xvd" | "sd" | "hd"), disk index (0-based) and
    partition (0 = whole).

    A plain tuple subclass (compares, hashes and unpacks as `(scheme, disk, partition)`), neither a
    dataclass nor a typing.NamedTuple: this module is on the hotplug script's import path, where a
    class build costs ~0.2-0.4 ms."""

    __slots__ = ()

    @property
    def scheme(self) -> str:
        return self[0]

    @property
    def disk(self) -> int:
        return self[1]

    @property
    def partition(self) -> int:
        return self[2]

    def __repr__(self) -> str:
        return f"Vdev(scheme={self[0]!r}, disk={self[1]!r}, partition={self[2]!r})"

    def __new__(cls, scheme: str, disk: int, partition: int = 0) -> Vdev:
        limits = {"xvd": (XVD_EXT_DISKS, XVD_EXT_PARTS), "sd": (16, 16), "hd": (4, 64)}
        if scheme not in limits:
            raise VdevError(f"unknown vdev scheme {scheme!r}")
        disks, parts = limits[scheme]
        if not 0 <= disk < disks:
            raise VdevError(f"{scheme}: disk index {disk} outside 0..{disks - 1}")
        if not 0 <= partition < parts:
            raise VdevError(f"{scheme}: partition {partition} outside 0..{parts - 1}")
        return tuple.__new__(cls, (scheme, disk, partition))

    @property
    def name(self) -> str:
        suffix = str(self.partition) if self.partition else ""
        return f"{self.scheme}{disk_to_letters(self.disk)}{suffix}"

    @property
    def number(self) -> int:
        if self.scheme == "xvd":
            if self.disk < 16 and self.partition < 16:
                return (XVD_MAJOR << 8) | (self.disk << 4) | self.partition
            return EXTENDED | (self.disk << 8) | self.partition
        if self.scheme == "sd":
            return (SD_MAJOR << 8) | (self.disk << 4) | self.partition
        if self.disk < 2:
            return (HD_MAJOR_AB << 8) | (self.disk << 6) | self.partition
        return (HD_MAJOR_CD << 8) | ((self.disk - 2) << 6) | self.partition

    @classmethod
    def parse(cls, text: str) -> Vdev:
        """`xvda`, `xvdq3`, `xvdaa`, `sdb2`, `hdc`, `d0p1`, or a decimal device number."""
        if not isinstance(text, str):
            raise VdevError(f"vdev must be str, not {type(text).__name__}")
        name, dform = _name_patterns()
        match = name.fullmatch(text)
        if match is not None:
            scheme, letters, part = match.groups()
            return cls(scheme, letters_to_disk(letters), int(part) if part else 0)
        match = dform.fullmatch(text)
        if match is not None:
            disk, part = match.groups()
            return cls("xvd", int(disk), int(part) if part else 0)
        number = uint_or_none(text, maximum=RESERVED - 1)
        if number is not None:
            return cls.from_number(number)
        raise VdevError(f"{text[:40]!r} is not a virtual device name (xvdN, sdN, hdN, dNpM or a number)")

    @classmethod
    def from_number(cls, number: int) -> Vdev:
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < RESERVED:
            raise VdevError(f"device number {number!r} outside 0..{RESERVED - 1}")
        if number & EXTENDED:
            return cls("xvd", (number >> 8) & (XVD_EXT_DISKS - 1), number & 0xFF)
        major, minor = number >> 8, number & 0xFF
        if major == XVD_MAJOR:
            return cls("xvd", minor >> 4, minor & 15)
        if major == SD_MAJOR:
            return cls("sd", minor >> 4, minor & 15)
        if major == HD_MAJOR_AB and minor >> 6 < 2:
            return cls("hd", minor >> 6, minor & 63)
        if major == HD_MAJOR_CD and minor >> 6 < 2:
            return cls("hd", 2 + (minor >> 6), minor & 63)
        raise VdevError(f"device number {number} does not encode any xvd/sd/hd device")

    @property
    def whole_disk(self) -> Vdev:
        return Vdev(self.scheme, self.disk, 0)

    def __str__(self) -> str:
        return self.name


def vdev_to_number(name: str) -> int:
    """`xvda` -> 51712."""
    return Vdev.parse(name).number


def vdev_name(number: int) -> str:
    """51712 -> `xvda`. Extended-form numbers of small disks decode to the same name as their
    compact form (both are valid device ids; only the compact one is canonical)."""
    return Vdev.from_number(number).name


def is_canonical_number(number: int) -> bool:
    """True when `number` is what libxl would derive from the device's name."""
    try:
        return Vdev.from_number(number).number == number
    except VdevError:
        return False
