"""dm.py logic against a replaying fake kernel (the ioctl function is injected; fault injection is
the only mocking). The real kernel runs these paths in tests/dm (QEMU lane)."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from tests.unit.test_dm_abi import REPLIES
from xenblockctl.kernel import dm
from xenblockctl.kernel.dm_abi import (
    DM_DATA_START,
    DM_REQUEST_VERSION,
    Cmd,
    DmIoctl,
    Flag,
    Target,
    align8,
    parse_table,
)

Handler = Callable[[DmIoctl, bytes], "bytes | OSError"]


T = TypeVar("T")


class FakeKernel:
    """An IoctlFn: per command a handler returns the reply (header + payload) or an OSError.
    Replies that do not fit the caller's buffer get DM_BUFFER_FULL, as the kernel does."""

    def __init__(self) -> None:
        self.handlers: dict[Cmd, Handler] = {Cmd.VERSION: lambda hdr, _: bytes.fromhex(REPLIES["VERSION"])}
        self.calls: list[tuple[Cmd, DmIoctl, int]] = []

    def __call__(self, fd: int, req: int, buf: bytearray) -> int:
        cmd = Cmd(req & 0xFF)
        assert req == 0xC138FD00 | cmd.value
        hdr = DmIoctl.unpack(buf)
        assert hdr.version == DM_REQUEST_VERSION
        assert hdr.data_size == len(buf)
        assert hdr.data_start == DM_DATA_START
        self.calls.append((cmd, hdr, len(buf)))
        out = self.handlers[cmd](hdr, bytes(buf[DM_DATA_START : hdr.data_size]))
        if isinstance(out, OSError):
            raise out
        if len(out) > len(buf):
            full = DmIoctl.unpack(out)
            buf[:DM_DATA_START] = DmIoctl(flags=full.flags | Flag.BUFFER_FULL, version=(4, 47, 0)).pack()
            return 0
        buf[: len(out)] = out
        return 0

    def cmds(self) -> list[Cmd]:
        return [c for c, _, _ in self.calls if c is not Cmd.VERSION]


def status_reply(name: str, uuid: str = "", dev: int = 0, *, opens: int = 0, flags: int = 0) -> bytes:
    return DmIoctl(
        name=name,
        uuid=uuid,
        dev=dev,
        open_count=opens,
        flags=flags,
        version=(4, 47, 0),
        data_size=305,
        data_start=DM_DATA_START,
    ).pack()


def with_payload(payload: bytes) -> bytes:
    return DmIoctl(version=(4, 47, 0), data_size=DM_DATA_START + len(payload)).pack() + payload


def logged(log: list[T], item: T, reply: bytes) -> bytes:
    """A handler's body that records what the kernel was asked, then replies."""
    log.append(item)
    return reply


def name_list(entries: Sequence[tuple[int, str, str | None]]) -> bytes:
    """dm_name_list records in the 4.46+ form (event_nr, flags, uuid after the name)."""
    out = bytearray()
    starts = []
    for dev, name, uuid in entries:
        starts.append(len(out))
        out += struct.pack("=QI", dev, 0) + name.encode() + b"\0"
        out += bytes(align8(len(out)) - len(out))
        out += struct.pack("=II", 0, 1 if uuid else 2)
        if uuid:
            out += uuid.encode() + b"\0"
        out += bytes(align8(len(out)) - len(out))
    for a, b in itertools.pairwise(starts):
        struct.pack_into("=I", out, a + 8, b - a)
    return bytes(out)


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def ctl(kernel: FakeKernel) -> dm.DmControl:
    return dm.DmControl(-1, ioctl=kernel)


def test_version_is_negotiated_on_open(ctl: dm.DmControl) -> None:
    assert ctl.kernel_version == (4, 47, 0)


def test_other_major_is_refused(kernel: FakeKernel) -> None:
    kernel.handlers[Cmd.VERSION] = lambda hdr, _: DmIoctl(version=(5, 0, 0)).pack()
    with pytest.raises(dm.DmUnavailable, match="interface 5"):
        dm.DmControl(-1, ioctl=kernel)


