#!/usr/bin/env bash
# Issue 7, timings: the same disk through kernel blkback and through the bundled engine (Xen transport),
# in the same boot, read and written by dom0's blkfront with direct I/O. Reported, not asserted: under
# QEMU TCG absolute numbers are small; the ratio engine/blkback is what to compare. The data written
# through each path is checked, so a fast wrong answer fails.
# The engine's rows run on the native fast path where the package has it (`engine_*`), with its
# default buffered writes and with --direct-writes --direct-reads (`engine_direct_*`, O_DIRECT both
# ways, adjacent requests of a pass merged: issue 20, helper xenwrite), in alternating rounds with
# blkback's: the reported rates are each path's median over the rounds (XENCI_BENCH_ROUNDS, default
# 3). Direct writes on the I/O threads (`engine_pool_*`), the pure-Python ring pass
# (`engine_python_*`, issue 20), grant copy, --workers 2 and --ring-groups run once.
# Two jobs (lib.sh's full_lane). A check run (CI) writes a fresh pattern through every path and row
# once and reads it back (1 MiB and 4 KiB direct reads): each engine variant serves real blkfront and
# keeps the data; those I/Os' rates and ratios to blkback are reported (one round). A full run
# (XENBLOCKCTL_XEN_LANE=full) also runs the rounds, the probes and every rate and ratio above: 1011 s
# alone on a quiet but slow host (2026-12-06), past 1200 s loaded, which took CI's lane past its hour
# (stop 37).
# xenci-timeout: 600
# xenci-full-timeout: 1800
. "$XENCI_SCENARIOS/lib.sh"

need_script
xenblockctl backend --help >/dev/null 2>&1 || skip "xenblockctl has no backend command yet"
trap engine_restore EXIT
XENCI_ON_FAIL=dump_vbd

img=$XENCI_WORK/bench.img
make_image "$img"
src=$XENCI_WORK/pattern
head -c 32M /dev/urandom > "$src"
want=$(md5sum < "$src")

# rate LABEL BYTES COMMAND...: run COMMAND, report BYTES/elapsed as MiB/s (kept in $rates for ratios).
declare -A rates=()
rate() {
  local label=$1 bytes=$2 t s
  shift 2
  t=$(now)
  "$@" || fail "$label: $* failed"
  s=$(elapsed "$t")
  rates[$label]=$(awk -v b="$bytes" -v s="$s" 'BEGIN { printf "%.1f", b / 1048576 / s }')
  metric "${label}_MiBps" "${rates[$label]}" MiB/s
}
WORKLOADS="write_1M_nofsync write_1M_nofsync_uncached seq_write_1M seq_read_1M seq_read_4k"
# ratios PATH [BLKBACK [WORKLOADS]]: PATH / kernel blkback (rates[BLKBACK_*], default its medians) for
# each workload of one measure() (or WORKLOADS) (issue 20: reported, not asserted).
ratios() {
  local w base=${2:-blkback}
  for w in ${3:-$WORKLOADS}; do
    metric "${1}_over_blkback_${w}" "$(awk -v a="${rates[${1}_$w]:-0}" -v b="${rates[${base}_$w]:-0}" \
      'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
  done
}

