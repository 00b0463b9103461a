# Helpers for shell scenarios (sourced, not run: only NN_name.sh files are scenarios).
# Runs inside the test dom0, where the runner installed this checkout's .deb (`apt install`) before the
# first scenario: scenarios use the installed commands and paths, as an admin would, never the checkout's
# Python files. The runner sets XENCI_WORK (fresh scratch dir, also the cwd), XENCI_SCENARIO,
# XENCI_SCENARIOS (this directory), XENCI_DEB and XENCI_WHEEL (the packages built on the host for this
# run), XENCI_MODE (the lane's job: "check", what CI runs, or "full"; tests/xen/vm.py LANE_MODES).
# Exit 0 = pass, 77 = skip, anything else = fail; the runner takes the reason from the last
# "SKIP:" / "FAIL" line.
set -euo pipefail

# The block script the package installed where libxl resolves `script=block-xenblockctl`.
script=/etc/xen/scripts/block-xenblockctl

say() { echo "== $*"; }
# XENCI_ON_FAIL: a command a scenario sets to dump its diagnostics when it fails.
fail() {
  echo "FAIL: $*"
  if [ -n "${XENCI_ON_FAIL:-}" ]; then eval "$XENCI_ON_FAIL" || true; fi
  exit 1
}
skip() { echo "SKIP: $*"; exit 77; }
# A missing script is a broken install, never a reason to skip.
need_script() { [ -x "$script" ] || fail "$script is missing or not executable: the package did not install it"; }
# full_lane: true in a full run. The measurements (rounds, A/B boots, probes) and the longest volumes
# run only then: CI's check run must fit a slow 2-core machine's hour, and speed is read from
# benchmarks, not from tests.
full_lane() { [ "${XENCI_MODE:-check}" = full ]; }
# Timings the lane reports but does not assert.
metric() { echo "XENCI-METRIC: $1=$2 ${3:-}"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND until it succeeds or SECONDS pass.
wait_for() {
  local what=$1 limit=$2 start
  shift 2
  start=$(now)
  until "$@"; do
    if awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
      fail "timed out after ${limit}s waiting for $what"
    fi
    sleep 0.1
  done
}

# The loop devices bound to FILE (empty when none).
loops_of() { losetup -j "$1" | cut -d: -f1; }
no_loop_for() { [ -z "$(loops_of "$1")" ]; }
# diskseq_hex /dev/X: the device's diskseq spelled as a published luid (lowercase hex).
diskseq_hex() { printf '%x' "$(cat "/sys/block/${1#/dev/}/diskseq")"; }

# A 64 MiB sparse disk image with a known marker at sector 200.
make_image() {
  truncate -s 64M "$1"
  printf 'XENCI-IMAGE-MARKER-%s' "$XENCI_SCENARIO" | dd of="$1" bs=512 seek=200 conv=notrunc,fsync status=none
}
read_sector() { dd if="$1" bs=512 skip="$2" count=1 status=none iflag=direct 2>/dev/null | tr -d '\0'; }

disk_spec() {  # disk_spec VDEV ACCESS IMAGE [SCRIPT]
  local spec="format=raw,vdev=$1,access=$2"
  [ -n "${4:-}" ] && spec+=",script=$4"
  echo "$spec,target=$3"
}

# attach_rw_cycle VDEV IMAGE [SCRIPT]: attach rw, write through /dev/VDEV, detach, check the data landed in
# the image and that no loop device stayed bound. Reports attach/detach times as metrics.
attach_rw_cycle() {
  local vdev=$1 img=$2 script=${3:-} label=${4:-rw} t token
  token="XENCI-WRITE-$XENCI_SCENARIO-$RANDOM$RANDOM"
  say "attach $vdev rw ${script:+(script=$script)}"
  t=$(now)
  xl -v block-attach 0 "$(disk_spec "$vdev" rw "$img" "$script")" || fail "xl block-attach $vdev rw exited $?"
  metric "attach_${label}_xl_s" "$(elapsed "$t")" s
  wait_for "/dev/$vdev" 30 test -b "/dev/$vdev"
  metric "attach_${label}_dev_s" "$(elapsed "$t")" s
  [ "$(read_sector "/dev/$vdev" 200)" = "XENCI-IMAGE-MARKER-$XENCI_SCENARIO" ] \
    || fail "/dev/$vdev does not show the image's marker"
  printf '%s' "$token" | dd of="/dev/$vdev" bs=512 seek=300 oflag=direct conv=fsync status=none \
    || fail "write through /dev/$vdev failed"
  [ "$(read_sector "/dev/$vdev" 300)" = "$token" ] || fail "read back through /dev/$vdev differs"
  say "detach $vdev"
  t=$(now)
  xl -v block-detach 0 "$vdev" || fail "xl block-detach $vdev exited $?"
  metric "detach_${label}_xl_s" "$(elapsed "$t")" s
  wait_for "/dev/$vdev to go" 30 test ! -e "/dev/$vdev"
  wait_for "no loop device bound to $img" 15 no_loop_for "$img"
  [ "$(read_sector "$img" 300)" = "$token" ] || fail "data written through /dev/$vdev is not in $img"
  say "rw cycle ok: data in image, /dev/$vdev gone, no loop device bound"
}

# attach_ro_cycle VDEV IMAGE [SCRIPT]: attach ro, the image's data is readable, writes fail and do not
# reach the image, detach leaves nothing bound.
attach_ro_cycle() {
  local vdev=$1 img=$2 script=${3:-} label=${4:-ro} t before
  before=$(md5sum < "$img")
  say "attach $vdev ro ${script:+(script=$script)}"
  t=$(now)
  xl -v block-attach 0 "$(disk_spec "$vdev" ro "$img" "$script")" || fail "xl block-attach $vdev ro exited $?"
  metric "attach_${label}_xl_s" "$(elapsed "$t")" s
  wait_for "/dev/$vdev" 30 test -b "/dev/$vdev"
  [ "$(read_sector "/dev/$vdev" 200)" = "XENCI-IMAGE-MARKER-$XENCI_SCENARIO" ] \
    || fail "/dev/$vdev does not show the image's marker"
  [ "$(blockdev --getro "/dev/$vdev")" = 1 ] || fail "/dev/$vdev is not read-only"
  if printf 'MUST-NOT-LAND' | dd of="/dev/$vdev" bs=512 seek=400 oflag=direct conv=fsync status=none 2>/dev/null
  then
    fail "a write through read-only /dev/$vdev succeeded"
  fi
  say "detach $vdev"
  t=$(now)
  xl -v block-detach 0 "$vdev" || fail "xl block-detach $vdev exited $?"
  metric "detach_${label}_xl_s" "$(elapsed "$t")" s
  wait_for "/dev/$vdev to go" 30 test ! -e "/dev/$vdev"
  wait_for "no loop device bound to $img" 15 no_loop_for "$img"
  [ "$(md5sum < "$img")" = "$before" ] || fail "the read-only image changed"
  say "ro cycle ok: readable, writes refused, image unchanged, nothing bound"
}

# The bundled engine on the Xen transport, for scenarios that run it instead of kernel blkback.
# start_engine [ARGS]: (re)start it (ARGS go to `xenblockctl backend`) and wait for its ready line;
# stop_engine: end it (SIGTERM) and wait until it has exited; engine_restore (an EXIT trap): kill it,
# show its log, reload blkback for later scenarios. (No bare `a && b`: under set -e a failing b would
# turn a skip's 77 into 1.)
engine_log=$XENCI_WORK/engine.log
engine_pid=
uptime_lines() {
  local line up _
  while IFS= read -r line; do
    read -r up _ </proc/uptime
    printf '[%12s] %s\n' "$up" "$line"
  done
}
start_engine() {
  local n=0 before
  touch "$engine_log"
  before=$(grep -c 'engine ready' "$engine_log" || true)
  # Each line stamped with dom0's uptime, as dmesg is: "how long did the engine take" is a question
  # the console must answer (libxl gives a backend 10 s to reach InitWait).
  xenblockctl backend --kind vbd --transport xen "$@" > >(uptime_lines >>"$engine_log") 2>&1 &
  engine_pid=$!
  until [ "$(grep -c 'engine ready' "$engine_log" || true)" -gt "$before" ]; do
    if ! kill -0 "$engine_pid" 2>/dev/null; then
      cat "$engine_log"
      grep -q 'not-implemented' "$engine_log" && skip "engine: $(grep -m1 'not-implemented' "$engine_log")"
      fail "the engine exited before it was ready"
    fi
    n=$((n + 1)); [ $n -gt 600 ] && { cat "$engine_log"; fail "engine not ready after 60s"; }
    sleep 0.1
  done
  say "engine ready (pid $engine_pid)"
}
stop_engine() {
  kill "$engine_pid"
  wait "$engine_pid" 2>/dev/null || true
  engine_pid=
}
engine_restore() {
  if [ -n "$engine_pid" ]; then kill -9 "$engine_pid" 2>/dev/null || true; fi
  echo "--- engine log"; tail -n 40 "$engine_log" 2>/dev/null || true
  modprobe xen-blkback || true
}
# Kernel blkback binds every backend/vbd: unload it so the engine serves them.
without_blkback() {
  rmmod xen-blkback 2>/dev/null || true
  # The engine sweeps device-mapper devices at start; without dm_mod it only logs that it cannot.
  modprobe dm_mod || true
  [ ! -d /sys/module/xen_blkback ] || fail "cannot unload xen-blkback (in use?)"
}
# Diagnostics for vbd scenarios (set XENCI_ON_FAIL=dump_vbd).
dump_vbd() {
  echo "--- frontend / backend nodes"
  xenstore-ls -f /local/domain/0/device/vbd 2>&1 | grep -E '/(state|ring-ref|event-channel|protocol)' || true
  xenstore-ls -f /local/domain/0/backend/vbd 2>&1 | grep -E '/(state|online|opened|physical-device|hotplug-status)' || true
  dmesg | grep -iE 'blkfront|xvd|vbd' | tail -n 15 || true
}
