#!/usr/bin/env bash
# Issue 7, timings: the same disk through kernel blkback and through the bundled engine (Xen transport),
# in the same boot, read and written by dom0's blkfront with direct I/O. Reported, not asserted: under
# QEMU TCG absolute numbers are small; the ratio engine/blkback is what to compare. The data written
# through each path is checked, so a fast wrong answer fails.
# xenci-timeout: 600
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

# rate LABEL BYTES COMMAND...: run COMMAND, report BYTES/elapsed as MiB/s.
rate() {
  local label=$1 bytes=$2 t s
  shift 2
  t=$(now)
  "$@" || fail "$label: $* failed"
  s=$(elapsed "$t")
  metric "${label}_MiBps" "$(awk -v b="$bytes" -v s="$s" 'BEGIN { printf "%.1f", b / 1048576 / s }')" MiB/s
}

# measure LABEL: the three workloads through /dev/xvdb, then check what the write left there.
measure() {
  local label=$1 dev=/dev/xvdb
  rate "${label}_seq_write_1M" $((32 << 20)) dd if="$src" of="$dev" bs=1M count=32 seek=8 oflag=direct conv=fsync status=none
  rate "${label}_seq_read_1M" $((32 << 20)) dd if="$dev" of=/dev/null bs=1M count=32 skip=8 iflag=direct status=none
  rate "${label}_seq_read_4k" $((8 << 20)) dd if="$dev" of=/dev/null bs=4k count=2048 skip=2048 iflag=direct status=none
  [ "$(dd if="$dev" bs=1M count=32 skip=8 iflag=direct status=none | md5sum)" = "$want" ] \
    || fail "$label: data read back through $dev differs from what was written"
}

attach() {
  xl block-attach 0 "$(disk_spec xvdb rw "$img" "$script")" || fail "xl block-attach ($1) exited $?"
  wait_for /dev/xvdb 30 test -b /dev/xvdb
  # how many queues blkfront negotiated (issue 20): it writes the node only for 2 or more
  metric "${1}_queues" "$(xenstore-read /local/domain/0/device/vbd/51728/multi-queue-num-queues 2>/dev/null || echo 1)" queues
}
detach() {
  xl block-detach 0 xvdb || fail "xl block-detach ($1) exited $?"
  wait_for "/dev/xvdb to go" 30 test ! -e /dev/xvdb
  wait_for "no loop device bound ($1)" 30 no_loop_for "$img"
}

say "kernel blkback"
modprobe xen-blkback || true
attach blkback
measure blkback
detach blkback

say "the engine (Xen transport), persistent grants offered (blkfront takes them)"
without_blkback
start_engine
attach engine
measure engine
detach engine
say "the engine without persistent grants: every request maps and unmaps its pages"
kill "$engine_pid"
wait "$engine_pid" 2>/dev/null || true
start_engine --no-persistent-grants
attach engine_nopg
measure engine_nopg
detach engine_nopg
say "the engine with --workers 2: each queue served by a worker process (issue 20)"
kill "$engine_pid"
wait "$engine_pid" 2>/dev/null || true
start_engine --workers 2
attach engine_workers
measure engine_workers
detach engine_workers
grep -E 'connected:|ring stopped|worker' "$engine_log" | tail -n 8 || true
grep -q 'worker process(es) serve the queues' "$engine_log" || fail "--workers 2 started no worker"
grep -q 'connected: .*persistent grants' "$engine_log" || fail "blkfront never used persistent grants"
grep -q 'connected: .*grants mapped per request' "$engine_log" || fail "--no-persistent-grants was not honoured"
rm -f "$img" "$src"
say "both paths read back what they wrote; rates above (engine vs blkback, same boot)"
