#!/usr/bin/python3 -S
"""The interpreter floor for bench/blockscript_add.py: a stdlib-only block script, file and
block-device targets.

    floor_block.py add|remove     (libxl's environment: XENBUS_PATH, XENSTORED_PATH, ...)

What a Python block script with our semantics costs when it imports nothing it does not run: one
`_socket` connection with every batch in one send, the backend's nodes and our home in one round
trip, a per-target flock, the sharing check, the identity published in one transaction that
re-checks the backend (its reads and writes in one batch, as ours sends them), the hand-off wait
(holding the device fd until the consumer wrote `opened`=1), the connected mark, `os._exit`.

A file: LOOP_CONFIGURE with AUTOCLEAR, the bound-loop sharing scan. A block device: opened once
(stat before, fstat after), its identity from the fd (size, block sizes, read-only, diskseq), read
again after the lock and compared (ours: claim._Device.make), the sharing check ours makes on that
path: every vbd/vbd3 backend's `physical-device` (the same 2 + 128 + 128 requests as ours for 128
one-disk guests), /proc/self/mountinfo, and the device's sysfs holders for a writable attach. The
walk goes over the connection shape that costs the C xenstored least (bench/README.md, issue 18,
session 15: it serves one request per connection per poll turn): 4 connections, opened as soon as
the target is known to be a device, each share's follow-ups sent on its connection as soon as its
replies are read. What ours does only when the check finds a backend that publishes the device
(the owner record, the liveness of its diskseq, the same-VM waiver) the floor replaces by a
refusal: none of it runs on the measured path.

`remove` detaches only with proof (device number, diskseq, tag; never a device it did not bind)
and withdraws in a transaction guarded by the owner record. No error reporting beyond the exit
status, no dm or NBD targets, no kernel-blkback hand-off: it is a measuring stick, not a product
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
READ, DIRECTORY, WATCH, UNWATCH, TX_START, TX_END, GET_DOMAIN_PATH, WRITE, RM, WATCH_EVENT, ERROR = (
    2, 1, 4, 5, 6, 7, 10, 11, 13, 15, 16,
)  # fmt: skip
LOOP_CLR_FD, LOOP_GET_STATUS64, LOOP_CONFIGURE, LOOP_CTL_GET_FREE = 0x4C01, 0x4C05, 0x4C0A, 0x4C82
BLKROGET, BLKSSZGET, BLKGETSIZE64, BLKPBSZGET, BLKGETDISKSEQ = 0x125E, 0x1268, 0x80081272, 0x127B, 0x80081280
AUTOCLEAR, READ_ONLY = 4, 1
INFO = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64, 232 bytes
OWNER = "xenblockctl-owner"
PUBLISHED = ("physical-device-luid", "diskseq", "physical-device", "physical-device-path", OWNER)
#: The walk's connections: the C daemon's cost per walk is least with 4 (session 15, walk18).
LANES = 4
#: A stream's connection is read once this many of its replies (or all it still owes) are in:
#: a wake-up per reply would cost more than the daemon's whole turn.
WAKE_REPLIES = 16
_TIMEVAL = struct.Struct("@ll")


def fail(where: int) -> "NoReturn":
    sys.stderr.write(f"floor_block: failed at check {where}\n")
    sys.stderr.flush()
    os._exit(1)


def connect(path: str, *, wait: bool = True) -> "_socket.socket | None":
    """A blocking connection whose waits the kernel bounds (SO_RCVTIMEO/SO_SNDTIMEO: no poll()
    before each recv, as a Python timeout would add); None if the daemon's backlog is full and
    `wait` is off (C xenstored listens with a backlog of 1 and accepts one per poll turn)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    while True:
        try:
            sock.connect(path)
            break
        except BlockingIOError:
            if not wait:
                sock.close()
                return None
            time.sleep(0.001)
    sock.setblocking(True)
    ten = _TIMEVAL.pack(10, 0)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, ten)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, ten)
    return sock


