#!/usr/bin/env bash
# Issue 13, item 3: a data-integrity soak through the bundled engine (Xen transport, kernel blkback
# unloaded), once with persistent grants and once without (--no-persistent-grants), in one boot. dom0's
# blkfront is the frontend; soak_io.py drives it with O_DIRECT: a random mix of 512 B - 1 MiB writes and
# verified reads at sector- but not page-aligned offsets and buffers, requests past 11 segments (indirect
# descriptors), fsync/fdatasync (flush), BLKDISCARD, several writers in flight at once and overlapping
# writes to the same sectors, then a read of the whole disk. Each mode must move at least SOAK_TOTAL_MIB
# (written + read back and checked) with zero I/O errors (soak_io.py's and blkfront's in dmesg) and zero
# mismatching sectors.
# No frontend reconnect inside the soak: dom0's blkfront cannot be unbound and bound again (it stays
# Closed, see scenario 09), and the real same-domain reconnect (pvgrub's blkfront handing over to
# Linux's) happens at a guest's boot, before any soak could start; scenario 11 covers it on the engine.
# xenci-timeout: 1500
. "$XENCI_SCENARIOS/lib.sh"

script=$XENCI_CHECKOUT/hotplug/block-xenblockctl
[ -e "$script" ] || skip "hotplug/block-xenblockctl not present"
xenblockctl backend --help >/dev/null 2>&1 || skip "xenblockctl has no backend command yet"
# A failed soak exits with the disk attached: detach it while the engine still serves it.
trap 'xl block-detach 0 xvdb 2>/dev/null || true; engine_restore' EXIT
XENCI_ON_FAIL=dump_vbd
SOAK_TOTAL_MIB=${SOAK_TOTAL_MIB:-1024}
SOAK_WRITE_MIB=${SOAK_WRITE_MIB:-512}
img=$XENCI_WORK/soak.img
without_blkback

# soak LABEL [ENGINE ARGS...]: a fresh 256 MiB disk through a fresh engine, soaked, detached.
soak() {
  local label=$1 t out errs_before errs_after be=/local/domain/0/backend/vbd/0/51728
  shift
  rm -f "$img"
  truncate -s 256M "$img"
  start_engine "$@"
  xl block-attach 0 "$(disk_spec xvdb rw "$img" "$script")" || fail "$label: xl block-attach exited $?"
  wait_for /dev/xvdb 30 test -b /dev/xvdb
  say "$label: backend offers persistent=$(xenstore-read $be/feature-persistent 2>/dev/null)" \
    "indirect=$(xenstore-read $be/feature-max-indirect-segments 2>/dev/null)" \
    "flush=$(xenstore-read $be/feature-flush-cache 2>/dev/null)" \
    "discard=$(xenstore-read $be/feature-discard 2>/dev/null)"
  local q=/sys/block/xvdb/queue
  say "$label: blkfront queue max_segments=$(cat $q/max_segments) max_sectors_kb=$(cat $q/max_sectors_kb)" \
    "discard_max_bytes=$(cat $q/discard_max_bytes) write_cache=$(cat $q/write_cache)"
  [ "$(cat $q/max_segments)" -gt 11 ] || fail "$label: blkfront uses no indirect segments (max_segments $(cat $q/max_segments))"
  [ "$(cat $q/discard_max_bytes)" -gt 0 ] || fail "$label: the engine offers no discard"
  errs_before=$(dmesg | grep -c 'I/O error, dev xvdb' || true)
  t=$(now)
  out=$XENCI_WORK/soak-$label.json
  python3 "$XENCI_SCENARIOS/soak_io.py" /dev/xvdb --min-total-mib "$SOAK_TOTAL_MIB" --min-write-mib "$SOAK_WRITE_MIB" \
    > "$out" || { cat "$out"; fail "$label: the soak found errors or mismatches (see above)"; }
  metric "${label}_soak_s" "$(elapsed "$t")" s
  errs_after=$(dmesg | grep -c 'I/O error, dev xvdb' || true)
  cat "$out"
  python3 - "$out" "$label" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); label = sys.argv[2]
for k in ("written_mib", "read_mib", "errors", "mismatches", "writes", "reads", "fsyncs", "fdatasyncs",
          "discards", "indirect_sized", "unaligned_page", "overlap_rounds", "overlap_sectors", "bursts"):
    print(f"XENCI-METRIC: {label}_{k}={r[k]}")
PY
  [ "$errs_after" = "$errs_before" ] || { dmesg | grep 'I/O error, dev xvdb' | tail -n 5; fail "$label: blkfront logged $((errs_after - errs_before)) I/O errors"; }
  xl block-detach 0 xvdb || fail "$label: xl block-detach exited $?"
  wait_for "/dev/xvdb to go ($label)" 30 test ! -e /dev/xvdb
  wait_for "no loop device bound ($label)" 30 no_loop_for "$img"
  kill "$engine_pid"
  wait "$engine_pid" 2>/dev/null || true
  engine_pid=
}

say "the engine with persistent grants"
soak pg
say "the engine without persistent grants"
soak nopg --no-persistent-grants
grep -E 'connected:' "$engine_log" | tail -n 2 || true
grep -q 'connected: .*persistent grants' "$engine_log" || fail "blkfront never used persistent grants"
grep -q 'connected: .*grants mapped per request' "$engine_log" || fail "--no-persistent-grants was not honoured"
rm -f "$img"
say "soak: both modes, zero I/O errors, zero mismatches"
