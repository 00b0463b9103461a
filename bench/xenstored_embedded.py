"""Round trips against the embedded xenstored, with an AF_UNIX echo server as same-run baseline.

    .venv/bin/python -m bench.xenstored_embedded [--iterations 2000] [--socket PATH]

Starts `xenblockctl xenstored` in a subprocess (or measures the daemon already listening on
--socket PATH, e.g. the real C xenstored, for a side-by-side run) and times, per operation:
a READ round trip and a transaction of 3 writes (start + 3 WRITE + commit = 5 round trips),
each over a raw socket (a 16-byte header per message, no client library) and through pyxs 0.4.1.
The baseline is a Python echo server on a unix socket: the floor any Python daemon pays for one
round trip (two context switches, recv + send on each side).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import pyxs

from bench.common import measure, percentile, row
from tests.fixtures.xenstore import embedded_xenstored
from xenblockctl.xenstore import wire

READ, TX_START, TX_END, WRITE = wire.READ, wire.TRANSACTION_START, wire.TRANSACTION_END, wire.WRITE
HEADER = wire.HEADER

ECHO_SERVER = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1]); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    while True:
        data = c.recv(65536)
        if not data:
            break
        c.sendall(data)
    """
)


class Raw:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.req = 0

    def call(self, msg_type: int, payload: bytes, tx_id: int = 0) -> bytes:
        self.req += 1
        self.sock.sendall(wire.encode(msg_type, self.req, tx_id, payload))
        buf = b""
        while True:
            while len(buf) < HEADER.size:
                buf += self.sock.recv(65536)
            rtype, _req, _tx, length = HEADER.unpack_from(buf)
            while len(buf) < HEADER.size + length:
                buf += self.sock.recv(65536)
            payload = buf[HEADER.size : HEADER.size + length]
            buf = buf[HEADER.size + length :]
            if rtype != wire.WATCH_EVENT:
                return payload


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--socket", help="measure the daemon already listening here instead")
    args = parser.parse_args()
    n = args.iterations
    with tempfile.TemporaryDirectory(prefix="xsd-bench-", dir="/tmp") as tmp:
        echo_path = os.path.join(tmp, "echo")
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, echo_path], stdout=subprocess.PIPE)
        assert echo.stdout is not None
        echo.stdout.readline()
        stack = contextlib.ExitStack()
        path = args.socket
        if path is None:
            path = stack.enter_context(embedded_xenstored()).socket_path
        try:
            e = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            e.connect(echo_path)
            message = HEADER.pack(READ, 1, 0, 12) + b"/bench/key\0\0"

            def echo_round_trip() -> None:
                e.sendall(message)
                got = 0
                while got < len(message):
                    got += len(e.recv(65536))

            raw = Raw(path)
            raw.call(WRITE, b"/bench/key\0value")

            def raw_read() -> None:
                raw.call(READ, b"/bench/key\0")

            def raw_transaction() -> None:
                tx = int(raw.call(TX_START, b"\0").rstrip(b"\0"))
                for i in range(3):
                    raw.call(WRITE, f"/bench/tx/k{i}\0v".encode(), tx)
                assert raw.call(TX_END, b"T\0", tx) == b"OK\0"

            results = [
                ("baseline: AF_UNIX echo round trip", measure(echo_round_trip, n)),
                ("raw socket READ", measure(raw_read, n)),
                ("raw socket transaction + 3 writes", measure(raw_transaction, n // 4)),
            ]
            with pyxs.Client(unix_socket_path=path) as client:

                def pyxs_read() -> None:
                    client.read(b"/bench/key")

                def pyxs_transaction() -> None:
                    client.transaction()
                    for i in range(3):
                        client.write(f"/bench/tx/k{i}".encode(), b"v")
                    assert client.commit()

                results.append(("pyxs read", measure(pyxs_read, n)))
                results.append(("pyxs transaction + 3 writes", measure(pyxs_transaction, n // 4)))
            e.close()
            raw.sock.close()
        finally:
            echo.terminate()
            echo.wait()
            stack.close()
    target = "embedded xenstored" if args.socket is None else f"daemon at {args.socket}"
    print(f"{target}, {n} iterations (transactions: {n // 4})")
    for name, samples in results:
        print(row(name, samples))
    base = percentile(results[0][1], 50)
    print(f"raw READ p50 / echo p50 = {percentile(results[1][1], 50) / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
