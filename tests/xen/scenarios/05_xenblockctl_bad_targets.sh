#!/usr/bin/env bash
# Issue 7, scenario 3: attaches our script must refuse (missing image, a directory): xl exits non-zero
# and prints our coded hotplug-error ("<code>: <message>"); nothing is bound; the stale backend entry
# libxl leaves is removed by block-detach, which runs our `remove` on a device whose add failed.
# xenci-timeout: 180
. "$XENCI_SCENARIOS/lib.sh"

need_script

refused() {  # refused VDEV TARGET
  local vdev=$1 target=$2 out rc
  say "attach $vdev -> $target (must fail)"
  set +e
  out=$(xl block-attach 0 "$(disk_spec "$vdev" rw "$target" "$script")" 2>&1)
  rc=$?
  set -e
  printf '%s\n' "$out"
  [ "$rc" -ne 0 ] || fail "xl block-attach of $target exited 0"
  grep -qE 'script: [a-z][a-z0-9-]*: .+' <<<"$out" || fail "xl printed no coded hotplug-error for $target"
  [ -z "$(losetup -a)" ] || { losetup -a; fail "a loop device is bound after the refused $target"; }
  xl block-detach 0 "$vdev" || fail "block-detach of the stale $vdev entry failed (our remove after a failed add?)"
  wait_for "stale $vdev backend to go" 30 test ! -e "/sys/bus/xen-backend/devices/vbd-0-$(vdev_id "$vdev")"
}
vdev_id() { case $1 in xvdb) echo 51728 ;; xvdc) echo 51744 ;; esac; }

refused xvdb "$XENCI_WORK/does-not-exist.img"
mkdir -p "$XENCI_WORK/a-directory"
refused xvdc "$XENCI_WORK/a-directory"
say "bad targets refused with coded errors, nothing left"
