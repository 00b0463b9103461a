"""xl disk specs read as xl-disk-configuration(5) and libxlu's lexer read them: every example of
that page is accepted with xl's meaning or refused with the reason, never guessed at."""

from __future__ import annotations

import pytest

from xenblockctl.toolstack.xlspec import DiskSpecError, XlDisk, parse

VOLUME = XlDisk(target="/dev/vg/guest-volume", vdev="hda", mode="w")

#: The page's examples, in its order, with what we make of them.
ACCEPTED = [
    # "these strings are equivalent"
    ("/dev/vg/guest-volume,,hda", VOLUME),
    ("/dev/vg/guest-volume,raw,hda,rw", VOLUME),
    ("format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume", VOLUME),
    ("raw:/dev/vg/guest-volume,hda,w", VOLUME),
    # "disk = [ '/dev/vg/guest-volume,,hda', ... ]"
    ("/dev/vg/guest-volume,,hda", VOLUME),
    # deprecated prefixes, stripped: "tap:aio:/some/path..." (with the mandatory vdev)
    ("tap:aio:/some/path...,xvdb", XlDisk(target="/some/path...", vdev="xvdb", mode="w")),
    # the example; target= swallows the rest, commas and trailing blanks included
    ("format=raw,vdev=xvdb,access=rw,target=/srv/a,b.img ", XlDisk("/srv/a,b.img ", "xvdb", "w")),
    # "/dev will be prepended if the path doesn't start with a '/'"
    ("vg/lv,,xvdc,ro", XlDisk(target="/dev/vg/lv", vdev="xvdc", mode="r")),
    # access spellings: r, ro, w, rw; empty means rw
    ("/a,,xvdb,r", XlDisk("/a", "xvdb", "r")),
    ("/a,,xvdb,", XlDisk("/a", "xvdb", "w")),
    ("access=w,vdev=xvdb,target=/a", XlDisk("/a", "xvdb", "w")),
    # vdev:disk is the deprecated way of saying devtype=disk
    ("/a,,xvdb:disk", XlDisk("/a", "xvdb", "w")),
    ("devtype=disk,/a,,xvdb", XlDisk("/a", "xvdb", "w")),
    # what we honour beyond target/format/vdev/access
    ("/a,,xvdb,discard", XlDisk("/a", "xvdb", "w", discard=True)),
    ("/a,,xvdb,ro,no-discard", XlDisk("/a", "xvdb", "r", discard=False)),
    ("backend=dd,/a,,xvdb", XlDisk("/a", "xvdb", "w", backend="dd")),
    ("backendtype=phy,/a,,xvdb", XlDisk("/a", "xvdb", "w", backend_type="kernel")),
    ("backendtype=tap,/a,,xvdb", XlDisk("/a", "xvdb", "w", backend_type="engine")),
    ("specification=xen,/a,,xvdb", XlDisk("/a", "xvdb", "w")),
    # our own target forms go through target=
    ("vdev=xvdb,target=snapshot:/srv/base.img", XlDisk("snapshot:/srv/base.img", "xvdb", "w")),
]

