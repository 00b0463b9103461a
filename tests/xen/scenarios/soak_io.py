"""Data-integrity soak of one block device with O_DIRECT (run in dom0 by scenario 16; not a scenario).

Every 512-byte sector this writes carries its own address and a generation number, so a read can tell
a lost write (older generation), a misdirected one (another address), a torn one (mixed bytes) and
stale data after a discard apart. The program keeps the expected generation of every sector and checks
each read against it:

- phase A: THREADS workers, each in its own slice of the disk, run a random mix -- writes and reads of
  512 B to 1 MiB at 512-byte (not page) aligned offsets from buffers that are 512-byte but not always page
  aligned, requests over 11 segments (44 KiB: indirect descriptors), fsync/fdatasync, BLKDISCARD --
  concurrently, so the ring holds several requests at once;
- every few rounds a buffered write burst (like mkfs's: writeback puts many large requests on the ring
  at once), fsync, read back directly;
- phase B: all workers write overlapping ranges of one window at once (the same sectors in flight from
  several requests); afterwards every sector must hold exactly one of the generations written to it (or
  the one before when no writer covered it), whole, and that becomes the expected state;
- a final pass reads the whole disk and checks every sector.

Across a frontend reconnect (scenario 16 runs it in two halves): --save-state writes what every sector
must hold (the generations, the run id and the seed the sector contents derive from) and --resume reads
it back, reads the whole disk and checks every sector against it before the mix goes on, so a write the
first half was told had landed but the reconnect lost (or a stale cache, or a sector served from the wrong
place) is a mismatch.

Prints one JSON line (MiB written/read, errors, mismatches, counts) and exits 0 only with zero errors and
zero mismatches over at least --min-total-mib.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import random
import struct
import sys
import threading
import time
from array import array
from typing import Any

SECTOR = 512
MAX_SECTORS = 2048  # 1 MiB
BLKDISCARD = 0x1277
BLKGETSIZE64 = 0x80081272
HEADER = struct.Struct("<4sQII")  # magic, lba, generation, run id
MAGIC = b"SOAK"
#: the top bit marks a discarded sector; the low bits keep the generation it had before
DISCARDED = 0x80000000
ZERO = bytes(SECTOR)


class Soak:
    def __init__(self, fd: int, sectors: int, run_id: int, seed: int) -> None:
        self.fd = fd
        self.sectors = sectors
        self.run_id = run_id
        self.seed = seed  # the sector contents derive from it (and run_id)
        self.gens = array("I", bytes(4 * sectors))  # 0: never written, reads as zeros
        self.next_gen = 1
        self.lock = threading.Lock()
        rnd = random.Random(seed)
        self.fill = [rnd.randbytes(SECTOR - HEADER.size) for _ in range(64)]
        names = "written_bytes read_bytes writes reads fsyncs fdatasyncs discards discarded_bytes"
        names += " indirect_sized unaligned_page overlap_rounds overlap_sectors bursts errors mismatches"
        names += " resume_verified_bytes"
        self.stats: dict[str, int] = dict.fromkeys(names.split(), 0)
        self.problems: list[str] = []

    # -- bookkeeping ---------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def problem(self, key: str, text: str) -> None:
        with self.lock:
            self.stats[key] += 1
            if len(self.problems) >= 20:
                return
            self.problems.append(text)
        print(f"SOAK {key}: {text}", file=sys.stderr, flush=True)

    def gen(self) -> int:
        with self.lock:
            g = self.next_gen
            self.next_gen += 1
            return g

    def sector_bytes(self, lba: int, gen: int) -> bytes:
        if gen == 0:
            return ZERO
        return HEADER.pack(MAGIC, lba, gen, self.run_id) + self.fill[gen % 64]

    def acceptable(self, lba: int, state: int) -> tuple[bytes, ...]:
        if state & DISCARDED:
            # Discard need not zero (the spec promises nothing); it may keep the old data or zero it.
            return (ZERO, self.sector_bytes(lba, state & ~DISCARDED))
        return (self.sector_bytes(lba, state),)

    # -- I/O -----------------------------------------------------------------------------------
    def write(self, buf: mmap.mmap, lba: int, n: int, gen: int, boff: int) -> bool:
        data = b"".join(self.sector_bytes(lba + i, gen) for i in range(n))
        buf[boff : boff + len(data)] = data
        try:
            done = os.pwrite(self.fd, memoryview(buf)[boff : boff + len(data)], lba * SECTOR)
        except OSError as exc:
            self.problem("errors", f"write lba {lba} n {n}: {exc}")
            return False
        if done != len(data):
            self.problem("errors", f"short write lba {lba} n {n}: {done} bytes")
            return False
        self.count("written_bytes", len(data))
        self.count("writes")
        return True

    def read(self, buf: mmap.mmap, lba: int, n: int, boff: int) -> bytes | None:
        size = n * SECTOR
        try:
            got = os.preadv(self.fd, [memoryview(buf)[boff : boff + size]], lba * SECTOR)
        except OSError as exc:
            self.problem("errors", f"read lba {lba} n {n}: {exc}")
            return None
        if got != size:
            self.problem("errors", f"short read lba {lba} n {n}: {got} bytes")
            return None
        self.count("read_bytes", size)
        self.count("reads")
        return bytes(buf[boff : boff + size])

    def verify(self, data: bytes, lba: int, n: int, where: str) -> None:
        gens = self.gens
        expected = b"".join(self.acceptable(lba + i, gens[lba + i])[0] for i in range(n))
        if data == expected:
            return
        bad = 0
        for i in range(n):
            got = data[i * SECTOR : (i + 1) * SECTOR]
            if got not in self.acceptable(lba + i, gens[lba + i]):
                bad += 1
                if bad == 1:
                    self.problem("mismatches", f"{where}: sector {lba + i}: {self.describe(got, lba + i)}")
        if bad:
            with self.lock:
                self.stats["mismatches"] += bad - 1

    def describe(self, got: bytes, lba: int) -> str:
        want = self.gens[lba]
        if got == ZERO:
            return f"zeros, expected generation {want:#x}"
        magic, at, gen, run = HEADER.unpack_from(got)
        if magic != MAGIC:
            return f"foreign bytes {got[:16].hex()}, expected generation {want:#x}"
        return f"holds lba {at} generation {gen:#x} run {run:#x}, expected generation {want:#x}"

    def flush(self, data_only: bool) -> None:
        try:
            (os.fdatasync if data_only else os.fsync)(self.fd)
        except OSError as exc:
            self.problem("errors", f"{'fdatasync' if data_only else 'fsync'}: {exc}")
            return
        self.count("fdatasyncs" if data_only else "fsyncs")

    def discard(self, lba: int, n: int) -> None:
        try:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", lba * SECTOR, n * SECTOR))
        except OSError as exc:
            self.problem("errors", f"discard lba {lba} n {n}: {exc}")
            return
        for i in range(lba, lba + n):
            if not self.gens[i] & DISCARDED:
                self.gens[i] = self.gens[i] | DISCARDED
        self.count("discards")
        self.count("discarded_bytes", n * SECTOR)

    # -- across a reconnect ----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """What every sector must hold: one JSON line, then the generations (native uint32s)."""
        head = {"seed": self.seed, "run_id": self.run_id, "next_gen": self.next_gen, "sectors": self.sectors}
        with open(path, "wb") as f:
            f.write(json.dumps(head).encode() + b"\n")
            self.gens.tofile(f)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def load(path: str) -> tuple[dict[str, int], array[int]]:
        with open(path, "rb") as f:
            head = json.loads(f.readline())
            gens = array("I")
            gens.frombytes(f.read())
        if len(gens) != head["sectors"]:
            raise SystemExit(f"{path}: {len(gens)} generations for {head['sectors']} sectors")
        return head, gens

    def verify_all(self, buf: mmap.mmap, where: str) -> None:
        """Read the whole disk and check every sector against the expected state."""
        for lba in range(0, self.sectors, MAX_SECTORS):
            n = min(MAX_SECTORS, self.sectors - lba)
            data = self.read(buf, lba, n, 0)
            if data is not None:
                self.verify(data, lba, n, where)
                if where == "after reconnect":
                    self.count("resume_verified_bytes", n * SECTOR)

    # -- phases --------------------------------------------------------------------------------
    @staticmethod
    def size(rnd: random.Random, limit: int) -> int:
        kind = rnd.random()
        if kind < 0.3:
            n = rnd.randint(1, 8)
        elif kind < 0.7:
            n = rnd.randint(9, 255)  # 88 (> 44 KiB, 11 segments) and up need indirect descriptors
        else:
            n = rnd.randint(256, MAX_SECTORS)
        return max(1, min(n, limit))

    def worker(
        self, rnd: random.Random, span: tuple[int, int], *, ops: int, buf: mmap.mmap, discard: bool
    ) -> None:
        start, end = span
        for _ in range(ops):
            op = rnd.random()
            n = self.size(rnd, end - start)
            lba = rnd.randint(start, end - n)
            # Sector-aligned, not page-aligned: both the disk offset and (half the time) the buffer.
            boff = rnd.choice((0, SECTOR, 7 * SECTOR))
            if lba % 8 or boff:
                self.count("unaligned_page")
            if n * SECTOR > 11 * 4096:
                self.count("indirect_sized")
            if op < 0.55:
                gen = self.gen()
                if self.write(buf, lba, n, gen, boff):
                    for i in range(lba, lba + n):
                        self.gens[i] = gen
            elif op < 0.90:
                data = self.read(buf, lba, n, boff)
                if data is not None:
                    self.verify(data, lba, n, "read")
            elif op < 0.94:
                self.flush(data_only=False)
            elif op < 0.97 or not discard:
                self.flush(data_only=True)
            else:
                self.discard(lba, n)

    def overlap_round(self, rnd: random.Random, bufs: list[mmap.mmap], window: int) -> None:
        base = rnd.randint(0, self.sectors - window)
        plans = []
        for _ in bufs:
            n = rnd.randint(1, min(window, MAX_SECTORS))
            plans.append((base + rnd.randint(0, window - n), n, self.gen(), rnd.choice((0, SECTOR))))
        go = threading.Barrier(len(bufs))
        ok = [False] * len(bufs)

        def one(k: int) -> None:
            lba, n, gen, boff = plans[k]
            go.wait()
            ok[k] = self.write(bufs[k], lba, n, gen, boff)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(bufs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # The deterministic pass: each sector holds exactly one of the generations written to it.
        chunks = [
            self.read(bufs[0], lba, min(MAX_SECTORS, base + window - lba), 0)
            for lba in range(base, base + window, MAX_SECTORS)
        ]
        if any(c is None for c in chunks):
            return
        data = b"".join(c for c in chunks if c is not None)
        self.count("overlap_rounds")
        for i in range(window):
            lba = base + i
            got = data[i * SECTOR : (i + 1) * SECTOR]
            writers = [g for (s, n, g, _), good in zip(plans, ok, strict=True) if good and s <= lba < s + n]
            if len(writers) > 1:
                self.count("overlap_sectors")
            if writers:
                match = next((g for g in writers if got == self.sector_bytes(lba, g)), None)
            else:
                match = self.gens[lba] if got in self.acceptable(lba, self.gens[lba]) else None
            if match is None:
                seen = self.describe(got, lba)
                self.problem("mismatches", f"overlap: sector {lba}: {seen}, writers {writers}")
                continue
            self.gens[lba] = match

    def burst(self, rnd: random.Random, device: str, mib: int, buf: mmap.mmap) -> None:
        """A write burst like mkfs's: buffered writes, so writeback puts many large requests on the ring at
        once (the load that ran the engine out of file descriptors), then fsync and a direct read-back."""
        n = min(mib << 11, self.sectors)
        lba = rnd.randint(0, (self.sectors - n) // 8) * 8
        gen = self.gen()
        try:
            fd = os.open(device, os.O_WRONLY)
        except OSError as exc:
            self.problem("errors", f"burst: open {device}: {exc}")
            return
        try:
            for at in range(lba, lba + n, MAX_SECTORS):
                k = min(MAX_SECTORS, lba + n - at)
                data = b"".join(self.sector_bytes(at + i, gen) for i in range(k))
                os.pwrite(fd, data, at * SECTOR)
            os.fsync(fd)
        except OSError as exc:
            self.problem("errors", f"burst at lba {lba} ({mib} MiB): {exc}")
            # Part of the burst may have landed: each sector may hold the old or the new data (the error is
            # counted; only other contents are mismatches), and what it holds is expected from now on.
            self.adopt(buf, lba, n, gen)
            return
        finally:
            os.close(fd)
        for i in range(lba, lba + n):
            self.gens[i] = gen
        self.count("written_bytes", n * SECTOR)
        self.count("bursts")
        for at in range(lba, lba + n, MAX_SECTORS):
            k = min(MAX_SECTORS, lba + n - at)
            back = self.read(buf, at, k, 0)
            if back is not None:
                self.verify(back, at, k, "burst read-back")

    def adopt(self, buf: mmap.mmap, lba: int, n: int, gen: int) -> None:
        for at in range(lba, lba + n, MAX_SECTORS):
            k = min(MAX_SECTORS, lba + n - at)
            data = self.read(buf, at, k, 0)
            if data is None:
                continue
            for i in range(k):
                got = data[i * SECTOR : (i + 1) * SECTOR]
                if got == self.sector_bytes(at + i, gen):
                    self.gens[at + i] = gen
                elif got not in self.acceptable(at + i, self.gens[at + i]):
                    self.problem(
                        "mismatches", f"after a failed burst: sector {at + i}: {self.describe(got, at + i)}"
                    )

    def final_pass(self, buf: mmap.mmap) -> None:
        self.verify_all(buf, "final pass")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("device")
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument(
        "--burst-mib", type=int, default=32, help="a buffered write burst every --burst-every rounds"
    )
    ap.add_argument("--burst-every", type=int, default=5)
    ap.add_argument("--min-total-mib", type=int, default=1024, help="written + read-verified, at least")
    ap.add_argument("--min-write-mib", type=int, default=512)
    ap.add_argument("--ops-per-round", type=int, default=24)
    ap.add_argument("--window-sectors", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-discard", action="store_true")
    ap.add_argument("--no-final-pass", action="store_true", help="(a first half: --resume checks it all)")
    ap.add_argument("--save-state", metavar="PATH", help="at the end, write what every sector must hold")
    ap.add_argument(
        "--resume", metavar="PATH", help="first check every sector against a --save-state file, then go on"
    )
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rnd = random.Random(seed)
    fd = os.open(args.device, os.O_RDWR | os.O_DIRECT)
    start = time.monotonic()
    try:
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
        bufs = [mmap.mmap(-1, MAX_SECTORS * SECTOR + 8 * SECTOR) for _ in range(args.threads)]
        if args.resume:
            head, gens = Soak.load(args.resume)
            if head["sectors"] != size // SECTOR:
                raise SystemExit(
                    f"{args.device}: {size // SECTOR} sectors, the saved state has {head['sectors']}"
                )
            # Sector contents derive from the first half's seed and run id; the mix gets a new seed.
            soak = Soak(fd, size // SECTOR, head["run_id"], head["seed"])
            soak.gens = gens
            soak.next_gen = head["next_gen"]
            soak.verify_all(bufs[0], "after reconnect")
        else:
            soak = Soak(fd, size // SECTOR, rnd.getrandbits(32), seed)
        slice_ = soak.sectors // args.threads
        rounds = 0
        while True:
            st = soak.stats
            total = st["written_bytes"] + st["read_bytes"]
            if total >= args.min_total_mib << 20 and st["written_bytes"] >= args.min_write_mib << 20:
                break
            seeds = [rnd.getrandbits(64) for _ in range(args.threads)]
            threads = [
                threading.Thread(
                    target=soak.worker,
                    args=(random.Random(seeds[k]), (k * slice_, (k + 1) * slice_)),
                    kwargs={"ops": args.ops_per_round, "buf": bufs[k], "discard": not args.no_discard},
                )
                for k in range(args.threads)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            soak.overlap_round(rnd, bufs, args.window_sectors)
            if args.burst_mib and rounds % args.burst_every == 0:
                soak.burst(rnd, args.device, args.burst_mib, bufs[0])
            rounds += 1
            if rounds % 10 == 0:
                print(
                    f"SOAK progress: round {rounds}, {st['written_bytes'] >> 20} MiB written, "
                    f"{st['read_bytes'] >> 20} MiB read, {st['errors']} errors, "
                    f"{st['mismatches']} mismatches, "
                    f"{time.monotonic() - start:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
        soak.flush(data_only=False)
        if not args.no_final_pass:
            soak.final_pass(bufs[0])
        if args.save_state:
            soak.save(args.save_state)
    finally:
        os.close(fd)
    st = soak.stats
    result: dict[str, Any] = {
        "seed": seed,
        "seconds": round(time.monotonic() - start, 1),
        "rounds": rounds,
        "written_mib": round(st["written_bytes"] / 2**20, 1),
        "read_mib": round(st["read_bytes"] / 2**20, 1),
        **{k: v for k, v in st.items() if not k.endswith("_bytes")},
        "discarded_mib": round(st["discarded_bytes"] / 2**20, 1),
        "resumed": bool(args.resume),
        "resume_verified_mib": round(st["resume_verified_bytes"] / 2**20, 1),
        "problems": soak.problems,
    }
    print(json.dumps(result), flush=True)
    return 0 if st["errors"] == 0 and st["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
