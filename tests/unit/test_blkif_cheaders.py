"""Our hand-written ABI numbers against the C headers (skips with the reason when they are missing).

- blkif layouts: Xen's public headers (Debian libxen-dev, /usr/include/xen/io/blkif.h). The x86_32
  layout is compiled on x86_64 by making uint64_t 4-aligned before including the header, which is
  the only difference between the two ABIs (the i386-only tail `pad` of the indirect request is not
  seen that way, so its sizeof is checked by our own constant test instead).
- gntdev/evtchn ioctls: Linux UAPI (linux-libc-dev, /usr/include/xen/gntdev.h, evtchn.h).
- BLKDISCARD/BLKSECDISCARD: <linux/fs.h>.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cheaders import c_values
from xenblockctl.backend import blkif, io
from xenblockctl.backend.transport import xen

BLKIF_H = "xen/io/blkif.h"


def _layout_exprs() -> dict[str, str]:
    return {
        "entry": "sizeof(union blkif_sring_entry)",
        "req": "sizeof(struct blkif_request)",
        "req.id": "offsetof(struct blkif_request, id)",
        "req.sector": "offsetof(struct blkif_request, sector_number)",
        "req.seg": "offsetof(struct blkif_request, seg)",
        "seg": "sizeof(struct blkif_request_segment)",
        "seg.first": "offsetof(struct blkif_request_segment, first_sect)",
        "disc.flag": "offsetof(struct blkif_request_discard, flag)",
        "disc.id": "offsetof(struct blkif_request_discard, id)",
        "disc.nr": "offsetof(struct blkif_request_discard, nr_sectors)",
        "ind.nr": "offsetof(struct blkif_request_indirect, nr_segments)",
        "ind.id": "offsetof(struct blkif_request_indirect, id)",
        "ind.sector": "offsetof(struct blkif_request_indirect, sector_number)",
        "ind.handle": "offsetof(struct blkif_request_indirect, handle)",
        "ind.grefs": "offsetof(struct blkif_request_indirect, indirect_grefs)",
        "rsp": "sizeof(struct blkif_response)",
        "rsp.op": "offsetof(struct blkif_response, operation)",
        "rsp.status": "offsetof(struct blkif_response, status)",
        "ring1": "__CONST_RING_SIZE(blkif, 4096)",
        "ring16": "__CONST_RING_SIZE(blkif, 16 * 4096)",
        "sring.ring": "offsetof(struct blkif_sring, ring)",
        "OP_INDIRECT": "BLKIF_OP_INDIRECT",
        "OP_DISCARD": "BLKIF_OP_DISCARD",
        "MAX_SEG": "BLKIF_MAX_SEGMENTS_PER_REQUEST",
        "MAX_IND_PAGES": "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
        "RSP_EOPNOTSUPP": "(unsigned long long)(BLKIF_RSP_EOPNOTSUPP + 100)",
        "VDISK_READONLY": "VDISK_READONLY",
    }


def _check_layout(v: dict[str, int], abi: blkif.Abi) -> None:
    seg_off = abi.segments_offset
    assert v["entry"] == abi.entry_size
    assert v["req"] == abi.entry_size
    assert v["req.id"] == abi.id_offset
    assert v["req.sector"] == abi.id_offset + 8
    assert v["req.seg"] == seg_off
    assert v["seg"] == blkif.SEGMENT_SIZE
    assert v["seg.first"] == 4
    assert v["disc.flag"] == 1
    assert v["disc.id"] == abi.id_offset
    assert v["disc.nr"] == abi.id_offset + 16
    assert v["ind.nr"] == 2
    assert v["ind.id"] == abi.id_offset
    assert v["ind.sector"] == abi.id_offset + 8
    assert v["ind.handle"] == abi.id_offset + 16
    assert v["ind.grefs"] == abi.id_offset + 20
    assert v["rsp"] == abi.response_size
    assert v["rsp.op"] == 8
    assert v["rsp.status"] == 10
    assert v["ring1"] == blkif.ring_size(1, abi)
    assert v["ring16"] == blkif.ring_size(16, abi)
    assert v["sring.ring"] == blkif.SRING_HEADER_SIZE
    assert v["OP_INDIRECT"] == blkif.OP_INDIRECT
    assert v["OP_DISCARD"] == blkif.OP_DISCARD
    assert v["MAX_SEG"] == blkif.MAX_SEGMENTS_PER_REQUEST
    assert v["MAX_IND_PAGES"] == blkif.MAX_INDIRECT_PAGES_PER_REQUEST
    assert v["RSP_EOPNOTSUPP"] - 100 == blkif.RSP_EOPNOTSUPP
    assert v["VDISK_READONLY"] == blkif.VDISK_READONLY


def test_blkif_x86_64_layout_matches_header() -> None:
    v = c_values(["stdint.h", BLKIF_H], _layout_exprs())
    _check_layout(v, blkif.X86_64)
    # the x86_64 indirect request is tail-padded to 64 by alignment
    assert c_values(["stdint.h", BLKIF_H], {"ind": "sizeof(struct blkif_request_indirect)"})["ind"] == 64


def test_blkif_x86_32_layout_matches_header(tmp_path: Path) -> None:
    if not Path("/usr/include", BLKIF_H).is_file():
        pytest.skip(f"/usr/include/{BLKIF_H} missing (Debian package libxen-dev, listed in .ci/apt-packages)")
    prelude = tmp_path / "x86_32_blkif.h"
    prelude.write_text(
        "#include <stdint.h>\n"
        "typedef uint64_t xbc_u64_a4 __attribute__((aligned(4)));\n"
        "#define uint64_t xbc_u64_a4\n"
        f"#include <{BLKIF_H}>\n"
    )
    _check_layout(c_values([str(prelude)], _layout_exprs()), blkif.X86_32)


def test_gntdev_and_evtchn_ioctls_match_linux_headers(tmp_path: Path) -> None:
    names = {
        "IOCTL_GNTDEV_MAP_GRANT_REF": xen.IOCTL_GNTDEV_MAP_GRANT_REF,
        "IOCTL_GNTDEV_UNMAP_GRANT_REF": xen.IOCTL_GNTDEV_UNMAP_GRANT_REF,
        "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR": xen.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR,
        "IOCTL_GNTDEV_SET_MAX_GRANTS": xen.IOCTL_GNTDEV_SET_MAX_GRANTS,
        "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": xen.IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
        "IOCTL_GNTDEV_GRANT_COPY": xen.IOCTL_GNTDEV_GRANT_COPY,
        "UNMAP_NOTIFY_CLEAR_BYTE": xen.UNMAP_NOTIFY_CLEAR_BYTE,
        "UNMAP_NOTIFY_SEND_EVENT": xen.UNMAP_NOTIFY_SEND_EVENT,
        "IOCTL_EVTCHN_BIND_VIRQ": xen.IOCTL_EVTCHN_BIND_VIRQ,
        "IOCTL_EVTCHN_BIND_INTERDOMAIN": xen.IOCTL_EVTCHN_BIND_INTERDOMAIN,
        "IOCTL_EVTCHN_BIND_UNBOUND_PORT": xen.IOCTL_EVTCHN_BIND_UNBOUND_PORT,
        "IOCTL_EVTCHN_UNBIND": xen.IOCTL_EVTCHN_UNBIND,
        "IOCTL_EVTCHN_NOTIFY": xen.IOCTL_EVTCHN_NOTIFY,
        "IOCTL_EVTCHN_RESET": xen.IOCTL_EVTCHN_RESET,
        "IOCTL_EVTCHN_RESTRICT_DOMID": xen.IOCTL_EVTCHN_RESTRICT_DOMID,
    }
    sizes = {
        "map": ("sizeof(struct ioctl_gntdev_map_grant_ref)", 24),
        "map.index": ("offsetof(struct ioctl_gntdev_map_grant_ref, index)", 8),
        "map.refs": ("offsetof(struct ioctl_gntdev_map_grant_ref, refs)", 16),
        "unmap": ("sizeof(struct ioctl_gntdev_unmap_grant_ref)", 16),
        "unmap.count": ("offsetof(struct ioctl_gntdev_unmap_grant_ref, count)", 8),
        "getoff.count": ("offsetof(struct ioctl_gntdev_get_offset_for_vaddr, count)", 16),
        "notify.port": ("offsetof(struct ioctl_gntdev_unmap_notify, event_channel_port)", 12),
        "copy": ("sizeof(struct ioctl_gntdev_grant_copy)", 16),
        "copy.segments": ("offsetof(struct ioctl_gntdev_grant_copy, segments)", 8),
        "seg": ("sizeof(struct gntdev_grant_copy_segment)", xen.COPY_SEGMENT_SIZE),
        "seg.dest": ("offsetof(struct gntdev_grant_copy_segment, dest)", 8),
        "seg.ref": ("offsetof(struct gntdev_grant_copy_segment, dest.foreign.ref)", 8),
        "seg.offset": ("offsetof(struct gntdev_grant_copy_segment, dest.foreign.offset)", 12),
        "seg.domid": ("offsetof(struct gntdev_grant_copy_segment, dest.foreign.domid)", 14),
        "seg.len": ("offsetof(struct gntdev_grant_copy_segment, len)", 16),
        "seg.flags": ("offsetof(struct gntdev_grant_copy_segment, flags)", 18),
        "seg.status": ("offsetof(struct gntdev_grant_copy_segment, status)", 20),
        "bind.port": ("offsetof(struct ioctl_evtchn_bind_interdomain, remote_port)", 4),
    }
    exprs = {k: k for k in names} | {k: e for k, (e, _) in sizes.items()}
    # The UAPI headers use the kernel's grant_ref_t/domid_t without defining them.
    prelude = tmp_path / "xen_types.h"
    prelude.write_text("#include <stdint.h>\ntypedef uint32_t grant_ref_t;\ntypedef uint16_t domid_t;\n")
    v = c_values([str(prelude), "xen/gntdev.h", "xen/evtchn.h"], exprs)
    assert {k: v[k] for k in names} == names
    assert {k: v[k] for k in sizes} == {k: want for k, (_, want) in sizes.items()}


def test_blkdiscard_numbers_match_linux_fs_h() -> None:
    v = c_values(
        ["linux/fs.h", "linux/falloc.h"],
        {
            "BLKDISCARD": "BLKDISCARD",
            "BLKSECDISCARD": "BLKSECDISCARD",
            "PUNCH": "FALLOC_FL_PUNCH_HOLE",
            "KEEP": "FALLOC_FL_KEEP_SIZE",
        },
    )
    assert v == {
        "BLKDISCARD": io.BLKDISCARD,
        "BLKSECDISCARD": io.BLKSECDISCARD,
        "PUNCH": io.FALLOC_FL_PUNCH_HOLE,
        "KEEP": io.FALLOC_FL_KEEP_SIZE,
    }
