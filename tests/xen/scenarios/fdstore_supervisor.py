"""A minimal service manager for scenario 26 (dom0 has no systemd: PID 1 is xen-ci-init; not a scenario).

It does for one command what systemd does for a `Type=notify` unit with `FileDescriptorStoreMax=` > 0 and
`Restart=always` (systemd.service(5), sd_notify(3), sd_listen_fds(3)), over the same wire protocol:
- binds $NOTIFY_SOCKET (an AF_UNIX datagram socket) and starts the command with it set;
- FDSTORE=1 + FDNAME=x keeps the attached fds under x; FDSTOREREMOVE=1 + FDNAME=x closes them;
  fds sent without FDSTORE=1 are closed; READY=1 is logged;
- when the command dies, it starts it again with the kept fds at 3.. and LISTEN_FDS, LISTEN_FDNAMES,
  LISTEN_PID (= the new process, set between fork and exec, as systemd does), keeping its copies;
- unless STOPFILE exists then: the unit is stopped for good, every kept fd is closed, and it exits.

Usage: fdstore_supervisor.py NOTIFY_SOCKET STOPFILE [--first ARG]... -- COMMAND... (its output goes to
ours); each --first ARG is appended to COMMAND on the first start only (`--takeover`: the supervised
engine takes over from one running outside it).
The test suite's tests/fixtures/fdstore.py uses this file's FdStore and receive() (dom0 has no pytest,
so the code lives here, stand-alone)."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import threading
import time

#: What systemd does between fork and exec, as a `python -c` program: the kept fds at 3.., LISTEN_PID =
#: this process (which cannot be known before the child exists), then exec the command. The engine
#: restart flow tests launch their engines with it too (one copy: this file must stay stand-alone in dom0).
LAUNCH = (
    "import fcntl, os, sys\n"
    "i = sys.argv.index('--')\n"
    "src = [int(x) for x in sys.argv[1:i]]\n"
    "high = [fcntl.fcntl(f, fcntl.F_DUPFD, 1000) for f in src]\n"
    "for f in src: os.close(f)\n"
    "for n, h in enumerate(high): os.dup2(h, 3 + n)\n"
    "for h in high: os.close(h)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execvp(sys.argv[i + 1], sys.argv[i + 1 :])\n"
)


def log(message: str) -> None:
    print(f"supervisor: {message}", file=sys.stderr, flush=True)


#: Room for as many fds as one datagram can carry (SCM_MAX_FD is 253).
MAX_FDS = 253


def receive(sock: socket.socket) -> tuple[list[str], list[int]]:
    """One datagram of the notify protocol: its lines and the fds attached (SCM_RIGHTS)."""
    data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(12))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % 4])
            fds += got.tolist()
    return data.decode().split("\n"), fds


def bind(address: str) -> socket.socket:
    """The manager's end of $NOTIFY_SOCKET, with credentials on (systemd checks the sender)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return sock


class FdStore:
    """What the manager keeps for a unit with FileDescriptorStoreMax= > 0, and how it acts on a
    message: one copy, used by main() here and by tests/fixtures/fdstore.py."""

    def __init__(self) -> None:
        self.fds: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def apply(self, lines: list[str], fds: list[int]) -> list[str]:
        """Act on one message; returns what happened, for a log."""
        fields = dict(line.partition("=")[::2] for line in lines if line)
        name = fields.get("FDNAME", "stored")
        events = []
        with self.lock:
            if fields.get("READY") == "1":
                events.append(f"READY=1 ({fields.get('STATUS', '')})")
            if fields.get("FDSTORE") == "1":
                self.fds.setdefault(name, []).extend(fds)
                events.append(f"FDSTORE {name} ({len(fds)} fd)")
                fds = []
            if fields.get("FDSTOREREMOVE") == "1":
                for fd in self.fds.pop(name, []):
                    os.close(fd)
                events.append(f"FDSTOREREMOVE {name}")
        for fd in fds:  # sent without FDSTORE=1: systemd closes them
            os.close(fd)
        return events

    def names(self) -> dict[str, int]:
        with self.lock:
            return {name: len(fds) for name, fds in self.fds.items()}

    def listen(self) -> tuple[list[int], str]:
        """What a restart hands the next process: (fds in LISTEN order, LISTEN_FDNAMES)."""
        with self.lock:
            pairs = [(name, fd) for name, fds in sorted(self.fds.items()) for fd in fds]
        return [fd for _, fd in pairs], ":".join(name for name, _ in pairs)

    def close_all(self) -> int:
        """The unit stopped for good (or systemd gave up restarting it): every copy is closed."""
        with self.lock:
            n = sum(map(len, self.fds.values()))
            for fds in self.fds.values():
                for fd in fds:
                    os.close(fd)
            self.fds.clear()
        return n


def serve(sock: socket.socket, store: FdStore) -> None:
    while True:
        for event in store.apply(*receive(sock)):
            log(event)


def main() -> int:
    address, stopfile = sys.argv[1], sys.argv[2]
    split = sys.argv.index("--")
    command = sys.argv[split + 1 :]
    options = sys.argv[3:split]
    first = [options[i + 1] for i in range(0, len(options), 2) if options[i] == "--first"]
    if os.path.exists(address):
        os.unlink(address)
    store = FdStore()
    threading.Thread(target=serve, args=(bind(address), store), daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")} | {"NOTIFY_SOCKET": address}
    starts = 0
    while True:
        fds, names = store.listen()
        child_env = dict(env)
        argv = command + (first if starts == 0 else [])
        if fds:
            child_env |= {"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names}
            argv = [sys.executable, "-c", LAUNCH, *map(str, fds), "--", *argv]
        proc = subprocess.Popen(argv, env=child_env, pass_fds=fds)
        starts += 1
        log(f"started pid {proc.pid} (start {starts}) with {len(fds)} stored fd(s): {names or '-'}")
        code = proc.wait()
        log(f"pid {proc.pid} exited with {code}")
        if os.path.exists(stopfile):
            log(f"unit stopped for good: closed {store.close_all()} stored fd(s)")
            return 0
        time.sleep(0.1)  # RestartSec=100ms, systemd's default


if __name__ == "__main__":
    sys.exit(main())