def test_list_devices_grows_the_buffer_until_it_fits(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    many = [(os.makedev(254, i), f"dev-{i:04d}-" + "x" * 90, f"UUID-{i}") for i in range(300)]
    payload = name_list(many)
    assert DM_DATA_START + len(payload) > 16 * 1024  # does not fit the first buffer
    kernel.handlers[Cmd.LIST_DEVICES] = lambda hdr, _: with_payload(payload)
    entries = ctl.list_devices()
    assert [(e.dev, e.name, e.uuid) for e in entries] == many
    sizes = [size for cmd, _, size in kernel.calls if cmd is Cmd.LIST_DEVICES]
    assert sizes == [16 * 1024, 64 * 1024]
    assert all(hdr.flags & Flag.UUID for cmd, hdr, _ in kernel.calls if cmd is Cmd.LIST_DEVICES)


def test_endless_buffer_full_stops_at_the_cap(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    kernel.handlers[Cmd.LIST_DEVICES] = lambda hdr, _: DmIoctl(flags=Flag.BUFFER_FULL).pack()
    with pytest.raises(dm.DmError, match="exceeds"):
        ctl.list_devices()
    assert len(kernel.cmds()) == 6  # 16 KiB, 64 KiB, ... 16 MiB


def test_replayed_kernel_list(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    kernel.handlers[Cmd.LIST_DEVICES] = lambda hdr, _: bytes.fromhex(REPLIES["LIST_DEVICES"])
    assert [(e.name, e.uuid) for e in ctl.list_devices()] == [("xbc-cap-a", "CAP-UUID-A"), ("xbc-cap-bb", "")]


def test_replayed_table_status(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    seen: list[DmIoctl] = []

    def handler(hdr: DmIoctl, _: bytes) -> bytes:
        seen.append(hdr)
        return bytes.fromhex(REPLIES["TABLE_STATUS"])

    kernel.handlers[Cmd.TABLE_STATUS] = handler
    assert [t.params for t in ctl.table(name="xbc-cap-a")] == ["7:0 0", "7:0 4096"]
    assert seen[0].flags & Flag.STATUS_TABLE
    assert seen[0].name == "xbc-cap-a"


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        (errno.ENXIO, dm.DmNotFound),
        (errno.EBUSY, dm.DmBusy),
        (errno.ENOTTY, dm.DmUnavailable),
        (errno.EINVAL, dm.DmError),
        (errno.EACCES, dm.DmError),
    ],
)
def test_errno_mapping(kernel: FakeKernel, ctl: dm.DmControl, code: int, exc: type[dm.DmError]) -> None:
    kernel.handlers[Cmd.DEV_STATUS] = lambda hdr, _: OSError(code, os.strerror(code))
    with pytest.raises(exc) as info:
        ctl.status(name="vg-lv")
    assert info.value.errno == code
    assert "vg-lv" in str(info.value)


def test_exactly_one_selector(ctl: dm.DmControl) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ctl.status(name="a", uuid="b")
    with pytest.raises(ValueError, match="exactly one"):
        ctl.status()
    with pytest.raises(ValueError, match="reserved"):
        ctl.status(name="control")


def test_table_load_request(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    got: list[tuple[DmIoctl, bytes]] = []

    def handler(hdr: DmIoctl, payload: bytes) -> bytes:
        got.append((hdr, payload))
        return status_reply("x", "U", flags=Flag.INACTIVE_PRESENT)

    kernel.handlers[Cmd.TABLE_LOAD] = handler
    targets = [Target(0, 8, "linear", "7:0 0"), Target(8, 8, "error", "")]
    ctl.load(targets, uuid="U", read_only=True)
    hdr, payload = got[0]
    assert (hdr.uuid, hdr.name, hdr.target_count) == ("U", "", 2)
    assert hdr.flags & Flag.READONLY
    assert parse_table(payload, 2, status_output=False) == targets


def test_rename_payload(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    got: list[tuple[DmIoctl, bytes]] = []
    kernel.handlers[Cmd.DEV_RENAME] = lambda hdr, p: logged(got, (hdr, p), status_reply("new"))
    ctl.rename("old", "new")
    assert got[0][0].name == "old"
    assert got[0][1] == b"new\0"


def test_cancel_deferred_remove_is_a_target_message(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    got: list[bytes] = []
    kernel.handlers[Cmd.TARGET_MSG] = lambda hdr, p: logged(got, p, status_reply("x"))
    ctl.cancel_deferred_remove(uuid="XENBLOCKCTL-1")
    assert got == [struct.pack("=Q", 0) + b"@cancel_deferred_remove\0"]


def test_failed_load_removes_the_created_device(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    created: dict[str, str] = {}

    def create(hdr: DmIoctl, _: bytes) -> bytes:
        created["uuid"] = hdr.uuid
        return status_reply(hdr.name, hdr.uuid, os.makedev(254, 3))

    removes: list[DmIoctl] = []
    kernel.handlers[Cmd.DEV_CREATE] = create
    kernel.handlers[Cmd.TABLE_LOAD] = lambda hdr, _: OSError(errno.EINVAL, "bad table")
    kernel.handlers[Cmd.DEV_REMOVE] = lambda hdr, _: logged(removes, hdr, status_reply("x"))
    with pytest.raises(dm.DmError) as info:
        dm.create_owned(ctl, "xbc-own", [Target(0, 8, "linear", "7:0 0")])
    assert info.value.errno == errno.EINVAL
    assert created["uuid"].startswith(dm.OWNED_UUID_PREFIX)
    assert [(r.uuid, bool(r.flags & Flag.DEFERRED_REMOVE)) for r in removes] == [(created["uuid"], False)]
    assert kernel.cmds() == [Cmd.DEV_CREATE, Cmd.TABLE_LOAD, Cmd.DEV_REMOVE]


def test_sweep_removes_only_our_dead_unheld_devices(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    dead = "XENBLOCKCTL-1-1-aa"
    alive = "XENBLOCKCTL-2-2-bb"
    held = "XENBLOCKCTL-3-3-cc"
    racing = "XENBLOCKCTL-4-4-dd"
    devices = {
        dead: status_reply("dead", dead, os.makedev(254, 0)),
        alive: status_reply("alive", alive, os.makedev(254, 1)),
        held: status_reply("held", held, os.makedev(254, 2), opens=1),
        racing: status_reply("racing", racing, os.makedev(254, 3)),
        "LVM-admin": status_reply("admin", "LVM-admin", os.makedev(254, 4)),
    }
    listing = [(DmIoctl.unpack(v).dev, DmIoctl.unpack(v).name, k) for k, v in devices.items()]
    kernel.handlers[Cmd.LIST_DEVICES] = lambda hdr, _: with_payload(name_list(listing))
    kernel.handlers[Cmd.DEV_STATUS] = lambda hdr, _: devices[hdr.uuid]
    removed: list[str] = []

    def remove(hdr: DmIoctl, _: bytes) -> bytes | OSError:
        assert not hdr.flags & Flag.DEFERRED_REMOVE  # a racing opener must win (EBUSY)
        if hdr.uuid == racing:
            return OSError(errno.EBUSY, "opened meanwhile")
        removed.append(hdr.uuid)
        return devices[hdr.uuid]

    kernel.handlers[Cmd.DEV_REMOVE] = remove
    result = dm.sweep_owned(ctl, creator_alive=lambda uuid: uuid == alive)
    assert result == ["dead"]
    assert removed == [dead]


def test_sweep_asks_for_uuids_old_kernels_do_not_list(kernel: FakeKernel, ctl: dm.DmControl) -> None:
    dead = "XENBLOCKCTL-1-1-aa"
    old_form = struct.pack("=QI", os.makedev(254, 0), 0) + b"dead\0" + bytes(3)
    kernel.handlers[Cmd.LIST_DEVICES] = lambda hdr, _: with_payload(old_form)
    statuses: list[DmIoctl] = []
    kernel.handlers[Cmd.DEV_STATUS] = lambda hdr, _: logged(statuses, hdr, status_reply("dead", dead))
    kernel.handlers[Cmd.DEV_REMOVE] = lambda hdr, _: status_reply("dead", dead)
    assert dm.sweep_owned(ctl, creator_alive=lambda uuid: False) == ["dead"]
    assert statuses[0].name == "dead"


def test_owned_uuid_names_a_live_creator() -> None:
    uuid = dm.make_owned_uuid("snap")
    assert uuid.startswith(f"XENBLOCKCTL-{os.getpid()}-")
    assert uuid.endswith("-snap")
    assert dm.creator_alive(uuid)
    pid, start = uuid.split("-")[1:3]
    assert not dm.creator_alive(f"XENBLOCKCTL-{pid}-{int(start) + 1}-x")  # pid reused by another process
    assert not dm.creator_alive("XENBLOCKCTL-notapid-1-x")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/dev/mapper/vg0-root", "vg0-root"),
        ("/dev/vg0/root", None),  # not a block device here
        ("/dev/shm/disk.img", None),
        ("/dev/mapper//x/", "x"),
        ("/dev/loop0", None),
        ("/dev/disk/by-id/x", None),
        ("/srv/img", None),
        ("/dev/a/b/c", None),
    ],
)
def test_name_for_path(path: str, name: str | None) -> None:
    assert dm.name_for_path(path) == name


@pytest.fixture
def fake_lv() -> Iterator[str]:
    """/dev/xbctest-vg/lv-a as a block node (never opened), removed afterwards."""
    vg = Path("/dev/xbctest-vg")
    vg.mkdir()
    try:
        os.mknod(vg / "lv-a", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        yield str(vg / "lv-a")
    finally:
        (vg / "lv-a").unlink(missing_ok=True)
        vg.rmdir()


@pytest.mark.root
def test_lvm_path_that_is_a_block_device(fake_lv: str) -> None:
    assert dm.name_for_path(fake_lv) == "xbctest--vg-lv--a"
    assert dm.name_for_path("/dev/xbctest-vg/other") is None


def test_snapshot_table() -> None:
    targets = dm.snapshot_targets(os.makedev(7, 1), os.makedev(7, 2), 16384)
    assert targets == [Target(0, 16384, "snapshot", "7:1 7:2 N 8")]
    with pytest.raises(ValueError, match="power of two"):
        dm.snapshot_targets(1, 2, 8, chunk_sectors=12)


@pytest.mark.skipif(Path(dm.MISC_SYSFS).exists(), reason="this kernel has device-mapper")
def test_control_without_dm_is_unavailable() -> None:
    with pytest.raises(dm.DmUnavailable):
        dm.DmControl.open()
