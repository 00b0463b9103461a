#!/usr/bin/env bash
# Issue 7, scenario 2 (the toolstack ending a running guest): a PV guest with one rw disk through our
# script is running and has written through its disk; then `xl shutdown -w` (the guest powers off) or
# `xl destroy` (no cooperation from the guest) ends it. Either way our `remove` must run, the backend
# must go and no loop device may stay bound -- once with kernel blkback, once with the engine.
# xenci-timeout: 600
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"

need_script

name=xenci-idle
img=$XENCI_WORK/idle.img
initrd=$XENCI_WORK/idle-initrd.gz
cfg=$XENCI_WORK/idle.cfg
trap 'xl destroy "$name" 2>/dev/null || true; engine_restore' EXIT
XENCI_ON_FAIL=dump_vbd
build_domu_initrd "$initrd" "$XENCI_SCENARIOS/domu/idle.init"
domu_console_logging

# cycle LABEL HOW: boot the guest, wait for its "ready", end it with HOW (shutdown|destroy), check.
cycle() {
  local label=$1 how=$2 token="tok$RANDOM$RANDOM" t
  make_image "$img"
  cat > "$cfg" <<CFG
name = "$name"
type = "pv"
memory = 128
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$initrd"
extra = "console=hvc0 rdinit=/init quiet xenci.token=$token"
disk = [ '$(disk_spec xvda rw "$img" "$script")' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
  say "$label: boot a guest"
  xl create "$cfg" || fail "$label: xl create exited $?"
  wait_guest_phase "$name" ready 180
  [ -n "$(loops_of "$img")" ] || fail "$label: no loop device bound while the guest runs"
  say "$label: guest $domid ready; xl $how"
  t=$(now)
  case $how in
    shutdown) xl shutdown -w "$name" || fail "$label: xl shutdown -w exited $?" ;;
    destroy) xl destroy "$name" || fail "$label: xl destroy exited $?" ;;
  esac
  metric "${label}_xl_${how}_s" "$(elapsed "$t")" s
  wait_for "$label: domain $name to be gone" 60 bash -c "! xl domid $name >/dev/null 2>&1"
  wait_for "$label: backend of domain $domid to go" 30 \
    bash -c "! xenstore-exists /local/domain/0/backend/vbd/$domid 2>/dev/null"
  wait_for "$label: no loop device bound" 30 no_loop_for "$img"
  metric "${label}_${how}_to_released_s" "$(elapsed "$t")" s
  [ "$(read_sector "$img" 300)" = "IDLE-GUEST $token" ] || fail "$label: the guest's write is not in the image"
  rm -f "$img"
  say "$label: $how ended the guest; remove ran, nothing bound"
}

modprobe xen-blkback || true
cycle blkback shutdown
cycle blkback destroy

if xenblockctl backend --help >/dev/null 2>&1; then
  without_blkback
  start_engine
  cycle engine shutdown
  cycle engine destroy
fi
rm -f "$initrd"
