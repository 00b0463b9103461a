#!/usr/bin/env bash
# Issue 7, scenario 2 for the most common PV setup: a guest booted through pvgrub2 on kernel blkback
# with our block script. pvgrub's blkfront hands the disk to Linux's in the same domain; our script
# turned AUTOCLEAR off once blkback held the loop device, so that hand-over cannot lose the disk. Then
# the same reboot and save/restore steps as scenario 11 (which runs them on the engine). Its boot's
# phases are reported, but they are no measure against 11's: this boot always follows 11's six in the
# dom0; scenario 18 compares the two consumers, alternating.
# xenci-timeout: 1200
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"
. "$XENCI_SCENARIOS/pvgrub.sh"

need_script
trap 'xl destroy "$PVGRUB_NAME" 2>/dev/null || true' EXIT
XENCI_ON_FAIL='dump_vbd; dump_pvgrub_domu'
modprobe xen-blkback || true
[ -d /sys/module/xen_blkback ] || fail "xen-blkback is not loaded"
pvgrub_guest_cycle blkback
