#!/usr/bin/env bash
# xenci-timeout: 1500
# Issue 21: guests keep their disks across an engine crash, restart or upgrade. dom0's own blkfront
# (Linux 6.1's, a real Xen ring, grant and event channel) is the frontend of a disk the bundled engine
# serves, and soak_io.py drives it with O_DIRECT (mixed writes, verified reads, flushes, discards,
# overlapping writes in flight) while the engine goes away under it:
#   1. upgrade without systemd: `xenblockctl backend --takeover` asks the running engine over its
#      hand-over socket; it drains its ring and passes the device fd; the new engine re-verifies it and
#      re-attaches to the live ring (same ring-ref and event channel: the frontend never noticed);
#   2. crash: the engine runs under fdstore_supervisor.py (what systemd does for Type=notify with
#      FileDescriptorStoreMax=, over the same protocol: dom0's PID 1 is xen-ci-init, no systemd) and is
#      SIGKILLed; the store's copy keeps the loop device bound, the restarted engine takes it back from
#      LISTEN_FDS, re-verifies it and re-attaches: what the dead engine took but never answered is run
#      again (ring.py), the guest sees a pause, not an error;
#   2b. restart (SIGTERM under the store, as `systemctl restart`): the engine drains and leaves the
#      device parked; the next one re-attaches;
#   3. crash with nothing coming back (the unit stopped for good): the store closes its copy and the
#      loop device is gone (delete-on-close still holds).
# Each pause (from the kill/takeover to a probe read answered) is reported as a metric. Checked: zero
# soak errors and mismatches, no "I/O error" from blkfront, the frontend's ring-ref and event-channel
# unchanged and its state Connected throughout, the same loop device and diskseq.
. "$XENCI_SCENARIOS/lib.sh"

need_script
xenblockctl backend --help 2>/dev/null | grep -q -- --takeover || skip "xenblockctl backend has no --takeover yet"

img=$XENCI_WORK/restart.img
be=/local/domain/0/backend/vbd/0/51728
fe=/local/domain/0/device/vbd/51728
notify=$XENCI_WORK/notify.sock
stopfile=$XENCI_WORK/unit-stopped
supervisor_pid=
soak_pid=
cleanup() {
  [ -n "$soak_pid" ] && kill "$soak_pid" 2>/dev/null || true
  touch "$stopfile"
  [ -n "$supervisor_pid" ] && kill -9 "$(current_engine)" 2>/dev/null || true
  # an engine that serves the disk (or fails it) lets xl detach it
  if [ -e /sys/block/xvdb ]; then
    if [ -z "${engine_pid:-}" ] || ! kill -0 "$engine_pid" 2>/dev/null; then start_engine || true; fi
    xl block-detach 0 xvdb 2>/dev/null || true
  fi
  engine_restore
  rm -f /run/xenblockctl/engine-vbd.parked  # the supervised engines' record (doctor reads it)
}
trap cleanup EXIT
XENCI_ON_FAIL=dump_vbd  # the engine log's tail follows from engine_restore
without_blkback

