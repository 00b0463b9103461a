#!/usr/bin/env bash
# xenci-timeout: 900
# Issue 14, item 1: `xenblockctl attach`/`detach` into a running PV guest (the lane used to attach only to
# dom0 itself, so nodes with the wrong owner went unseen: the guest could not write its frontend state).
# The guest (domu/attach.init) boots without disks and serves dom0's commands: for each disk dom0 attaches,
# rw and ro, with kernel blkback and then with the engine, the guest reads dom0's marker, writes through
# the rw disk and fails to write the ro one; dom0 checks the data landed, detaches, and nothing stays
# bound. With blkback, `xl block-attach` attaches the same kinds of disk and every node's permissions
# must equal those `xenblockctl attach` wrote, node by node.
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"

need_script

name=xenci-attach
initrd=$XENCI_WORK/attach-initrd.gz
cfg=$XENCI_WORK/attach.cfg
domid=
dump_attach() {
  [ -n "$domid" ] || return 0
  echo "--- vbd nodes of domain $domid (with permissions)"
  xenstore-ls -fp "/local/domain/$domid/device" 2>&1 | tail -n 40 || true
  xenstore-ls -fp "/local/domain/0/backend/vbd/$domid" 2>&1 | tail -n 40 || true
  grep 'DOMU:' "$DOMU_CONSOLE_DIR/guest-$name.log" 2>/dev/null | tail -n 20 || true
  dmesg | grep -iE 'blkback|vbd' | tail -n 10 || true
}
trap 'xl destroy "$name" 2>/dev/null || true; engine_restore' EXIT
XENCI_ON_FAIL=dump_attach

# perm_table DIR: "<name> <perms>" for DIR itself (".") and every node below it, sorted by name.
perm_table() {
  xenstore-ls -fp "${1%/*}" | awk -v d="$1" '
    $1 == d { print ".", $NF }
    index($1, d "/") == 1 { print substr($1, length(d) + 2), $NF }'
}
# vbd_perms DEVID: the frontend and backend tables, prefixed "fe:"/"be:".
vbd_perms() {
  {
    perm_table "/local/domain/$domid/device/vbd/$1" | sed 's/^/fe:/'
    perm_table "/local/domain/0/backend/vbd/$domid/$1" | sed 's/^/be:/'
  } | LC_ALL=C sort
}
devid_of() {  # xvdb -> 51728
  local letter=${1#xvd}
  echo $((202 * 256 + ($(printf '%d' "'$letter") - 97) * 16))
}

# guest_cmd ID VDEV MODE [TOKEN]: ask the guest to check /dev/VDEV and wait for its verdict.
guest_cmd() {
  local id=$1 start got
  xenstore-write "/local/domain/$domid/data/xenci-cmd" "$*" || fail "cannot write the guest's command"
  start=$(now)
  while :; do
    got=$(xenstore-read "/local/domain/$domid/data/xenci-phase" 2>/dev/null || true)
    case $got in
      "$id ok"*) return 0 ;;
      "$id fail: "*) fail "the guest says: ${got#"$id fail: "}" ;;
    esac
    if awk -v a="$start" -v b="$(now)" 'BEGIN { exit !(b - a > 120) }'; then
      fail "no verdict from the guest for '$*' within 120 s (last '$got')"
    fi
    sleep 0.2
  done
}

seq=0
# ours LABEL CONSUMER MODE VDEV: xenblockctl attach, guest I/O, xenblockctl detach, checks.
ours() {
  local label=$1 consumer=$2 mode=$3 vdev=$4 img=$XENCI_WORK/$1.img t before token devid flag=w
  [ "$mode" = ro ] && flag=r
  devid=$(devid_of "$vdev")
  token="tok$RANDOM$RANDOM"
  make_image "$img"
  before=$(md5sum < "$img")
  say "$label: xenblockctl attach $domid $vdev --mode $flag --$consumer"
  t=$(now)
  xenblockctl attach "$domid" "$img" --vdev "$vdev" --mode "$flag" "--$consumer" --wait 60 \
    || fail "$label: xenblockctl attach exited $?"
  metric "${label}_attach_s" "$(elapsed "$t")" s
  [ "$(xenstore-read "/local/domain/$domid/device/vbd/$devid/state")" = 4 ] || fail "$label: frontend not Connected"
  vbd_perms "$devid" > "$XENCI_WORK/ours-$mode.perms"
  seq=$((seq + 1))
  t=$(now)
  guest_cmd "$seq" "$vdev" "$mode" "$token"
  metric "${label}_guest_io_s" "$(elapsed "$t")" s
  say "$label: xenblockctl detach $domid $vdev"
  t=$(now)
  xenblockctl detach "$domid" "$vdev" || fail "$label: xenblockctl detach exited $?"
  metric "${label}_detach_s" "$(elapsed "$t")" s
  wait_for "$label: no loop device bound" 15 no_loop_for "$img"
  ! xenstore-exists "/local/domain/0/backend/vbd/$domid/$devid" 2>/dev/null || fail "$label: backend dir left"
  ! xenstore-exists "/local/domain/$domid/device/vbd/$devid" 2>/dev/null || fail "$label: frontend dir left"
  if [ "$mode" = rw ]; then
    [ "$(read_sector "$img" 300)" = "GUEST-WROTE $token" ] || fail "$label: the guest's write is not in the image"
  else
    [ "$(md5sum < "$img")" = "$before" ] || fail "$label: the read-only image changed"
  fi
  rm -f "$img"
  say "$label: guest read$([ "$mode" = rw ] && echo ' and wrote'), detached, nothing bound"
}

