"""The engine serving an NBD export, against a direct NBD client and against the engine on the
same file locally, in one run.

    .venv/bin/python -m bench.nbd_throughput [--seconds 3] [--size-mib 64] [--frontend-process]

nbdkit's file plugin exports a 64 MiB image on a unix socket; the image is in the page cache, so
the rows measure software cost per request, not a disk. Rows per workload (bench.ring_throughput's
4 KiB random QD 32, 64 KiB random QD 32, 1 MiB sequential QD 4):

- `direct NBD client`: one thread keeping `qd` NBD_CMD_READs in flight on one connection (header
  out, reply header + data in, nothing else): what any NBD client must at least do per request.
- `engine over NBD`: a simulated guest on the local transport, the engine's data plane on an
  NbdTarget (backend/nbdio.py): validation, grant pages, one pipelined connection.
- `engine, local file`: the same guest and data plane on the image's fd (inline I/O): what the
  NBD hop costs the engine.

Ratios: engine over NBD / direct NBD client, and engine over NBD / engine on the local file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.ring_throughput import WORKLOADS, Workload, _offsets, engine
from xenblockctl.backend.io import DeviceTarget
from xenblockctl.backend.nbdio import NbdTarget
from xenblockctl.backend.transport.local import LocalTransport
from xenblockctl.nbd import client, proto, uri


def direct_nbd(parsed: uri.NbdUri, w: Workload, size: int, seconds: float) -> float:
    """Requests per second of a minimal pipelined NBD reader at the workload's queue depth."""
    sock = client.open_socket(parsed)
    client.handshake(sock, parsed)
    sock.settimeout(30)
    offsets = _offsets(w, size)
    buf = bytearray(w.block)
    view = memoryview(buf)
    header = bytearray(proto.SIMPLE_REPLY.size)
    n_sent = n_done = 0

    def send() -> None:
        nonlocal n_sent
        sock.sendall(proto.pack_request(proto.CMD_READ, n_sent, offsets[n_sent % len(offsets)], w.block))
        n_sent += 1

    def receive() -> None:
        nonlocal n_done
        sock.recv_into(header, len(header), socket.MSG_WAITALL)
        magic, error, _cookie = proto.SIMPLE_REPLY.unpack(header)
        if magic != proto.SIMPLE_REPLY_MAGIC or error:
            raise SystemExit(f"direct NBD read failed: magic {magic:#x} error {error}")
        got = 0
        while got < w.block:
            got += sock.recv_into(view[got:])
        n_done += 1

    try:
        for _ in range(w.qd):
            send()
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            receive()
            send()
        elapsed = time.perf_counter() - start
        done = n_done
        while n_done < n_sent:
            receive()
    finally:
        sock.close()
    return done / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--frontend-process", action="store_true", help="run the frontend in a child process")
    args = ap.parse_args()
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise SystemExit("nbdkit is not installed (Debian package nbdkit)")
    with tempfile.TemporaryDirectory(prefix="xbc-bench-nbd-") as tmp:
        image = Path(tmp, "disk.img")
        size = args.size_mib << 20
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        sock_path = Path(tmp, "nbd.sock")
        server = subprocess.Popen([nbdkit, "-f", "-U", str(sock_path), "file", f"file={image}"])
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        transport = LocalTransport(str(Path(tmp, "grants.sock")))
        try:
            deadline = time.monotonic() + 10
            while not sock_path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            buf = bytearray(1 << 20)
            for off in range(0, size, 1 << 20):
                os.preadv(fd, [buf], off)
            parsed = uri.parse(f"nbd+unix:///?socket={sock_path}")
            with client.NbdClient.connect(parsed) as c:
                info = c.info
            nbd_target = NbdTarget(parsed, info, writable=False)
            local = DeviceTarget.from_fd(fd)
            side = "child process" if args.frontend_process else "same process"
            version = subprocess.run([nbdkit, "--version"], capture_output=True, text=True, check=True)
            print(
                f"{args.size_mib} MiB file behind nbdkit {version.stdout.split()[-1]}"
                f" (unix socket), page cache warm, frontend in {side}, {args.seconds:.0f} s per row,"
                f" load average {os.getloadavg()[0]:.1f}"
            )
            for w in WORKLOADS:
                base = direct_nbd(parsed, w, size, args.seconds)
                runs = {}
                for name, target in (("engine over NBD", nbd_target), ("engine, local file", local)):
                    runs[name] = engine(
                        transport,
                        target,  # type: ignore[arg-type]
                        str(image),
                        w,
                        workers=0,
                        seconds=args.seconds,
                        in_child=args.frontend_process,
                    )
                print(f"\n{w.name}")
                label = f"direct NBD client (1 thread, QD {w.qd})"
                print(f"  {label:<40} {base:>10.0f} IOPS {base * w.block / 2**20:>9.1f} MiB/s")
                for name, run in runs.items():
                    print(
                        f"  {name:<40} {run.rate:>10.0f} IOPS {run.rate * w.block / 2**20:>9.1f} MiB/s"
                        f"   engine CPU/request {run.engine_cpu_us:.1f} µs"
                    )
                over = runs["engine over NBD"].rate
                print(
                    f"  ratio engine over NBD / direct NBD client: {over / base:.2f};"
                    f" / engine on the local file: {over / runs['engine, local file'].rate:.2f}"
                )
        finally:
            transport.close()
            os.close(fd)
            server.send_signal(signal.SIGTERM)
            server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