# cpu_ticks: "all BUSY IDLE" for dom0 (clock ticks over every CPU; iowait counts as idle), then
# "TID TICKS" per thread of the engine if one runs (TID = $engine_pid is its main thread).
cpu_ticks() {
  awk '/^cpu / { print "all", $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat
  local f
  [ -n "$engine_pid" ] || return 0
  for f in /proc/"$engine_pid"/task/*/stat; do
    [ -r "$f" ] || continue
    # past "pid (comm) ", utime and stime are fields 12 and 13
    sed 's/^.*) //' "$f" | awk -v tid="$(basename "$(dirname "$f")")" '{ print tid, $12 + $13 }'
  done
}
# cpu_report LABEL BEFORE AFTER: where the CPU went between two cpu_ticks (issue 20: is the write
# path CPU-bound, and on which engine thread, or waiting?).
cpu_report() {
  awk -v label="$1" -v main="$engine_pid" -v hz="$(getconf CLK_TCK)" '
    NR == FNR { before[$1] = $2; if ($1 == "all") idle0 = $3; next }
    $1 == "all" { busy = $2 - before["all"]; idle = $3 - idle0; next }
    { d = $2 - before[$1]; if (d > 0) threads = threads sprintf(" %s%s=%.2fs", $1, $1 == main ? "(main)" : "", d / hz) }
    END { printf "%s: dom0 CPUs %.0f%% busy (%.2f s busy, %.2f s idle); engine threads:%s\n", label, 100 * busy / (busy + idle), busy / hz, idle / hz, threads ? threads : " none" }
  ' "$2" "$3"
}

# blkstat DEV: "WRITE_IOS WRITE_SECTORS WRITE_TICKS_MS" of /sys/block/DEV/stat (issue 20, helper
# xenwrite: what blkfront sends and what reaches the loop device, without tracing anything).
blkstat() { awk '{ print $5, $7, $8 }' "/sys/block/$1/stat"; }
# io_shape LABEL BEFORE AFTER SECONDS: the write requests between two blkstat lines: how many, their
# mean size, and the mean number in flight (Little's law: the requests' summed ticks / the wall time).
io_shape() {
  echo "$2 $3" | awk -v label="$1" -v s="$4" '{
    n = $4 - $1; kib = ($5 - $2) / 2; ms = $6 - $3
    printf "%s: %d write requests, %.0f KiB each, %.2f ms each, %.2f in flight\n", label, n,
      n ? kib / n : 0, n ? ms / n : 0, (s > 0 ? ms / 1000 / s : 0) }'
}

# vmpages: "DIRTIED WRITTEN ALLOCATED" pages so far (/proc/vmstat; issue 20, helper wcold20: does a cold
# write cost page-cache pages the same write again does not?)
vmpages() { awk '$1 == "nr_dirtied" { d = $2 } $1 == "nr_written" { w = $2 } $1 ~ /^pgalloc_/ { a += $2 }
  END { print d, w, a }' /proc/vmstat; }
# vm_delta LABEL BEFORE AFTER: pages dirtied, written back and allocated between two vmpages lines.
vm_delta() {
  echo "$2 $3" | awk -v label="$1" '{ printf "%s: %d pages dirtied, %d written back, %d allocated\n",
    label, $4 - $1, $5 - $2, $6 - $3 }'
}

# measure()'s 1 MiB writes once more as row `${label}_write_1M_nofsync_$1`, with the CPU and the
# pages they take around them (`$2`: what is different this time). Called from measure(): its
# label, src and dev.
counted_write() {
  local vm0 vm1
  cpu_ticks > "$XENCI_WORK/cpu.before"
  vm0=$(vmpages)
  rate "${label}_write_1M_nofsync_$1" $((32 << 20)) dd if="$src" of="$dev" bs=1M count=32 seek=8 oflag=direct status=none
  vm1=$(vmpages)
  cpu_ticks > "$XENCI_WORK/cpu.after"
  cpu_report "$label the same writes, $2" "$XENCI_WORK/cpu.before" "$XENCI_WORK/cpu.after"
  vm_delta "$label pages during the same writes, $2" "$vm0" "$vm1"
}

# measure LABEL: the three workloads through /dev/xvdb, then check what the write left there.
measure() {
  local label=$1 dev=/dev/xvdb t loop fe0 fe1 lo0 lo1 lo2 s vm0 vm1
  loop=$(loops_of "$img" | head -n 1)
  loop=${loop#/dev/}
  # The 1 MiB write split in two (issue 20: where does the write path's time go?): the same writes
  # without the final fsync, then that fsync alone (a blkif flush; the engine's fdatasync writes
  # back what its buffered pwritev left in the device's page cache).
  cpu_ticks > "$XENCI_WORK/cpu.before"
  vm0=$(vmpages); fe0=$(blkstat xvdb); lo0=$(blkstat "$loop"); t=$(now)
  rate "${label}_write_1M_nofsync" $((32 << 20)) dd if="$src" of="$dev" bs=1M count=32 seek=8 oflag=direct status=none
  s=$(elapsed "$t"); fe1=$(blkstat xvdb); lo1=$(blkstat "$loop"); vm1=$(vmpages)
  cpu_ticks > "$XENCI_WORK/cpu.after"
  cpu_report "$label 1 MiB writes" "$XENCI_WORK/cpu.before" "$XENCI_WORK/cpu.after"
  vm_delta "$label pages during the 1 MiB writes" "$vm0" "$vm1"
  t=$(now)
  python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); os.fsync(fd); os.close(fd)' "$dev" \
    || fail "$label: fsync of $dev failed"
  metric "${label}_flush_after_write_s" "$(elapsed "$t")" s
  lo2=$(blkstat "$loop")
  io_shape "$label shape: xvdb (blkfront) during the 1 MiB writes" "$fe0" "$fe1" "$s"
  io_shape "$label shape: $loop during the 1 MiB writes" "$lo0" "$lo1" "$s"
  io_shape "$label shape: $loop during the fsync after them" "$lo1" "$lo2" "$(elapsed "$t")"
  # the same writes again, not a workload of the medians (issue 20, helper xenwrite: is the first
  # row slow for the engine because it is the first I/O after attach, or because of no fsync?)
  cpu_ticks > "$XENCI_WORK/cpu.before"
  vm0=$(vmpages); fe0=$(blkstat xvdb); t=$(now)
  rate "${label}_write_1M_nofsync_again" $((32 << 20)) dd if="$src" of="$dev" bs=1M count=32 seek=8 oflag=direct status=none
  fe1=$(blkstat xvdb); vm1=$(vmpages)
  io_shape "$label shape: xvdb (blkfront) during the same writes again" "$fe0" "$fe1" "$(elapsed "$t")"
  cpu_ticks > "$XENCI_WORK/cpu.after"
  cpu_report "$label the same writes again" "$XENCI_WORK/cpu.before" "$XENCI_WORK/cpu.after"
  vm_delta "$label pages during the same writes again" "$vm0" "$vm1"
  # the same writes a third time with the loop device's page cache emptied (BLKFLSBUF: written back,
  # then dropped) and the grants still mapped (issue 20, helper wcold20: of the cold write's extra
  # time, what is the engine's first grant maps and what is filling an empty page cache? kernel
  # blkback writes into the backing file's cache, which this leaves alone)
  blockdev --flushbufs "/dev/$loop" || fail "$label: blockdev --flushbufs /dev/$loop failed"
  counted_write dropped "page cache dropped"
  # and once more with no page cached anywhere, for every path alike (issue 20, helper wcold20): in
  # rounds 2 and 3 kernel blkback's first write rewrites pages of the backing file that the rounds
  # before left in its page cache, while the engine's buffered writes fill the loop device's own
  # cache, which each attach starts empty. So: everything synced and dropped, then the write.
  sync
  echo 3 > /proc/sys/vm/drop_caches
  # what the write reads back into the cache first, outside the clock: the source pattern and dd
  # itself (the first boot of this row timed their reads from dom0's disk: 11-24 MiB/s either way)
  dd if="$src" of=/dev/null bs=1M status=none
  counted_write uncached "nothing cached"
  rate "${label}_seq_write_1M" $((32 << 20)) dd if="$src" of="$dev" bs=1M count=32 seek=8 oflag=direct conv=fsync status=none
  rate "${label}_seq_read_1M" $((32 << 20)) dd if="$dev" of=/dev/null bs=1M count=32 skip=8 iflag=direct status=none
  cpu_ticks > "$XENCI_WORK/cpu.before"
  # 2 MiB of 4 KiB reads (8 MiB before the rounds: 512 round trips are plenty for a rate)
  rate "${label}_seq_read_4k" $((2 << 20)) dd if="$dev" of=/dev/null bs=4k count=512 skip=2048 iflag=direct status=none
  cpu_ticks > "$XENCI_WORK/cpu.after"
  cpu_report "$label 4 KiB reads" "$XENCI_WORK/cpu.before" "$XENCI_WORK/cpu.after"
  [ "$(dd if="$dev" bs=1M count=32 skip=8 iflag=direct status=none | md5sum)" = "$want" ] \
    || fail "$label: data read back through $dev differs from what was written"
}

# verify LABEL: a check run's workload: a fresh 32 MiB pattern (so a row that wrote nothing cannot pass
# on the row before it) written through /dev/xvdb with 1 MiB O_DIRECT writes and a flush, read back
# with 1 MiB direct reads, then its first 4 MiB with 4 KiB reads (one segment per request). Each is
# timed as it runs anyway: one round's rates and ratios to blkback's, not the medians.
CHECKS="write_1M_fsync read_1M read_4k"
verify() {
  local dev=/dev/xvdb pat=$XENCI_WORK/verify.pattern sums=$XENCI_WORK/readback.md5
  head -c 32M /dev/urandom > "$pat"
  rate "${1}_write_1M_fsync" $((32 << 20)) dd if="$pat" of="$dev" bs=1M count=32 seek=8 oflag=direct conv=fsync status=none
  rate "${1}_read_1M" $((32 << 20)) readback "$dev" 1M 32 8 "$sums"
  [ "$(cat "$sums")" = "$(md5sum < "$pat")" ] \
    || fail "$1: data read back through $dev (1 MiB reads) differs from what was written"
  rate "${1}_read_4k" $((4 << 20)) readback "$dev" 4k 1024 2048 "$sums"
  [ "$(cat "$sums")" = "$(head -c 4M "$pat" | md5sum)" ] \
    || fail "$1: data read back through $dev (4 KiB reads) differs from what was written"
  rm -f "$pat"
  say "$1: 32 MiB written and read back"
}
# readback DEV BS COUNT SKIP OUT: the md5 of COUNT direct reads of BS from DEV at SKIP, into OUT.
readback() { dd if="$1" bs="$2" count="$3" skip="$4" iflag=direct status=none | md5sum > "$5"; }

attach() {
  xl block-attach 0 "$(disk_spec xvdb rw "$img" "$script")" || fail "xl block-attach ($1) exited $?"
  wait_for /dev/xvdb 30 test -b /dev/xvdb
  # how many queues blkfront negotiated (issue 20): it writes the node only for 2 or more
  metric "${1}_queues" "$(xenstore-read /local/domain/0/device/vbd/51728/multi-queue-num-queues 2>/dev/null || echo 1)" queues
  # what the two sides negotiated and the request limits blkfront derived from it (issue 20, helper
  # xenwrite: does the guest send the engine what it sends kernel blkback?)
  local be=/local/domain/0/backend/vbd/0/51728 fe=/local/domain/0/device/vbd/51728 n line=
  for n in feature-max-indirect-segments max-ring-page-order feature-persistent feature-flush-cache \
    feature-barrier multi-queue-max-queues; do
    line+=" backend:$n=$(xenstore-read "$be/$n" 2>/dev/null || echo -)"
  done
  for n in ring-page-order feature-persistent; do
    line+=" frontend:$n=$(xenstore-read "$fe/$n" 2>/dev/null || xenstore-read "$fe/queue-0/$n" 2>/dev/null || echo -)"
  done
  for n in max_sectors_kb max_hw_sectors_kb max_segments nr_requests; do
    line+=" xvdb:$n=$(cat "/sys/block/xvdb/queue/$n")"
  done
  say "$1 negotiated:$line"
}
detach() {
  xl block-detach 0 xvdb || fail "xl block-detach ($1) exited $?"
  wait_for "/dev/xvdb to go" 30 test ! -e /dev/xvdb
  wait_for "no loop device bound ($1)" 30 no_loop_for "$img"
}

# The rows of one boot drift with the host's load (under TCG on a shared host the same path has
# swung 2-10x between boots, and within one boot a pair of rows cannot tell drift from the path):
# so the paths alternate, round after round (blkback, engine, engine --direct-writes, blkback,
# ...), and each workload's rate is the median of its rounds. Bounded: ROUNDS x 3 paths x ~30-65 s
# (a boot on a loaded host ran the whole scenario in 827 s before the 4 KiB row was halved again).
# A check run: one round, each row's data written and read back (verify), its rates once.
if full_lane; then
  ROUNDS=${XENCI_BENCH_ROUNDS:-3}
  workload=measure
else
  ROUNDS=1
  workload=verify
fi
# median PATH WORKLOAD: the median of PATH's rounds (rates[PATH_rN_WORKLOAD], N = 1..ROUNDS).
median() {
  local i
  for ((i = 1; i <= ROUNDS; i++)); do echo "${rates[${1}_r${i}_$2]:-0}"; done | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# medians PATH: report PATH's median per workload (kept in rates[PATH_WORKLOAD] for ratios).
medians() {
  local w
  for w in $WORKLOADS; do
    rates[${1}_$w]=$(median "$1" "$w")
    metric "${1}_${w}_MiBps" "${rates[${1}_$w]}" "MiB/s (median of $ROUNDS rounds)"
  done
}
# round_ratios PATH: PATH / blkback in each round (each pair measured minutes apart at most).
round_ratios() {
  local w i line
  for w in $WORKLOADS; do
    line=
    for ((i = 1; i <= ROUNDS; i++)); do
      line+=" $(awk -v a="${rates[${1}_r${i}_$w]:-0}" -v b="${rates[blkback_r${i}_$w]:-0}" \
        'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
    done
    say "$1 / blkback per round, $w:$line"
  done
}
# engine_says KEY WORDS: the engine log's last line with KEY says WORDS (what the engine ran on is
# logged at start, and a later start's line is the one that counts).
engine_says() { grep "$1" "$engine_log" | tail -n 1 | grep -q "$2"; }
# engine_row LABEL MEASURED CHECK [ENGINE_ARGS...]: one row through the engine, every engine row's
# shape in one place so the rows differ only in what they name: start the engine with ENGINE_ARGS,
# attach as LABEL, run measure's workloads as MEASURED, detach, run CHECK (a command: did the row run
# on what its options asked for?), stop the engine. A single row (MEASURED = LABEL, not a round of
# the medians) reports its ratios to blkback's medians before the detach, as it always has.
engine_row() {
  local label=$1 measured=$2 check=$3
  shift 3
  start_engine "$@"
  attach "$label"
  "$workload" "$measured"
  if ! full_lane; then
    ratios "$measured" blkback_r1 "$CHECKS"  # a check run's one round
  elif [ "$measured" = "$label" ]; then
    ratios "$label"
  fi
  detach "$label"
  "$check"
  stop_engine
}
# What each engine row checks in the log, after its detach.
ring_stopped() { say "$(grep 'ring stopped' "$engine_log" | tail -n 1)"; }  # requests per wake-up (issue 20)
check_default() {
  ring_stopped
  # Issue 20: which ring pass served the row (the .deb carries the native fast path), and
  # that its writes went through the page cache (the default)
  engine_says 'ring pass:' 'ring pass: native fast path' \
    || say "the native fast path did not load: engine rows are pure Python"
  engine_says 'writes to block devices:' buffered || fail "writes not buffered by default"
  # Issue 20 (helper file20): whether the row's I/O went to the loop device's backing file (the
  # default) or to the loop device itself, and why
  say "$(grep -E 'I/O on its backing file|serving the loop device itself' "$engine_log" | tail -n 1)"
}
check_direct() {
  ring_stopped
  engine_says 'writes to block devices:' 'reads O_DIRECT too' \
    || fail "--direct-writes --direct-reads was not honoured"
  if grep -q 'writes stay buffered' "$engine_log"; then say "$(grep -m1 'writes stay buffered' "$engine_log")"; fi
}
check_pool() {
  engine_says 'writes to block devices:' 'on the I/O pool' || fail "--direct-writes-on-pool was not honoured"
}
check_python() { engine_says 'ring pass:' 'turned off' || fail "--no-native was not honoured"; }
# Issue 20: ring groups on real Xen (opt-in today; the lane had never run them): the group's own
# start line, and that the ring was served by it (a refused --ring-groups is logged, not silent).
check_groups() {
  ring_stopped
  engine_says 'rings:' 'ring groups' || fail "--ring-groups started no ring group: $(grep -m1 'ring-groups ignored' "$engine_log")"
}
check_workers() {
  grep -E 'connected:|ring stopped|worker' "$engine_log" | tail -n 8 || true
  grep -q 'worker process(es) serve the queues' "$engine_log" || fail "--workers 2 started no worker"
}

# The probes of a full run (no engine, no blkfront: the costs under them).
probes() {
# Issue 20: what O_DIRECT costs in this dom0 by itself (no grants, no engine): 32 MiB of 1 MiB
# writes + fsync through a plain loop device, buffered and with O_DIRECT from an ordinary buffer,
# alternating, twice each (the first pass also allocates the sparse image's blocks).
probe_img=$XENCI_WORK/probe.img
truncate -s 64M "$probe_img"
probe_loop=$(losetup -f --show "$probe_img")
python3 - "$probe_loop" <<'EOF' || say "the O_DIRECT probe failed"
import mmap, os, sys, time
def busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
buf = mmap.mmap(-1, 1 << 20)
buf.write(os.urandom(1 << 20))
for rnd in (1, 2):
    for label, flags in (("buffered", 0), ("odirect", os.O_DIRECT)):
        fd = os.open(sys.argv[1], os.O_WRONLY | flags)
        c0, t0 = busy(), time.monotonic()
        for i in range(32):
            os.pwritev(fd, [buf], (8 + i) << 20)
        os.fsync(fd)
        t, c = time.monotonic() - t0, busy() - c0
        os.close(fd)
        print(f"XENCI-METRIC: probe_{label}_r{rnd}_write_1M_fsync_MiBps={32 / t:.1f} MiB/s")
        print(f"XENCI-METRIC: probe_{label}_r{rnd}_busy_cpu_s={c:.2f} s")
EOF
# Issue 20 (helper xenwrite): the same loop device written from dom0's own pages granted to itself
# (gntalloc) and mapped through the engine's XenTransport (gntdev), as the engine writes a guest's
# persistent grants, against an anonymous buffer: buffered and O_DIRECT, 128 KiB per pwritev (Linux
# blkfront's request size) one at a time, 1 MiB per pwritev (eight requests merged), and 128 KiB
# with 8 threads (8 in flight, as blkback submits a ring's bios); CPU time of the writing process
# and of dom0. 32 MiB each, then fsync (timed apart); once each (the probe above allocated the
# blocks: a loaded boot ran out of the scenario's 900 s with two rounds of this).
modprobe xen-gntalloc 2>/dev/null || true
python3 - "$probe_loop" <<'EOF' || say "the grant-mapped write probe failed"
import fcntl, mmap, os, struct, sys, threading, time
from xenblockctl.backend.transport.xen import XenTransport
PAGE, PAGES = 4096, 256
def busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
gfd = os.open("/dev/xen/gntalloc", os.O_RDWR | os.O_CLOEXEC)
arg = bytearray(struct.pack("=HHIQ", 0, 1, PAGES, 0) + bytes(4 * PAGES))
fcntl.ioctl(gfd, 0x00184705, arg, True)
index = struct.unpack_from("=Q", arg, 8)[0]
refs = list(struct.unpack_from(f"={PAGES}I", arg, 16))
shared = mmap.mmap(gfd, PAGES * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=index)
shared[:] = os.urandom(PAGES * PAGE)
transport = XenTransport()
mapping = transport.map_grants(0, refs, writable=False)
granted = mapping.iovecs()[0]
anon = mmap.mmap(-1, PAGES * PAGE)
anon[:] = shared[:]
anon_view = memoryview(anon)
CHUNK = 128 << 10
def serial(fd, buf):
    for at in range(0, 32 << 20, CHUNK):
        os.pwritev(fd, [buf[at % (1 << 20):][:CHUNK]], (8 << 20) + at)
def merged(fd, buf):
    for at in range(0, 32 << 20, 1 << 20):
        os.pwritev(fd, [buf[i:i + CHUNK] for i in range(0, 1 << 20, CHUNK)], (8 << 20) + at)
def threads8(fd, buf):
    def one(k):
        for at in range(k * CHUNK, 32 << 20, 8 * CHUNK):
            os.pwritev(fd, [buf[at % (1 << 20):][:CHUNK]], (8 << 20) + at)
    ts = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
cases = [
    ("buffered_anon_128k", 0, anon_view, serial),
    ("buffered_granted_128k", 0, granted, serial),
    ("direct_anon_128k", os.O_DIRECT, anon_view, serial),
    ("direct_granted_128k", os.O_DIRECT, granted, serial),
    ("direct_granted_1m_merged", os.O_DIRECT, granted, merged),
    ("direct_granted_128k_8threads", os.O_DIRECT, granted, threads8),
]
for label, flags, buf, how in cases:
    fd = os.open(sys.argv[1], os.O_WRONLY | flags)
    c0, p0, t0 = busy(), time.process_time(), time.monotonic()
    how(fd, buf)
    t1, p1 = time.monotonic(), time.process_time()
    os.fsync(fd)
    t2, c2 = time.monotonic(), busy()
    os.close(fd)
    print(f"XENCI-METRIC: gprobe_{label}_MiBps={32 / (t1 - t0):.1f} MiB/s")
    print(f"gprobe {label}: writes {32 / (t1 - t0):.1f} MiB/s ({t1 - t0:.3f} s, the writer's CPU"
          f" {p1 - p0:.3f} s), fsync {t2 - t1:.3f} s, with fsync {32 / (t2 - t0):.1f} MiB/s,"
          f" dom0 busy {c2 - c0:.2f} s")
granted.release()
mapping.unmap()
transport.close()
anon_view.release()
anon.close()
shared.close()
os.close(gfd)
EOF
say "dom0: $(grep MemTotal /proc/meminfo); $(sysctl vm.dirty_ratio vm.dirty_background_ratio vm.dirty_bytes vm.dirty_background_bytes vm.dirty_expire_centisecs 2>/dev/null | tr '\n' ' ')"
say "dom0: blkfront parameters: $(grep -H . /sys/module/xen_blkfront/parameters/* 2>/dev/null | sed 's|.*/||' | tr '\n' ' ')"
say "dom0: loop queue: $(cd "/sys/block/${probe_loop#/dev/}/queue" && grep -H . max_sectors_kb max_hw_sectors_kb max_segments nr_requests | tr '\n' ' ')"
losetup -d "$probe_loop"
rm -f "$probe_img"
}
if full_lane; then probes; fi

for ((round = 1; round <= ROUNDS; round++)); do
  say "round $round of $ROUNDS: kernel blkback (dom0 load: $(cut -d' ' -f1-3 /proc/loadavg))"
  modprobe xen-blkback || true
  attach blkback
  "$workload" "blkback_r$round"
  detach blkback
  say "round $round: the engine (Xen transport, its default ring pass), persistent grants offered"
  without_blkback
  engine_row engine "engine_r$round" check_default
  say "round $round: the engine with --direct-writes --direct-reads (O_DIRECT on a second fd of the device)"
  engine_row engine_direct "engine_direct_r$round" check_direct --direct-writes --direct-reads
done
if full_lane; then
  medians blkback
  medians engine
  medians engine_direct
  ratios engine
  ratios engine_direct
  round_ratios engine
  round_ratios engine_direct
fi

# One round each, against blkback's median (reported, fewer rounds: they are not the goal's rows).
say "the engine with --direct-writes --direct-writes-on-pool (O_DIRECT writes on the I/O threads unless alone)"
engine_row engine_pool engine_pool check_pool --direct-writes --direct-writes-on-pool
say "the engine on the pure-Python ring pass (--no-native), persistent grants"
engine_row engine_python engine_python check_python --no-native
say "the engine without persistent grants: each ring pass copies its requests' pages (gntdev grant copy)"
engine_row engine_nopg engine_nopg true --no-persistent-grants
say "the engine with --workers 2: each queue served by a worker process (issue 20)"
engine_row engine_workers engine_workers check_workers --workers 2
say "the engine with --ring-groups: one native loop on each of dom0's CPUs serves the rings (issue 20)"
engine_row engine_groups engine_groups check_groups --ring-groups
# what the rows above ran on, from every start's lines
grep -q 'connected: .*persistent grants' "$engine_log" || fail "blkfront never used persistent grants"
grep -q 'connected: .*grants copied per ring pass' "$engine_log" || fail "--no-persistent-grants was not honoured (or gntdev did not copy)"

# Where the engine's write time goes on real Xen (issue 20): the persistent-grant engine once more,
# every thread under cProfile (profile_threads.py), for the same 1 MiB writes. Not timed (the
# profiler slows what it measures); its top functions per thread group go to the log. Only with
# XENCI_PROFILE=1 (it costs an engine start and a slow write: the scenario's time is bounded).
if [ "${XENCI_PROFILE:-0}" = 1 ]; then
say "profile (not timed): the engine with persistent grants under cProfile, 1 MiB writes"
profile=$XENCI_WORK/engine.profile
ready_before=$(grep -c 'engine ready' "$engine_log" || true)
ready_after() { [ "$(grep -c 'engine ready' "$engine_log" || true)" -gt "$ready_before" ]; }
python3 "$XENCI_SCENARIOS/profile_threads.py" "$profile" backend --kind vbd --transport xen \
  > >(uptime_lines >>"$engine_log") 2>&1 &
engine_pid=$!
wait_for "the profiled engine to be ready" 120 ready_after
attach engine_profiled
dd if="$src" of=/dev/xvdb bs=1M count=32 seek=8 oflag=direct status=none || fail "profiled write failed"
detach engine_profiled
stop_engine
if [ -s "$profile" ]; then cat "$profile"; else say "the profiled engine wrote no profile"; fi
fi
rm -f "$img" "$src"
say "both paths read back what they wrote; rates above (engine vs blkback, same boot)"
