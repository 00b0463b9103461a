# PV domU helper for shell scenarios (sourced after lib.sh). The guest is Debian's dom0 kernel with a tiny
# busybox initramfs built here in dom0: it loads blkfront, checks the marker dom0 put on each disk, writes
# a reply to the rw disk, tries to write the ro disk, and powers off. Results come back on the rw disk
# itself (read by dom0 after the domain is gone), the console log only explains failures.

DOMU_CONSOLE_DIR=/var/log/xen/console

# Guest consoles go to files only if xenconsoled was started with --log=guest.
domu_console_logging() {
  pgrep -f 'xenconsoled.*--log=guest' >/dev/null && return 0
  pkill -x xenconsoled || true
  mkdir -p "$DOMU_CONSOLE_DIR"
  /usr/lib/xen-4.17/bin/xenconsoled --log=guest --log-dir="$DOMU_CONSOLE_DIR" --pid-file=/run/xenconsoled.pid
}

# build_domu_initrd OUT.cpio.gz [INIT]: INIT (a file) becomes the guest's /init; without it, the two-disk
# check below. domu/xs.sh (a busybox xenstore client) is always in the image as /xs.sh.
build_domu_initrd() {
  local out=$1 init=${2:-} root kver
  kver=$(uname -r)
  root=$(mktemp -d "$XENCI_WORK/initrd.XXXXXX")
  mkdir -p "$root"/{bin,dev,proc,sys,tmp}
  cp /bin/busybox "$root/bin/busybox"
  cp "/lib/modules/$kver/kernel/drivers/block/xen-blkfront.ko" "$root/xen-blkfront.ko"
  cp "$XENCI_SCENARIOS/domu/xs.sh" "$root/xs.sh"
  if [ -n "$init" ]; then
    cp "$init" "$root/init"
  else
    cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
say() { echo "DOMU: $*"; }
token=$(sed -n 's/.*xenci.token=\([^ ]*\).*/\1/p' /proc/cmdline)
insmod /xen-blkfront.ko || say "insmod blkfront failed"
n=0
while [ ! -b /dev/xvda ] || [ ! -b /dev/xvdb ]; do
  n=$((n + 1)); [ $n -gt 300 ] && break; sleep 0.1
done
ls -l /dev/xvd* 2>&1
sector() { dd if="$1" bs=512 skip="$2" count=1 2>/dev/null | tr -d '\0'; }
rw_marker=$(sector /dev/xvda 200)
ro_marker=$(sector /dev/xvdb 200)
say "xvda marker: $rw_marker"
say "xvdb marker: $ro_marker"
if printf 'MUST-NOT-LAND' | dd of=/dev/xvdb bs=512 seek=400 conv=fsync 2>/dev/null; then ro=ALLOWED; else ro=refused; fi
say "xvdb write $ro"
printf 'DOMU-REPLY %s rw=%s ro=%s ro_write=%s' "$token" "$rw_marker" "$ro_marker" "$ro" \
  | dd of=/dev/xvda bs=512 seek=300 conv=fsync 2>/dev/null
sync
say "done"
poweroff -f
INIT
  fi
  chmod 0755 "$root/init"
  (cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$out"
  rm -rf "$root"
}

# pv_guest_cycle SCRIPT-OR-EMPTY LABEL: boot a PV guest with a rw and a ro disk through SCRIPT (the stock
# block script when empty), check what it saw and wrote, and that nothing stayed bound.
pv_guest_cycle() {
  local script=$1 label=$2 name="xenci-$2" token="tok$RANDOM$RANDOM" rw=$XENCI_WORK/domu-rw.img
  local ro=$XENCI_WORK/domu-ro.img initrd=$XENCI_WORK/domu-initrd.gz cfg=$XENCI_WORK/domu.cfg t ro_sum
  make_image "$rw"
  make_image "$ro"
  ro_sum=$(md5sum < "$ro")
  build_domu_initrd "$initrd"
  domu_console_logging
  cat > "$cfg" <<CFG
name = "$name"
type = "pv"
memory = 192
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$initrd"
extra = "console=hvc0 rdinit=/init quiet xenci.token=$token"
disk = [ '$(disk_spec xvda rw "$rw" "$script")', '$(disk_spec xvdb ro "$ro" "$script")' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
  cat "$cfg"
  t=$(now)
  xl create "$cfg" || fail "xl create exited $?"
  metric "create_${label}_xl_s" "$(elapsed "$t")" s
  wait_for "domain $name to finish" 180 bash -c "! xl domid $name >/dev/null 2>&1"
  metric "create_to_gone_${label}_s" "$(elapsed "$t")" s
  cat "$DOMU_CONSOLE_DIR/guest-$name.log" 2>/dev/null | grep 'DOMU:' || true
  wait_for "no loop device bound to the rw image" 15 no_loop_for "$rw"
  wait_for "no loop device bound to the ro image" 15 no_loop_for "$ro"
  local reply
  reply=$(read_sector "$rw" 300)
  echo "reply: $reply"
  [ -n "$reply" ] || fail "the guest wrote no reply to its rw disk"
  case $reply in "DOMU-REPLY $token "*) ;; *) fail "reply is not from this boot: $reply" ;; esac
  grep -qF "rw=XENCI-IMAGE-MARKER-$XENCI_SCENARIO " <<<"$reply" || fail "guest did not read the rw disk's marker"
  grep -qF "ro=XENCI-IMAGE-MARKER-$XENCI_SCENARIO " <<<"$reply" || fail "guest did not read the ro disk's marker"
  grep -qF "ro_write=refused" <<<"$reply" || fail "the guest could write its read-only disk"
  [ "$(md5sum < "$ro")" = "$ro_sum" ] || fail "the read-only image changed"
  rm -f "$rw" "$ro" "$initrd"
  say "PV guest ok: read both disks, wrote rw, ro refused, nothing bound"
}

# wait_guest_phase NAME PHASE SECONDS: until guest NAME, in whatever domain it now runs, writes PHASE to
# its data/xenci-phase (sets $domid); a "fail: why" there fails the scenario at once.
wait_guest_phase() {
  local guest=$1 want=$2 limit=$3 start got=
  start=$(now)
  while :; do
    domid=$(xl domid "$guest" 2>/dev/null || true)
    if [ -n "$domid" ]; then
      got=$(xenstore-read "/local/domain/$domid/data/xenci-phase" 2>/dev/null || true)
      [ "$got" = "$want" ] && return 0
      case $got in "fail: "*) fail "the guest says: ${got#fail: }" ;; esac
    fi
    if awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
      fail "timed out after ${limit}s waiting for the guest's phase '$want' (last '${got:-none}', domain ${domid:-none})"
    fi
    sleep 0.2
  done
}
