#!/usr/bin/python3 -S
"""The interpreter floor for bench/blockscript_add.py: a stdlib-only block script, file targets only.

    floor_block.py add|remove     (libxl's environment: XENBUS_PATH, XENSTORED_PATH, ...)

What a Python block script with our semantics costs when it imports nothing it does not run: one
`_socket` connection with every batch in one send, LOOP_CONFIGURE with AUTOCLEAR, a per-target
flock, the bound-loop sharing scan, the identity published in one transaction that re-checks the
backend, the hand-off wait (holding the loop fd until the consumer wrote `opened`=1), the
connected mark, `os._exit`. `remove` detaches only with proof (device number, diskseq, tag) and
withdraws in a transaction guarded by the owner record. No error reporting beyond the exit status,
no dm or block-device targets, no kernel-blkback hand-off: it is a measuring stick, not a product
(never installed; not imported by the package)."""

import _socket
import fcntl
import os
import select
import struct
import sys
import time

# Annotations only, never run: `typing` and `from __future__ import annotations` each cost an import
# this floor exists to avoid, so the names below are for mypy and the annotations naming them are quoted.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import NoReturn

HDR = struct.Struct("=IIII")
READ, WATCH, UNWATCH, TX_START, TX_END, GET_DOMAIN_PATH, WRITE, RM, WATCH_EVENT, ERROR = (
    2, 4, 5, 6, 7, 10, 11, 13, 15, 16,
)  # fmt: skip
LOOP_CLR_FD, LOOP_GET_STATUS64, LOOP_CONFIGURE, LOOP_CTL_GET_FREE = 0x4C01, 0x4C05, 0x4C0A, 0x4C82
BLKGETDISKSEQ = 0x80081280
AUTOCLEAR, READ_ONLY = 4, 1
INFO = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64, 232 bytes
OWNER = "xenblockctl-owner"
PUBLISHED = ("physical-device-luid", "physical-device", "physical-device-path", OWNER)


def fail(where: int) -> "NoReturn":
    sys.stderr.write(f"floor_block: failed at check {where}\n")
    sys.stderr.flush()
    os._exit(1)


class Store:
    def __init__(self, path: str) -> None:
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:  # C xenstored's listen backlog of 1
                time.sleep(0.001)
        self.rid = 0
        self.buf = b""
        self.events: list[bytes] = []

    def batch(self, reqs: "list[tuple[int, bytes]]", tx: int = 0) -> "list[tuple[int, bytes]]":
        """[(type, payload)] -> [(type, payload)], one send."""
        ids = []
        out = []
        for op, payload in reqs:
            self.rid += 1
            ids.append(self.rid)
            out.append(HDR.pack(op, self.rid, tx, len(payload)) + payload)
        self.sock.sendall(b"".join(out))
        got: dict[int, tuple[int, bytes]] = {}
        while len(got) < len(ids):
            while len(self.buf) < 16 or len(self.buf) < 16 + HDR.unpack_from(self.buf)[3]:
                data = self.sock.recv(65536)
                if not data:
                    fail(1)
                self.buf += data
            op, rid, _tx, n = HDR.unpack_from(self.buf)
            payload, self.buf = self.buf[16 : 16 + n], self.buf[16 + n :]
            if op == WATCH_EVENT:
                self.events.append(payload)
            else:
                got[rid] = (op, payload)
        return [got[i] for i in ids]

    def reads(self, paths: "list[str]", tx: int = 0) -> "list[str | None]":
        return [
            None if op == ERROR else p.decode()
            for op, p in self.batch([(READ, path.encode() + b"\0") for path in paths], tx)
        ]

    def transaction(self, body: "Callable[[int], bool]") -> bool:
        for _ in range(16):
            op, p = self.batch([(TX_START, b"\0")])[0]
            tx = int(p.rstrip(b"\0"))
            ok = body(tx)
            op, p = self.batch([(TX_END, b"T\0" if ok else b"F\0")], tx)[0]
            if op != ERROR:
                return ok
            if p != b"EAGAIN\0":
                fail(2)
        fail(3)

    def wait_event(self, timeout: float) -> None:
        if self.events or len(self.buf) >= 16:
            return
        select.select([self.sock], [], [], timeout)


def writes(items: "Mapping[str, str]", removes: "Sequence[str]" = ()) -> "list[tuple[int, bytes]]":
    reqs = [(WRITE, k.encode() + b"\0" + v.encode()) for k, v in items.items()]
    return reqs + [(RM, k.encode() + b"\0") for k in removes]


def sharing_scan(st: "os.stat_result") -> None:
    """Every bound loop device backed by this inode (our sharing check for a file: the kernel's
    loop list is complete)."""
    for name in os.listdir("/sys/block"):
        if not name.startswith("loop"):
            continue
        try:
            fd = os.open("/dev/" + name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            info = INFO.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(INFO.size)))
        except OSError:
            continue
        finally:
            os.close(fd)
        if (info[0], info[1]) == (st.st_dev, st.st_ino):
            fail(4)  # shared: ours would refuse a writable second user