# theirs MODE VDEV: the same kind of disk through `xl block-attach` (our script, kernel blkback); compare
# every node's permissions with what `xenblockctl attach` wrote for MODE.
theirs() {
  local mode=$1 vdev=$2 img=$XENCI_WORK/xl-$1.img devid token="tok$RANDOM$RANDOM" diffs
  devid=$(devid_of "$vdev")
  make_image "$img"
  say "xl block-attach $domid $vdev $mode"
  xl block-attach "$domid" "$(disk_spec "$vdev" "$mode" "$img" "$script")" || fail "xl block-attach exited $?"
  wait_for "xl's $vdev to connect" 60 bash -c \
    "[ \"\$(xenstore-read /local/domain/0/backend/vbd/$domid/$devid/state 2>/dev/null)\" = 4 ]"
  vbd_perms "$devid" > "$XENCI_WORK/xl-$mode.perms"
  seq=$((seq + 1))
  guest_cmd "$seq" "$vdev" "$mode" "$token"
  xl block-detach "$domid" "$vdev" || fail "xl block-detach exited $?"
  wait_for "no loop device bound to xl's image" 15 no_loop_for "$img"
  rm -f "$img"
  echo "--- node permissions, xenblockctl attach vs xl block-attach ($mode)"
  LC_ALL=C join -a1 -a2 -e MISSING -o 0,1.2,2.2 "$XENCI_WORK/ours-$mode.perms" "$XENCI_WORK/xl-$mode.perms" \
    | awk '{ printf "  %-28s %-14s %-14s %s\n", $1, $2, $3, ($2 == $3 ? "" : "<- differs") }'
  # Nodes both have must carry the same list; a node only one side has is reported, not failed (e.g.
  # what a frontend writes later), unless it is one libxl itself writes.
  diffs=$(LC_ALL=C join -o 0,1.2,2.2 "$XENCI_WORK/ours-$mode.perms" "$XENCI_WORK/xl-$mode.perms" | awk '$2 != $3')
  [ -z "$diffs" ] || fail "$mode: permissions differ from xl block-attach: $(echo $diffs)"
  for node in fe:. fe:backend fe:backend-id fe:state fe:virtual-device fe:device-type fe:trusted \
      be:. be:frontend be:params be:state be:mode be:online be:frontend-id; do
    grep -q "^$node " "$XENCI_WORK/ours-$mode.perms" || fail "$mode: xenblockctl attach did not write $node"
  done
  grep -q "^fe:state (n$domid,r0)$" "$XENCI_WORK/ours-$mode.perms" || fail "$mode: frontend state not (n$domid,r0)"
  grep -q "^be:state (n0,r$domid)$" "$XENCI_WORK/ours-$mode.perms" || fail "$mode: backend state not (n0,r$domid)"
  say "$mode: every node both wrote has xl's permissions"
}

build_domu_initrd "$initrd" "$XENCI_SCENARIOS/domu/attach.init"
domu_console_logging
cat > "$cfg" <<CFG
name = "$name"
type = "pv"
memory = 128
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$initrd"
extra = "console=hvc0 rdinit=/init quiet"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
modprobe xen-blkback || true
t=$(now)
xl create "$cfg" || fail "xl create exited $?"
wait_guest_phase "$name" "0 ok ready" 180
metric boot_to_ready_s "$(elapsed "$t")" s
say "guest $domid running, no disks"

ours blkback_rw kernel rw xvdb
ours blkback_ro kernel ro xvdc
theirs rw xvdd
theirs ro xvde

if xenblockctl backend --help >/dev/null 2>&1; then
  without_blkback
  start_engine
  ours engine_rw engine rw xvdb
  ours engine_ro engine ro xvdc
else
  say "no engine in this checkout: engine half not run"
fi
seq=$((seq + 1))
xenstore-write "/local/domain/$domid/data/xenci-cmd" "$seq quit"
wait_for "domain $name to finish" 60 bash -c "! xl domid $name >/dev/null 2>&1"
rm -f "$initrd"
