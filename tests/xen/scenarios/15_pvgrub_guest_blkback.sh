#!/usr/bin/env bash
# Issue 7, scenario 2 for the most common PV setup: a guest booted through pvgrub2 on kernel blkback
# with our block script. pvgrub's blkfront hands the disk to Linux's in the same domain; our script
# turned AUTOCLEAR off once blkback held the loop device, so that hand-over cannot lose the disk. Then,
# in a full run, the same reboot and save/restore steps as scenario 11 (which runs them on the engine). Its boot's
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
# A check run (CI) boots once: pvgrub's hand-over on kernel blkback, what no other scenario has. The
# reboot and save/restore on kernel blkback (~70 s of CI's lane, ci37) are a full run's: 13 ends
# blkback guests both ways, 23 saves and restores one on a block device, 11 runs this cycle whole.
if full_lane; then pvgrub_guest_cycle blkback; else pvgrub_first_boot blkback blkback; fi