class Conn:
    """One connection: requests numbered per connection, replies matched by number."""

    def __init__(self, sock: "_socket.socket") -> None:
        self.sock = sock
        self.rid = 0
        self.buf = b""
        self.events: list[bytes] = []
        self.lowat = 1

    def encode(self, reqs: "Sequence[tuple[int, bytes]]", tx: int = 0) -> "tuple[list[int], bytes]":
        ids = []
        out = []
        for op, payload in reqs:
            self.rid += 1
            ids.append(self.rid)
            out.append(HDR.pack(op, self.rid, tx, len(payload)) + payload)
        return ids, b"".join(out)

    def receive(self, replies: int) -> None:
        """Read once at least the fewest bytes that can finish `replies` more replies are here
        (SO_RCVLOWAT: one wake-up for many replies, where the C daemon writes each reply's header
        and payload on separate turns). Called with no whole frame left in the buffer."""
        buf = self.buf
        rest = 16 + HDR.unpack_from(buf)[3] - len(buf) if len(buf) >= 16 else 16 - len(buf)
        lowat = max(1, min(rest + (replies - 1) * 16, 65536))
        if lowat != self.lowat:
            self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVLOWAT, lowat)
            self.lowat = lowat
        data = self.sock.recv(65536)
        if not data:
            fail(1)
        self.buf += data

    def frames(self) -> "list[tuple[int, int, bytes]]":
        """The whole frames received so far: (type, request id, payload); watch events set aside."""
        out = []
        buf, at, end = self.buf, 0, len(self.buf)
        while end - at >= 16:
            op, rid, _tx, n = HDR.unpack_from(buf, at)
            if end - at < 16 + n:
                break
            payload = buf[at + 16 : at + 16 + n]
            at += 16 + n
            if op == WATCH_EVENT:
                self.events.append(payload)
            else:
                out.append((op, rid, payload))
        self.buf = buf[at:]
        return out

    def batch(self, reqs: "list[tuple[int, bytes]]", tx: int = 0) -> "list[tuple[int, bytes]]":
        """[(type, payload)] -> [(type, payload)], one send."""
        ids, data = self.encode(reqs, tx)
        self.sock.sendall(data)
        got: dict[int, tuple[int, bytes]] = {}
        while True:
            for op, rid, payload in self.frames():
                got[rid] = (op, payload)
            if len(got) >= len(ids):
                return [got[i] for i in ids]
            self.receive(1)

    def reads(self, paths: "list[str]", tx: int = 0) -> "list[str | None]":
        return values(self.batch(reads(paths), tx))

    def transaction(self, body: "Callable[[int], bool]", first: "Sequence[tuple[int, bytes]]" = ()) -> bool:
        """`first`: requests that ride with the transaction's start (unwatches nobody waits for)."""
        for _ in range(16):
            op, p = self.batch([*first, (TX_START, b"\0")])[-1]
            first = ()
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
        if self.lowat != 1:
            self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVLOWAT, 1)
            self.lowat = 1
        select.select([self.sock], [], [], timeout)


def reads(paths: "Sequence[str]") -> "list[tuple[int, bytes]]":
    return [(READ, path.encode() + b"\0") for path in paths]


def values(replies: "list[tuple[int, bytes]]") -> "list[str | None]":
    return [None if op == ERROR else p.decode() for op, p in replies]


def writes(items: "Mapping[str, str]", removes: "Sequence[str]" = ()) -> "list[tuple[int, bytes]]":
    reqs = [(WRITE, k.encode() + b"\0" + v.encode()) for k, v in items.items()]
    return reqs + [(RM, k.encode() + b"\0") for k in removes]


