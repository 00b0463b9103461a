#!/usr/bin/env bash
# Issue 7, scenario 4 with a real guest: the bundled engine (kernel blkback unloaded) serves a PV domU
# through our block script, and the guest's disk survives every way a frontend goes and comes back:
#   1. in-domain reconnect: the domain boots pvgrub2, whose own blkfront reads the kernel from xvda, closes
#      the frontend and hands it to Linux (state 6, then 1), whose blkfront connects again. The engine
#      must hold the device all along (one open, same loop device, same diskseq) and serve both;
#   2. guest reboot: xl restarts the domain (new domain id, new backend): our remove and add ran, the
#      engine serves a new loop device with a new diskseq, and the data is there;
#   3. save/restore: the guest is saved to a file (domain gone, nothing bound) and restored into a new
#      domain; blkfront resumes on the new backend and the guest goes on reading and writing.
# The guest (domu/reconnect.init) and this script step through named phases over xenstore.
# The engine's variants are compared here, boot against boot in one dom0; the engine against kernel
# blkback is scenario 18's (this file's first boot is the dom0's first pvgrub boot, the slowest).
# A check run (CI) runs the cycle; the pure-Python, wake-up and loop A/B boots are measurements: a full
# run's only (XENBLOCKCTL_XEN_LANE=full; 547 s in all on a slow host, 2026-12-06; scenario 12's check
# run serves blkfront on the pure-Python pass).
# xenci-timeout: 600
# xenci-full-timeout: 2100
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"
. "$XENCI_SCENARIOS/pvgrub.sh"

pvgrub_engine_scenario
without_blkback
start_engine
pvgrub_guest_cycle engine
full_lane || exit 0
# The same first boot on the pure-Python pass, in the same dom0 minutes later (issue 20: what the
# native grant-copy pass saves, with the host's load as alike as one boot can make it). No backend is
# left, so the engine can be replaced.
stop_engine
start_engine --no-native
pvgrub_first_boot engine engine_python
# The ring thread's wake-up A/B (issue 20), native pass both times, in the same dom0 one after the
# other: poll() on the event channel and a stop pipe then a late read (--poll-wakeup), against one
# blocking read (the default). GRUB pays one wake-up per request.
restart_engine() {
  stop_engine
  start_engine "$@"
}
restart_engine --poll-wakeup
pvgrub_first_boot engine engine_poll
restart_engine
pvgrub_first_boot engine engine_read
# The native wait-and-serve loop's A/B (issue 20), blocking wake-up and native pass both times, back to
# back: a Python turn per wake-up (--no-native-loop), against the loop (the default, as engine_read).
restart_engine --no-native-loop
pvgrub_first_boot engine engine_noloop
restart_engine
pvgrub_first_boot engine engine_loop
