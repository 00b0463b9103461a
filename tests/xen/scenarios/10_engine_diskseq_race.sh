#!/usr/bin/env bash
# Issue 7, scenario 5: the wrong-disk race on real Xen. A block script publishes physical-device and
# physical-device-luid for a loop device, and before the backend opens it that number is re-bound to
# another file (what a killed script + a re-used major:minor does). Kernel blkback would hand dom0's
# blkfront the other file; the engine must compare BLKGETDISKSEQ with the luid, refuse with an error
# node, and the frontend must never see a disk.
# xenci-timeout: 240
. "$XENCI_SCENARIOS/lib.sh"

xenblockctl backend --help >/dev/null 2>&1 || skip "xenblockctl has no backend command yet"
trap 'losetup -D 2>/dev/null || true; engine_restore' EXIT
XENCI_ON_FAIL=dump_vbd
without_blkback
start_engine

victim=$XENCI_WORK/victim.img
intruder=$XENCI_WORK/intruder.img
make_image "$victim"
truncate -s 64M "$intruder"
printf 'INTRUDER-DISK' | dd of="$intruder" bs=512 seek=200 conv=notrunc status=none

# A block script that loses the race on purpose (standing in for the stock script killed at the wrong
# moment): it takes the identity of one binding, and that binding is replaced before it publishes.
racer=$XENCI_WORK/racing-block-script
cat > "$racer" <<SCRIPT
#!/bin/bash
set -e
[ "\$1" = add ] || exit 0
dev=\$(losetup -f --show "$victim")
name=\${dev#/dev/}
seq=\$(cat /sys/block/\$name/diskseq)
minor=\$(cat /sys/block/\$name/dev | cut -d: -f2)
losetup -d "\$dev"
losetup "\$dev" "$intruder"
xenstore-write "\$XENBUS_PATH/physical-device-luid" "\$(printf %x "\$seq")" \
               "\$XENBUS_PATH/physical-device" "\$(printf '7:%x' "\$minor")"
echo "\$dev" > "$XENCI_WORK/racer-device"
SCRIPT
chmod +x "$racer"

say "attach xvdb with a script whose device is replaced before the backend opens it"
xl -v block-attach 0 "$(disk_spec xvdb rw "$victim" "$racer")" || say "xl block-attach exited $? (expected either way)"
be=/local/domain/0/backend/vbd/0/51728
err=/local/domain/0/error/backend/vbd/0/51728/error
wait_for "the engine's error node" 30 xenstore-exists "$err"
msg=$(xenstore-read "$err")
say "engine: $msg"
case $msg in *"diskseq mismatch"*) ;; *) fail "error node does not name the diskseq mismatch: $msg" ;; esac
[ "$(xenstore-read "$be/opened")" = 0 ] || fail "the engine signalled opened for the wrong disk"
[ "$(xenstore-read "$be/state")" = 5 ] || fail "backend is not Closing after the refusal"
sleep 3
[ ! -e /dev/xvdb ] || fail "dom0's blkfront got a disk: $(read_sector /dev/xvdb 200)"
dev=$(cat "$XENCI_WORK/racer-device")
# The engine must not keep the intruder open: it closed the device when it refused it.
want=$(stat -L -c '%t:%T' "$dev")
for fd in /proc/"$engine_pid"/fd/*; do
  [ "$(stat -L -c '%t:%T' "$fd" 2>/dev/null || true)" != "$want" ] || fail "the engine still holds $dev ($fd)"
done
grep -q "diskseq mismatch" "$engine_log" || fail "no diskseq mismatch line in the engine log"

say "detach the refused backend"
xl -v block-detach 0 xvdb || xl -v block-detach 0 xvdb -f || true
wait_for "the xvdb backend entry to go" 30 bash -c "! xenstore-exists $be 2>/dev/null"
losetup -d "$dev" 2>/dev/null || true
wait_for "no loop device bound to the intruder" 15 no_loop_for "$intruder"
say "the wrong disk was refused: error node, no opened=1, no /dev/xvdb"
