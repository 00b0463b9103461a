#!/usr/bin/env bash
# Issue 7, scenario 4: the bundled engine (`xenblockctl backend --transport xen`) serves backend/vbd with
# kernel blkback unloaded; our script hands it the device; dom0's own blkfront is the frontend.
# Steps: attach, mkfs + write + read back after dropping caches; detach releases the loop device; SIGKILL
# of the engine while a disk is attached leaves no loop device bound; a restarted engine lets the detach
# of that orphaned backend finish. Skips until the engine's Xen transport exists.
# xenci-timeout: 300
. "$XENCI_SCENARIOS/lib.sh"

need_script
xenblockctl backend --help >/dev/null 2>&1 || skip "xenblockctl has no backend command yet"

trap engine_restore EXIT
XENCI_ON_FAIL=dump_vbd
without_blkback
start_engine

img=$XENCI_WORK/disk.img
make_image "$img"
say "attach xvdb rw through the engine"
t=$(now)
xl -v block-attach 0 "$(disk_spec xvdb rw "$img" "$script")" || fail "xl block-attach exited $?"
metric attach_engine_xl_s "$(elapsed "$t")" s
wait_for /dev/xvdb 30 test -b /dev/xvdb
metric attach_engine_dev_s "$(elapsed "$t")" s
[ -n "$(loops_of "$img")" ] || fail "no loop device bound to the image while attached"

mkfs.ext4 -q -F /dev/xvdb || fail "mkfs.ext4 through the engine failed"
mkdir -p "$XENCI_WORK/mnt"
mount /dev/xvdb "$XENCI_WORK/mnt" || fail "mount failed"
head -c 8M /dev/urandom > "$XENCI_WORK/mnt/data"
sum=$(md5sum < "$XENCI_WORK/mnt/data")
umount "$XENCI_WORK/mnt"
echo 3 > /proc/sys/vm/drop_caches

mount /dev/xvdb "$XENCI_WORK/mnt" || fail "mount for read-back failed"
[ "$(md5sum < "$XENCI_WORK/mnt/data")" = "$sum" ] || fail "data read back through the engine differs"
umount "$XENCI_WORK/mnt"
# No frontend reconnect here: unbinding and rebinding dom0's blkfront leaves the frontend Closed
# (observed: state 6 on both sides, /dev/xvdb never returns), because Linux blkfront handshakes on
# backend InitWait only from Initialising (and probe does not reset the state); it does from Closed on a
# backend Connected edge, which scenario 16 uses for its mid-soak reconnect. Scenario 11 reconnects a
# guest for real: pvgrub's blkfront hands the disk to Linux's inside one domain.

say "detach"
t=$(now)
xl -v block-detach 0 xvdb || fail "xl block-detach exited $?"
metric detach_engine_xl_s "$(elapsed "$t")" s
wait_for "/dev/xvdb to go" 30 test ! -e /dev/xvdb
wait_for "no loop device bound after detach" 30 no_loop_for "$img"

say "SIGKILL the engine with a disk attached"
xl -v block-attach 0 "$(disk_spec xvdb rw "$img" "$script")" || fail "second xl block-attach exited $?"
wait_for /dev/xvdb 30 test -b /dev/xvdb
[ -n "$(loops_of "$img")" ] || fail "no loop device bound on the second attach"
kill -9 "$engine_pid"
wait "$engine_pid" 2>/dev/null || true
engine_pid=
wait_for "the loop device to be released after the engine died" 30 no_loop_for "$img"
# Recovery as systemd's Restart=on-failure would do it: a restarted engine must let the detach finish.
start_engine
t=$(now)
xl -v block-detach 0 xvdb || fail "xl block-detach after an engine restart exited $?"
metric detach_after_engine_restart_xl_s "$(elapsed "$t")" s
wait_for "the xvdb backend entry to go" 30 \
  bash -c '! xenstore-exists /local/domain/0/backend/vbd/0/51728 2>/dev/null'
wait_for "/dev/xvdb to go" 30 test ! -e /dev/xvdb
say "engine served I/O, detach and SIGKILL left nothing bound"