node_is() { [ "$(xenstore-read "$1" 2>/dev/null)" = "$2" ]; }
ring_id() { echo "$(xenstore-read $fe/ring-ref) $(xenstore-read $fe/event-channel)"; }
io_errors() { dmesg | grep -c 'I/O error, dev xvdb' || true; }
# The pid of the engine the supervisor started last.
current_engine() { grep -o 'supervisor: started pid [0-9]*' "$engine_log" | tail -n 1 | awk '{print $4}'; }
ready_count() { grep -c 'engine ready' "$engine_log" || true; }
ready_more_than() { [ "$(ready_count)" -gt "$1" ]; }
# probe LABEL T0: one direct read of the disk, answered; the pause is from T0 to its answer.
probe() {
  dd if=/dev/xvdb of=/dev/null bs=4096 count=1 skip=$((RANDOM % 1000)) iflag=direct status=none \
    || fail "$1: the probe read failed"
  metric "${1}_pause_s" "$(elapsed "$2")" s
  say "$1: pause $(elapsed "$2") s (to the first read answered)"
}
# Sectors written to xvdb so far (/sys/block/*/stat field 7).
sectors_written() { awk '{ print $7 }' /sys/block/xvdb/stat; }
writes_since() { [ "$(sectors_written)" -gt "$1" ]; }
# soak_start MIB LABEL [SOAK ARGS]: the soak in the background, returning 2 s into its mix of
# writes and verified reads (after a --resume's read-only check of the whole disk): requests in
# flight when the engine goes, however fast or slow this VM is today.
soak_start() {
  local mark
  mark=$(sectors_written)
  python3 "$XENCI_SCENARIOS/soak_io.py" /dev/xvdb --min-total-mib "$1" --min-write-mib $(($1 / 2)) \
    --threads 4 "${@:3}" >"$XENCI_WORK/soak-$2.json" 2>&1 &
  soak_pid=$!
  wait_for "$2: the soak's writes" 600 writes_since "$mark"
  sleep 2
}
uptime_now() { local up _; read -r up _ </proc/uptime; echo "$up"; }
# ring_gap LABEL SINCE: dom0 uptime from SINCE to the first `connected:` line logged after it (the
# engine serving the ring again), as a metric.
ring_gap() {
  local gap
  gap=$(awk -F'[][]' -v since="$2" '/connected:/ && $2 + 0 > since + 0 { printf "%.3f", $2 - since; exit }' "$engine_log")
  [ -n "$gap" ] || fail "$1: no connected: line after uptime $2"
  metric "${1}_ring_gap_s" "$gap" s
  say "$1: the ring was served again $gap s after the engine went"
}
soak_end() {
  wait "$soak_pid" || { cat "$XENCI_WORK/soak-$1.json"; soak_pid=; fail "$1: the guest I/O saw errors or mismatches: $(tail -c 400 "$XENCI_WORK/soak-$1.json")"; }
  soak_pid=
  cat "$XENCI_WORK/soak-$1.json"
}
same_disk() {
  [ "$(loops_of "$img")" = "$loop" ] || fail "$1: the loop device changed: '$(loops_of "$img")', was $loop"
  [ "$(cat "/sys/block/${loop#/dev/}/diskseq")" = "$seq" ] || fail "$1: diskseq changed"
  [ "$(ring_id)" = "$ring" ] || fail "$1: the frontend's ring changed ($(ring_id), was $ring): it reconnected"
  node_is $fe/state 4 || fail "$1: frontend state $(xenstore-read $fe/state)"
  node_is $be/state 4 || fail "$1: backend state $(xenstore-read $be/state)"
}

# The soaks must outlast an engine change (a takeover or a restart: 13-17 s under TCG, ci37), not
# more: a full run moves 512 MiB in each on a 256 MiB disk (~120 s each, ci37); a check run (CI's)
# 256 MiB in the takeover's, and in the crash's the whole-disk check of a 128 MiB disk then 256
# MiB of mix, so the kill still comes with the soak's longest part ahead of it.
if full_lane; then
  DISK_MIB=256 TAKEOVER_MIB=512 CRASH_MIB=512
else
  DISK_MIB=128 TAKEOVER_MIB=256 CRASH_MIB=384
fi
rm -f "$img" "$stopfile"
truncate -s "${DISK_MIB}M" "$img"
start_engine
xl block-attach 0 "$(disk_spec xvdb rw "$img" "$script")" || fail "xl block-attach exited $?"
wait_for /dev/xvdb 30 test -b /dev/xvdb
wait_for "frontend Connected" 30 node_is $fe/state 4
loop=$(loops_of "$img")
seq=$(cat "/sys/block/${loop#/dev/}/diskseq")
ring=$(ring_id)
errs=$(io_errors)
say "serving xvdb from $loop (diskseq $seq), ring-ref/event-channel $ring"

# 1. upgrade without systemd: --takeover
old=$engine_pid
soak_start "$TAKEOVER_MIB" takeover --save-state "$XENCI_WORK/soak.state"
t=$(now)
start_engine --takeover
kill -0 "$soak_pid" 2>/dev/null || fail "takeover: the soak ended before the engine changed: make it longer"
wait "$old" || fail "takeover: the old engine exited $?"
probe takeover "$t"
# the ring's own gap: from the old engine stopping (it drains what is in flight first) to the new
# one connected
ring_gap takeover "$(grep 'hand-over requested' "$engine_log" | tail -n 1 | awk -F'[][]' '{ print $2 + 0 }')"
grep -q 'handed 1 device(s) over' "$engine_log" || fail "takeover: the old engine handed nothing over"
grep -q 'took over .* diskseq' "$engine_log" || fail "takeover: the new engine did not take the device back"
soak_end takeover
same_disk takeover

# 2. crash under a store: the supervised engine takes over from the plain one (a second upgrade),
# parks the device in the store, and is SIGKILLed; the supervisor restarts it with the stored fd
old=$engine_pid
before=$(ready_count)
python3 "$XENCI_SCENARIOS/fdstore_supervisor.py" "$notify" "$stopfile" --first --takeover -- \
  xenblockctl backend --kind vbd --transport xen > >(uptime_lines >>"$engine_log") 2>&1 &
supervisor_pid=$!
wait_for "the supervised engine" 120 ready_more_than "$before"
wait "$old" || fail "second takeover: the old engine exited $?"
engine_pid=
wait_for "the device parked in the store" 30 grep -q 'FDSTORE vbd-0-51728' "$engine_log"
xenblockctl doctor | grep -E '^.*parked' || true  # engine-vbd.parked: 1 device parked
same_disk "under the store"
# the crash soak first reads the whole disk back against what the takeover soak left (through two
# engine changes), then mixes again; the kill comes 2 s into that mix
soak_start "$CRASH_MIB" crash --resume "$XENCI_WORK/soak.state"
victim=$(current_engine)
before=$(ready_count)
t=$(now)
killed=$(uptime_now)
kill -9 "$victim"
[ -n "$(loops_of "$img")" ] || fail "crash: the loop device went with the engine (the store holds it)"
wait_for "the restarted engine" 120 ready_more_than "$before"
kill -0 "$soak_pid" 2>/dev/null || fail "crash: the soak ended before the engine came back: make it longer"
probe crash "$t"
ring_gap crash "$killed"
grep -q 're-attached to a live ring\|took over' "$engine_log" || fail "crash: no takeover in the engine log"
grep 're-attached to a live ring' "$engine_log" || say "crash: the ring was idle at the kill (nothing to re-run)"
soak_end crash
tail -n 1 "$XENCI_WORK/soak-crash.json" | DISK_MIB=$DISK_MIB python3 -c '
import json, os, sys
d = json.load(sys.stdin)
if not d["resumed"] or d["resume_verified_mib"] < int(os.environ["DISK_MIB"]):
    sys.exit("FAIL: crash: the soak did not check the whole disk against the takeover soak first")
print("XENCI-METRIC: verified_after_two_engine_changes_mib=%s MiB" % d["resume_verified_mib"])' \
  || fail "crash: the soak's summary: $(tail -c 400 "$XENCI_WORK/soak-crash.json")"
same_disk crash

# 2b. `systemctl restart`: SIGTERM (the engine drains, leaves the device parked), the supervisor
# starts it again with the stored fd, and it re-attaches; a probe read across it
victim=$(current_engine)
before=$(ready_count)
t=$(now)
stopped=$(uptime_now)
kill -TERM "$victim"
wait_for "the restarted engine" 120 ready_more_than "$before"
probe restart "$t"
ring_gap restart "$stopped"
same_disk restart

# 3. crash and no engine comes back: the store's close is the last reference
touch "$stopfile"
victim=$(current_engine)
kill -9 "$victim"
wait "$supervisor_pid" || fail "the supervisor exited $?"
supervisor_pid=
wait_for "the loop device to go (delete-on-close)" 30 no_loop_for "$img"
say "no engine came back: the loop device is gone"

[ "$(io_errors)" = "$errs" ] || { dmesg | grep 'I/O error, dev xvdb' | tail -n 5; fail "blkfront logged I/O errors"; }
# clean up: an engine finds the device gone and fails it, so xl can detach it
start_engine
wait_for "the backend to fail the emptied device" 30 node_is $be/state 5
xl block-detach 0 xvdb || fail "xl block-detach exited $?"
wait_for "/dev/xvdb to go" 30 test ! -e /dev/xvdb
rm -f "$img"
say "engine restart: takeover and crash re-attached to the live ring with zero guest errors; no comeback releases the disk"
