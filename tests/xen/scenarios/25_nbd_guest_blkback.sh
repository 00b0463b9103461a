#!/usr/bin/env bash
# Issue 17: a PV guest whose disk is an NBD export, served by KERNEL blkback through kernel NBD. dom0 runs
# nbdkit (file plugin) on a unix socket; the disk spec is `script=block-xenblockctl,target=nbd+unix://...`;
# our script does the handshake, connects a fresh /dev/nbdN over netlink (delete-on-close flags, backend
# identifier xenblockctl:DOMID:DEVID) and blkback opens it. The guest writes a pattern and reads it back;
# after `xl destroy` the NBD device is gone and another NBD client (ours, over a new connection) reads
# the guest's data back from the server.
# Then the window an NBD device can outlive its script: `add` SIGKILLed after the connect, before the
# open. The device stays connected (the kernel does not clear an unopened device); `gc` leaves it alone
# while its vbd's add has not ended, and `xl block-detach` (our `remove`) disconnects it.
# xenci-timeout: 600
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"
. "$XENCI_SCENARIOS/nbdguest.sh"

need_script
xl_pid=
cleanup() {
  xl destroy "$nbd_name" 2>/dev/null || true
  if [ -n "$xl_pid" ]; then kill -9 "$xl_pid" 2>/dev/null || true; fi
  xl block-detach 0 xvdc >/dev/null 2>&1 || true
  nbd_stop
}
trap cleanup EXIT
dump_nbd() {
  dump_vbd
  echo "--- nbd devices"
  for d in /sys/block/nbd*; do [ -e "$d" ] && echo "$d backend=$(cat "$d/backend" 2>/dev/null) seq=$(cat "$d/diskseq")"; done
  dmesg | grep -i nbd | tail -n 15 || true
}
XENCI_ON_FAIL=dump_nbd

# --- kernel NBD in dom0 ----------------------------------------------------------------------------
[ -e "/lib/modules/$(uname -r)/kernel/drivers/block/nbd.ko" ] \
  || fail "the dom0 kernel $(uname -r) has no nbd.ko"
modprobe nbd nbds_max=0 || fail "modprobe nbd nbds_max=0 exited $?"
no_nbd_devices || fail "nbd pre-created devices ($(nbd_devices)): nbds_max=0 did not apply"
modprobe xen-blkback || true

nbd_serve

# --- a PV guest on the export --------------------------------------------------------------------
nbd_guest_start
be=/local/domain/0/backend/vbd/$domid/51712
dev_path=$(xenstore-read "$be/physical-device-path")
case $dev_path in /dev/nbd[0-9]*) ;; *) fail "physical-device-path is $dev_path, not a kernel NBD device" ;; esac
nbd=${dev_path#/dev/}
[ "$(cat "/sys/block/$nbd/backend")" = "xenblockctl:$domid:51712" ] \
  || fail "$nbd's backend identifier is '$(cat "/sys/block/$nbd/backend")'"
[ "$(xenstore-read "$be/physical-device")" = "$(printf '%x:%x' $(tr ':' ' ' < "/sys/block/$nbd/dev"))" ] \
  || fail "physical-device does not name $nbd"
[ "$(xenstore-read "$be/physical-device-luid")" = "$(diskseq_hex "$dev_path")" ] \
  || fail "the published luid is not $nbd's diskseq"
[ "$(cat "/sys/bus/xen-backend/devices/vbd-$domid-51712/physical_device")" = "$(xenstore-read "$be/physical-device")" ] \
  || fail "kernel blkback does not hold $nbd"
say "guest $domid runs on $dev_path ($(xenstore-read "$be/physical-device"), seq $(cat "/sys/block/$nbd/diskseq")), held by blkback"

t=$(now)
nbd_guest_destroy
wait_for "$nbd to go after the guest" 30 test ! -e "/sys/block/$nbd"
metric destroy_to_nbd_gone_s "$(elapsed "$t")" s
wait_for "no NBD device left" 10 no_nbd_devices
nbd_guest_check_data
say "guest wrote through blkback -> /dev/$nbd -> nbdkit; device gone after destroy; data read back over NBD"

# --- the script killed between connect and open ----------------------------------------------------
stopfile=$XENCI_WORK/paused
XENBLOCKCTL_PAUSE_AT=add-nbd-connected XENBLOCKCTL_PAUSE_FILE=$stopfile \
  xl -v block-attach 0 "format=raw,vdev=xvdc,access=rw,script=block-xenblockctl,target=$nbd_uri" &
xl_pid=$!
wait_for "the script to stop after its NBD connect" 60 test -s "$stopfile"
# the hotplug client (its worker in the hotplug server dies with it: kill-on-hangup), or the Python
# script it exec'd when no server answered
script_pid=$(pgrep -f 'block-xenblockctl(\.py)? add' | head -n1)
[ -n "$script_pid" ] || fail "no stopped block-xenblockctl add process"
leaked=$(nbd_devices)
[ -n "$leaked" ] || fail "no NBD device exists while the script is stopped after its connect"
leaked=${leaked#/sys/block/}
[ "$(cat "/sys/block/$leaked/backend")" = "xenblockctl:0:51744" ] || fail "$leaked is not the stopped add's device"
kill -9 "$script_pid"
if wait "$xl_pid"; then fail "xl block-attach succeeded although its script was killed"; fi
xl_pid=
sleep 1
[ -e "/sys/block/$leaked" ] || fail "$leaked cleared by itself: the window this test is about is not there"
say "script SIGKILLed after connect: $leaked stays connected, never opened"

xenblockctl gc --dry-run | tee "$XENCI_WORK/gc.out"
if grep -q "$leaked" "$XENCI_WORK/gc.out"; then
  fail "gc would disconnect $leaked although its vbd's add never ended (it may be inside the window)"
fi
t=$(now)
xl -v block-detach 0 xvdc || say "xl block-detach exited $? (the add never completed)"
wait_for "the backend of xvdc to go" 30 bash -c '! xenstore-exists /local/domain/0/backend/vbd/0/51744 2>/dev/null'
# remove runs inside block-detach: once xl is back, our remove has either disconnected it or never ran
if [ -e "/sys/block/$leaked" ]; then
  say "$leaked still connected after block-detach (libxl ran no remove for the failed add?): gc, vbd gone"
  xenblockctl gc | tee "$XENCI_WORK/gc.out"
  grep -q "nbd *$leaked\|/dev/$leaked" "$XENCI_WORK/gc.out" || fail "gc did not collect $leaked after its vbd went"
  metric never_opened_cleared_by gc
else
  metric never_opened_cleared_by remove
fi
wait_for "$leaked to be disconnected" 10 test ! -e "/sys/block/$leaked"
metric detach_to_disconnected_s "$(elapsed "$t")" s
no_nbd_devices || fail "NBD devices left: $(nbd_devices)"
say "the never-opened $leaked was disconnected; nothing left"
nbd_stop
