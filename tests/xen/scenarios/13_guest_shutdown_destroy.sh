#!/usr/bin/env bash
# Issue 7, scenario 2 (the toolstack ending a running guest): a PV guest with one rw disk through our
# script is running and has written through its disk; then `xl shutdown -w` (the guest powers off) or
# `xl destroy` (no cooperation from the guest) ends it. Either way our `remove` must run, the backend
# must go and no loop device may stay bound -- once with kernel blkback, once with the engine. The two
# guests of a consumer boot together; the destroyed one is still running while the other shuts down.
# xenci-timeout: 600
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"

need_script

name=xenci-idle
initrd=$XENCI_WORK/idle-initrd.gz
trap 'xl destroy "$name-shutdown" 2>/dev/null || true; xl destroy "$name-destroy" 2>/dev/null || true; engine_restore' EXIT
XENCI_ON_FAIL=dump_vbd
build_domu_initrd "$initrd" "$XENCI_SCENARIOS/domu/idle.init"
domu_console_logging

# boot HOW: create the guest that HOW (shutdown|destroy) will end, with its own image and token.
boot() {
  local how=$1 token="tok$RANDOM$RANDOM"
  make_image "$XENCI_WORK/$how.img"
  echo "$token" > "$XENCI_WORK/$how.token"
  cat > "$XENCI_WORK/$how.cfg" <<CFG
name = "$name-$how"
type = "pv"
memory = 128
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$initrd"
extra = "console=hvc0 rdinit=/init quiet xenci.token=$token"
disk = [ '$(disk_spec xvda rw "$XENCI_WORK/$how.img" "$script")' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
  xl create "$XENCI_WORK/$how.cfg" || fail "$label: xl create ($how) exited $?"
}
# end HOW: the running guest HOW names ended that way, then the checks.
end() {
  local how=$1 img=$XENCI_WORK/$1.img guest=$name-$1 t
  wait_guest_phase "$guest" ready 180
  [ -n "$(loops_of "$img")" ] || fail "$label: no loop device bound while the guest runs"
  say "$label: guest $domid ready; xl $how"
  t=$(now)
  case $how in
    shutdown) xl shutdown -w "$guest" || fail "$label: xl shutdown -w exited $?" ;;
    destroy) xl destroy "$guest" || fail "$label: xl destroy exited $?" ;;
  esac
  metric "${label}_xl_${how}_s" "$(elapsed "$t")" s
  wait_for "$label: domain $guest to be gone" 60 bash -c "! xl domid $guest >/dev/null 2>&1"
  wait_for "$label: backend of domain $domid to go" 30 \
    bash -c "! xenstore-exists /local/domain/0/backend/vbd/$domid 2>/dev/null"
  wait_for "$label: no loop device bound" 30 no_loop_for "$img"
  metric "${label}_${how}_to_released_s" "$(elapsed "$t")" s
  [ "$(read_sector "$img" 300)" = "IDLE-GUEST $(cat "$XENCI_WORK/$how.token")" ] \
    || fail "$label: the guest's write is not in the image"
  rm -f "$img"
  say "$label: $how ended the guest; remove ran, nothing bound"
}
# cycle LABEL: two guests booted together (one boot's wait for both: ~45 s less of CI's lane per
# consumer than one after the other, ci37), one ended by `xl shutdown -w`, the other by `xl destroy`
# while the first one's end is already checked: each end touches its own guest's disk alone.
cycle() {
  label=$1
  say "$label: boot two guests"
  boot shutdown
  boot destroy
  end shutdown
  end destroy
}

modprobe xen-blkback || true
cycle blkback

if xenblockctl backend --help >/dev/null 2>&1; then
  without_blkback
  start_engine
  cycle engine
fi
rm -f "$initrd"
