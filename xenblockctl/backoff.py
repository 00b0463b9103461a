"""Jitter for retry backoffs, never waiting for the kernel's random pool.

`os.urandom` is getrandom(2) without flags: it blocks until the kernel's CRNG is initialised. A
fresh driver domain under emulation can run for minutes without that (no hardware RNG, few
interrupts), and two of its adds racing for a loop device or a xenstore transaction slept in it
until libxl killed both at 40 s (scenario 21: stop 37's CI and lane21a, session 21; that driver
domain's pool never initialised, entropy_avail 2-6 through 100 s of uptime). A backoff
needs decorrelation, not secrecy: the pool's bytes when it is ready, else the clock's low bits
mixed with the pid (two racers are two processes, whose clocks are read apart).

posix and time, not os and random: this is on the block script's path (bench/README.md, issue 18)."""

from __future__ import annotations

import posix
import time

#: Fibonacci hashing's multiplier: spreads consecutive pids over the 16 bits kept
_MIX = 0x9E3779B1


def fraction() -> float:
    """A number in [0, 1) to scale a backoff's pause by; never blocks."""
    try:
        bits = int.from_bytes(posix.getrandom(2, posix.GRND_NONBLOCK), "little")
    except BlockingIOError:  # the pool is not initialised yet (EAGAIN)
        bits = (time.monotonic_ns() ^ (posix.getpid() * _MIX)) >> 3 & 0xFFFF
    return bits / 65536