def sharing_scan(st: "os.stat_result") -> None:
    """Every bound loop device backed by this inode (our sharing check for a file: the kernel's
    loop list is complete). An unbound minor has no sysfs `loop/` directory: a stat relative to
    the loop devices' own directory tells it apart without opening its node, as ours does
    (kernel/loop.py bound_loops_backed_by; a host that once had 384 loops keeps 384 minors)."""
    where = os.open("/sys/devices/virtual/block", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in os.listdir(where):
        if not name.startswith("loop"):
            continue
        try:
            os.stat(name + "/loop", dir_fd=where)
        except OSError:
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
    os.close(where)


def identify(fd: int) -> "tuple[int, int, int, int, int, int]":
    """(rdev, size, logical and physical block size, read-only, diskseq), all from the fd."""
    ioctl, u64 = fcntl.ioctl, struct.Struct("=Q")
    return (
        os.fstat(fd).st_rdev,
        u64.unpack(ioctl(fd, BLKGETSIZE64, bytes(8)))[0],
        struct.unpack("=i", ioctl(fd, BLKSSZGET, bytes(4)))[0],
        struct.unpack("=I", ioctl(fd, BLKPBSZGET, bytes(4)))[0],
        struct.unpack("=i", ioctl(fd, BLKROGET, bytes(4)))[0],
        u64.unpack(ioctl(fd, BLKGETDISKSEQ, bytes(8)))[0],
    )


def publishers(lanes: "list[Conn]", home: str, skip: str, wanted: bytes) -> "list[str]":
    """The backends of `home` but `skip` whose physical-device is `wanted`: every vbd and vbd3
    backend's node is read (no find-by-value in xenstore). The kinds' listings on the first
    connection, the domains' listings shared over every connection, and each domain's backends
    read on the connection that listed it as soon as its reply is read."""
    kinds = [f"{home}/backend/vbd", f"{home}/backend/vbd3"]
    domains = [
        f"{kind}/{name}"
        for kind, (op, names) in zip(
            kinds, lanes[0].batch([(DIRECTORY, k.encode() + b"\0") for k in kinds]), strict=True
        )
        if op == DIRECTORY
        for name in names.decode().split("\0")
        if name
    ]
    #: per connection, request id -> the domain it lists / the backend whose node it reads
    jobs: list[dict[int, str]] = []
    reading: list[dict[int, str]] = [{} for _ in lanes]
    count = len(domains)
    for k, lane in enumerate(lanes):
        share = domains[count * k // len(lanes) : count * (k + 1) // len(lanes)]
        ids, data = lane.encode([(DIRECTORY, d.encode() + b"\0") for d in share])
        if share:
            lane.sock.sendall(data)
        jobs.append(dict(zip(ids, share, strict=True)))
    found = []
    suffix = "/physical-device"
    while True:
        busy = False
        for k, lane in enumerate(lanes):
            listing, leaf = jobs[k], reading[k]
            owed = len(listing) + len(leaf)
            if not owed:
                continue
            busy = True
            lane.receive(min(owed, WAKE_REPLIES))
            follow = []
            for op, rid, payload in lane.frames():
                domain = listing.pop(rid, None)
                if domain is not None:
                    if op == DIRECTORY:
                        for devid in payload.decode().split("\0"):
                            if devid and (be := f"{domain}/{devid}") != skip:
                                follow.append(be)
                    elif op != ERROR:
                        fail(11)
                    continue
                be = leaf.pop(rid)
                if op == READ and payload == wanted:
                    found.append(be)
            if follow:
                ids, data = lane.encode(reads([be + suffix for be in follow]))
                lane.sock.sendall(data)
                leaf.update(zip(ids, follow, strict=True))
        if not busy:
            return found


def mounted(devt: int, writable: bool) -> bool:
    """Whether a filesystem on this host is mounted from the device (ours: sharing.mount_claims)."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().split(b"\n")
    want = f"{os.major(devt)}:{os.minor(devt)}".encode()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[2] == want and (writable or b"rw" in fields[5].split(b",")):
            return True
    return False


def add(store: Conn, be: str, env: "Mapping[str, str]", xs_path: str) -> int:
    names = ("state", "online", "mode", "params", "physical-device")
    replies = store.batch([(GET_DOMAIN_PATH, b"0\0"), *reads([f"{be}/{n}" for n in names])])
    home = replies[0][1].rstrip(b"\0").decode()
    state, online, mode, params, published = values(replies[1:])
    if state is None or state in ("5", "6") or online == "0" or mode not in ("r", "w") or not params:
        fail(5)
    if published is not None:
        return 0
    target = params.partition(":")[2] if params.startswith(("file:", "phy:")) else params
    writable = mode == "w"
    kind = os.stat(target).st_mode & 0o170000
    if kind not in (0o100000, 0o060000):
        fail(12)  # ours refuses anything but a file or block device before opening it
    device = kind == 0o060000
    lanes = [store]
    if device:
        # The walk's other connections, opened before the local work so that the daemon has
        # accepted them by the time the walk needs them (backlog 1: one accept per poll turn);
        # a connect refused now is tried once more then, and the walk goes over what there is.
        lanes += [Conn(s) for s in (connect(xs_path, wait=False) for _ in range(LANES - 1)) if s]
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    fd = os.open(target, flags)
    st = os.fstat(fd)
    lock_dir = env.get("XENBLOCKCTL_LOCK_DIR", "/run/lock/xenblockctl")
    os.makedirs(lock_dir, exist_ok=True)
    domid, devid = be.rsplit("/", 2)[-2:]
    if device:
        if st.st_mode & 0o170000 != 0o060000:
            fail(12)  # swapped since the stat
        ident = identify(fd)
        major, minor = os.major(ident[0]), os.minor(ident[0])
        seq = ident[5]
        key = f"dev-{major}-{minor}"
    else:
        key = f"file-{st.st_dev:x}-{st.st_ino:x}"
    lock = os.open(f"{lock_dir}/{key}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    if device:
        while len(lanes) < LANES and (s := connect(xs_path, wait=False)):
            lanes.append(Conn(s))
        if publishers(lanes, home, be, f"{major:x}:{minor:x}".encode()):
            fail(13)  # ours would read their records: liveness, same VM
        for lane in lanes[1:]:
            lane.sock.close()
        if mounted(ident[0], writable):
            fail(14)
        if writable and os.listdir(f"/sys/dev/block/{major}:{minor}/holders"):
            fail(15)
        if identify(fd) != ident:
            fail(16)  # resized, set read-only or rebound since it was checked
        held, shown = os.dup(fd), target
        owner = f"v1 kind=device dev={major:x}:{minor:x} seq={seq:x} mode={mode} autoclear=0"
    else:
        sharing_scan(st)
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        tag = f"xenblockctl:{domid}:{devid}".encode()
        while True:
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            held = os.open(f"/dev/loop{n}", (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            lflags = AUTOCLEAR | (0 if writable else READ_ONLY)
            info = INFO.pack(0, 0, 0, 0, 0, 0, 0, 0, lflags, tag, b"", b"", 0, 0)
            try:
                fcntl.ioctl(held, LOOP_CONFIGURE, struct.pack("=II", fd, 512) + info + bytes(64))
                break
            except OSError:  # lost the race for that number
                os.close(held)
        os.close(ctl)
        seq = struct.unpack("=Q", fcntl.ioctl(held, BLKGETDISKSEQ, bytes(8)))[0]
        rdev = os.fstat(held).st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        shown = f"/dev/loop{n}"
        owner = (
            f"v1 kind=loop dev={major:x}:{minor:x} seq={seq:x} mode={mode} autoclear=1 "
            f"backing={st.st_dev:x}:{st.st_ino:x} tag={tag.decode()}"
        )
    os.close(fd)
    error = f"{home}/error/{be[len(home) + 1 :]}"

    def publish(tx: int) -> bool:
        items = {
            be + "/physical-device-luid": f"{seq:x}",
            be + "/diskseq": f"{seq:x}",
            be + "/physical-device": f"{major:x}:{minor:x}",
            be + "/physical-device-path": shown,
            be + "/" + OWNER: owner,
        }
        # the checks' reads and the writes in one batch; a refused check aborts (never committed)
        checked = ("state", "online", "physical-device", "mode", "params")
        replies = store.batch(
            reads([f"{be}/{n}" for n in checked]) + writes(items, [be + "/hotplug-error", error]), tx
        )
        now = values(replies[:5])
        if now[0] is None or now[0] in ("5", "6") or now[1] == "0" or now[2] is not None:
            fail(6)
        if (now[3], now[4]) != (mode, params):
            fail(7)
        return True

    store.transaction(publish)
    os.close(lock)
    token = f"floor-{os.getpid()}".encode()
    watched = [be.encode(), (error + "/error").encode()]
    watches = [(WATCH, p + b"\0" + token + b"\0") for p in watched]
    deadline = time.monotonic() + float(env.get("XENBLOCKCTL_HANDOFF_TIMEOUT", "30"))
    while True:
        replies = store.batch(watches + reads([error + "/error", be + "/opened", be + "/state"]))
        watches = []
        err, opened, state = values(replies[-3:])
        if err or state is None or state in ("5", "6"):
            fail(8)
        if opened == "1":
            break
        if time.monotonic() > deadline:
            fail(9)
        store.wait_event(0.05)
        store.events.clear()

    def connected(tx: int) -> bool:
        mark = writes({be + "/" + OWNER: owner, be + "/hotplug-status": "connected"})
        replies = store.batch(reads([be + "/state"]) + mark, tx)
        if replies[0][0] == ERROR:
            fail(10)
        return True

    # the unwatches ride with the transaction's start: nothing waits for their replies
    store.transaction(connected, [(UNWATCH, p + b"\0" + token + b"\0") for p in watched])
    os.close(held)
    return 0


def remove(store: Conn, be: str) -> int:
    owner = store.reads([be + "/" + OWNER])[0]
    if owner is None:
        return 0
    fields = dict(w.partition("=")[::2] for w in owner.split(" ")[1:])
    major, minor = (int(x, 16) for x in fields["dev"].split(":"))
    if fields.get("kind") == "loop":  # a device we only opened (kind=device) is never detached
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
        # the guard's read and the removals in one batch; a changed record aborts them
        replies = store.batch(
            reads([f"{be}/{OWNER}"]) + [(RM, f"{be}/{n}".encode() + b"\0") for n in PUBLISHED], tx
        )
        return values(replies[:1])[0] == owner

    store.transaction(withdraw)
    return 0


def main() -> "NoReturn":
    env = os.environ
    xs_path = env.get("XENSTORED_PATH") or "/run/xenstored/socket"
    store = Conn(connect(xs_path))  # type: ignore[arg-type]  # wait=True never gives None
    rel = env["XENBUS_PATH"]
    be = rel if rel.startswith("/") else "/local/domain/0/" + rel
    status = add(store, be, env, xs_path) if sys.argv[1] == "add" else remove(store, be)
    sys.stdout.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