def add(store: Store, be: str, env: "Mapping[str, str]") -> int:
    state, online, mode, params, published = store.reads(
        [be + "/" + n for n in ("state", "online", "mode", "params", "physical-device")]
    )
    if state is None or state in ("5", "6") or online == "0" or mode not in ("r", "w") or not params:
        fail(5)
    if published is not None:
        return 0
    path = params.partition(":")[2] if params.startswith(("file:", "phy:")) else params
    writable = mode == "w"
    backing = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    st = os.fstat(backing)
    lock_dir = env.get("XENBLOCKCTL_LOCK_DIR", "/run/lock/xenblockctl")
    os.makedirs(lock_dir, exist_ok=True)
    lock = os.open(
        f"{lock_dir}/file-{st.st_dev:x}-{st.st_ino:x}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    fcntl.flock(lock, fcntl.LOCK_EX)
    sharing_scan(st)
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    domid, devid = be.rsplit("/", 2)[-2:]
    tag = f"xenblockctl:{domid}:{devid}".encode()
    while True:
        n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
        loop = os.open(f"/dev/loop{n}", (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        flags = AUTOCLEAR | (0 if writable else READ_ONLY)
        info = INFO.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, tag, b"", b"", 0, 0)
        try:
            fcntl.ioctl(loop, LOOP_CONFIGURE, struct.pack("=II", backing, 512) + info + bytes(64))
            break
        except OSError:  # lost the race for that number
            os.close(loop)
    os.close(ctl)
    os.close(backing)
    seq = struct.unpack("=Q", fcntl.ioctl(loop, BLKGETDISKSEQ, bytes(8)))[0]
    rdev = os.fstat(loop).st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    owner = (
        f"v1 kind=loop dev={major:x}:{minor:x} seq={seq:x} mode={mode} autoclear=1 "
        f"backing={st.st_dev:x}:{st.st_ino:x} tag={tag.decode()}"
    )
    home = store.batch([(GET_DOMAIN_PATH, b"0\0")])[0][1].rstrip(b"\0").decode()
    error = f"{home}/error/{be[len(home) + 1 :]}"

    def publish(tx: int) -> bool:
        now = store.reads(
            [be + "/" + n for n in ("state", "online", "physical-device", "mode", "params")], tx
        )
        if now[0] is None or now[0] in ("5", "6") or now[1] == "0" or now[2] is not None:
            fail(6)
        if (now[3], now[4]) != (mode, params):
            fail(7)
        items = {
            be + "/physical-device-luid": f"{seq:x}",
            be + "/physical-device": f"{major:x}:{minor:x}",
            be + "/physical-device-path": f"/dev/loop{n}",
            be + "/" + OWNER: owner,
        }
        store.batch(writes(items, [be + "/hotplug-error", error]), tx)
        return True

    store.transaction(publish)
    os.close(lock)
    token = f"floor-{os.getpid()}".encode()
    watched = [be.encode(), (error + "/error").encode()]
    store.batch([(WATCH, p + b"\0" + token + b"\0") for p in watched])
    deadline = time.monotonic() + float(env.get("XENBLOCKCTL_HANDOFF_TIMEOUT", "30"))
    while True:
        err, opened, state = store.reads([error + "/error", be + "/opened", be + "/state"])
        if err or state is None or state in ("5", "6"):
            fail(8)
        if opened == "1":
            break
        if time.monotonic() > deadline:
            fail(9)
        store.wait_event(0.05)
        store.events.clear()
    store.batch([(UNWATCH, p + b"\0" + token + b"\0") for p in watched])

    def connected(tx: int) -> bool:
        if store.reads([be + "/state"], tx)[0] is None:
            fail(10)
        store.batch(writes({be + "/" + OWNER: owner, be + "/hotplug-status": "connected"}), tx)
        return True

    store.transaction(connected)
    os.close(loop)
    return 0


def remove(store: Store, be: str) -> int:
    owner = store.reads([be + "/" + OWNER])[0]
    if owner is None:
        return 0
    fields = dict(w.partition("=")[::2] for w in owner.split(" ")[1:])
    major, minor = (int(x, 16) for x in fields["dev"].split(":"))
    try:
        fd = os.open(f"/dev/loop{minor}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            seq = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETDISKSEQ, bytes(8)))[0]
            info = INFO.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(INFO.size)))
            backing = f"{info[0]:x}:{info[1]:x}"
            if (
                major == 7
                and seq == int(fields["seq"], 16)
                and info[9].rstrip(b"\0").decode() == fields["tag"]
                and backing == fields.get("backing", backing)
            ):
                fcntl.ioctl(fd, LOOP_CLR_FD)
        finally:
            os.close(fd)
    except OSError:
        pass  # already gone

    def withdraw(tx: int) -> bool:
        if store.reads([be + "/" + OWNER], tx)[0] != owner:
            return False
        store.batch([(RM, f"{be}/{name}".encode() + b"\0") for name in PUBLISHED], tx)
        return True

    store.transaction(withdraw)
    return 0


def main() -> "NoReturn":
    env = os.environ
    store = Store(env.get("XENSTORED_PATH") or "/run/xenstored/socket")
    rel = env["XENBUS_PATH"]
    be = rel if rel.startswith("/") else "/local/domain/0/" + rel
    status = add(store, be, env) if sys.argv[1] == "add" else remove(store, be)
    sys.stdout.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
