"""gntdev/evtchn struct codecs (the ioctl numbers are checked against headers in test_blkif_cheaders)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblockctl.backend.transport import TransportError, xen

u32 = st.integers(0, 0xFFFFFFFF)


def test_numbers_from_reference() -> None:
    assert xen.IOCTL_GNTDEV_MAP_GRANT_REF == 0x00184700
    assert xen.IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x00104701
    assert xen.IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR == 0x00184702
    assert xen.IOCTL_GNTDEV_SET_MAX_GRANTS == 0x00044703
    assert xen.IOCTL_GNTDEV_SET_UNMAP_NOTIFY == 0x00104707
    assert xen.IOCTL_EVTCHN_BIND_VIRQ == 0x00044500
    assert xen.IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x00084501
    assert xen.IOCTL_EVTCHN_BIND_UNBOUND_PORT == 0x00044502
    assert xen.IOCTL_EVTCHN_UNBIND == 0x00044503
    assert xen.IOCTL_EVTCHN_NOTIFY == 0x00044504
    assert xen.IOCTL_EVTCHN_RESET == 0x00004505
    assert xen.IOCTL_EVTCHN_RESTRICT_DOMID == 0x00024506


@given(domid=st.integers(0, 0x7FF0), refs=st.lists(u32, min_size=1, max_size=64))
def test_map_grant_ref_layout(domid: int, refs: list[int]) -> None:
    buf = xen.encode_map_grant_ref(domid, refs)
    assert len(buf) == 16 + 8 * len(refs)
    assert struct.unpack_from("<I", buf, 0)[0] == len(refs)  # count @0
    assert struct.unpack_from("<Q", buf, 8)[0] == 0  # index @8 (kernel output)
    struct.pack_into("<Q", buf, 8, 0x123000)  # what the kernel writes back
    count, index, pairs = xen.decode_map_grant_ref(buf)
    assert (count, index) == (len(refs), 0x123000)
    assert pairs == [(domid, r) for r in refs]


def test_map_needs_refs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        xen.encode_map_grant_ref(0, [])


def test_small_structs() -> None:
    assert xen.encode_unmap_grant_ref(0x5000, 3) == struct.pack("<QII", 0x5000, 3, 0)
    assert xen.encode_set_unmap_notify(0x5000, xen.UNMAP_NOTIFY_SEND_EVENT, 9) == struct.pack(
        "<QII", 0x5000, 2, 9
    )
    buf = xen.encode_get_offset_for_vaddr(0x7F0000001000)
    assert len(buf) == 24
    struct.pack_into("<QI", buf, 8, 0x4000, 2)
    assert xen.decode_get_offset_for_vaddr(buf) == (0x4000, 2)
    assert xen.encode_bind_interdomain(5, 17) == struct.pack("<II", 5, 17)
    assert xen.encode_port(17) == struct.pack("<I", 17)


@given(ports=st.lists(u32, max_size=100), junk=st.binary(max_size=3))
def test_pending_ports_and_unmask(ports: list[int], junk: bytes) -> None:
    data = xen.encode_unmask(ports)
    assert xen.decode_pending_ports(data + junk) == ports  # a partial trailing port is ignored


@pytest.mark.skipif(os.path.exists(xen.GNTDEV_PATH), reason="a real gntdev exists (Xen lane covers it)")
def test_transport_without_xen_fails_cleanly() -> None:
    with pytest.raises(TransportError) as exc:
        xen.XenTransport()
    assert exc.value.code == "transport"