REFUSED = [
    # "As are these": cdroms, in every spelling the page shows
    ("/root/image.iso,,hdc,cdrom", "cdrom devices are not supported"),
    ("/root/image.iso,,hdc,,cdrom", "cdrom devices are not supported"),
    ("/root/image.iso,raw,hdc,devtype=cdrom", "cdrom devices are not supported"),
    (
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
        "cdrom devices are not supported",
    ),
    ("raw:/root/image.iso,hdc:cdrom,ro", "cdrom devices are not supported"),
    ("/root/image.iso,,hdc,cdrom", "cdrom devices are not supported"),
    # "Missing format and empty target": an empty cdrom drive
    (",hdc:cdrom,r", "cdrom devices are not supported"),
    # formats other than raw, positional, keyed and as deprecated prefixes
    ("/a,qcow2,xvdb", "format=qcow2 is not supported"),
    ("format=vhd,vdev=xvdb,target=/a", "format=vhd is not supported"),
    ("qcow:/a,xvdb", "format=qcow is not supported"),
    ("/a,qed,xvdb", "format=qed is not supported"),
    ("/a,vmdk,xvdb", "unknown value for format: 'vmdk'"),
    # deprecated script prefixes and script=
    ("iscsi:iqn.2001-05.com.example:disk,xvdb", "the iscsi: prefix (script=block-iscsi) is not supported"),
    ("nbd:host:1234,xvdb", "the nbd: prefix"),
    ("drbd:res0,xvdb", "the drbd: prefix"),
    ("script=block-iscsi,vdev=xvdb,target=iqn", "script= is not supported"),
    ("snapshot:/srv/base.img,,xvdb", "unknown deprecated disk prefix 'snapshot:'"),
    # other parameters and flags of the page
    ("backendtype=qdisk,/a,,xvdb", "backendtype=qdisk is not supported"),
    ("backendtype=standalone,/a,,xvdb", "backendtype=standalone is not supported"),
    ("backendtype=nope,/a,,xvdb", "unknown value for backendtype"),
    ("specification=virtio,/a,,xvdb", "specification=virtio is not supported"),
    ("/a,,xvdb,direct-io-safe", "direct-io-safe applies to qdisk"),
    ("/a,,xvdb,untrusted", "trusted/untrusted is not supported"),
    ("/a,,xvdb,trusted", "trusted/untrusted is not supported"),
    ("/a,,xvdb,colo,colo-host=h,colo-port=1", "COLO is not supported"),
    ("grant_usage=1,/a,,xvdb", "grant_usage applies to virtio only"),
    # what libxl's lexer refuses too
    ("/a,,xvdb,rw,extra", "too many positional parameters"),
    ("/a,,xvdb,rwx", "unknown value for access: 'rwx'"),
    ("vdev=xvdb,vdev=xvdc,target=/a", "vdev respecified"),
    ("frobnicate=1,/a,,xvdb", "unknown parameter 'frobnicate'"),
    ("/a,,xvdb,devtype=floppy", "unknown value for devtype"),
    ("/a,,xvdb:floppy", "unknown deprecated type 'floppy'"),
    # mandatory parts
    ("/a", "no vdev"),
    ("vdev=xvdb", "no target"),
    ("", "no target"),
    ("/a,,xvdb\x00", "control character"),
]


@pytest.mark.parametrize(("spec", "expected"), ACCEPTED, ids=[s for s, _ in ACCEPTED])
def test_accepted(spec: str, expected: XlDisk) -> None:
    assert parse(spec) == expected


@pytest.mark.parametrize(("spec", "reason"), REFUSED, ids=[s for s, _ in REFUSED])
def test_refused_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(DiskSpecError) as info:
        parse(spec)
    assert info.value.code == "disk-spec-invalid"
    assert reason in info.value.message


def test_every_example_of_the_page_is_covered() -> None:
    """The example lines of xl-disk-configuration(5) (Xen 4.17), verbatim: each one is above."""
    examples = [
        "/dev/vg/guest-volume,,hda",
        "/dev/vg/guest-volume,raw,hda,rw",
        "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
        "raw:/dev/vg/guest-volume,hda,w",
        "/root/image.iso,,hdc,cdrom",
        "/root/image.iso,,hdc,,cdrom",
        "/root/image.iso,raw,hdc,devtype=cdrom",
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
        "raw:/root/image.iso,hdc:cdrom,ro",
        ",hdc:cdrom,r",
    ]
    covered = {s for s, _ in ACCEPTED} | {s for s, _ in REFUSED}
    assert [e for e in examples if e not in covered] == []
    # "tap:aio:/some/path..." names no vdev, which xl requires: refused for that reason
    with pytest.raises(DiskSpecError, match="no vdev"):
        parse("tap:aio:/some/path...")
