#!/usr/bin/env bash
# `xenblockctl doctor` on a real dom0 reports a healthy host (blkback loaded, xenstored reachable, loop
# devices available) and exits 0.
# xenci-timeout: 60
. "$XENCI_SCENARIOS/lib.sh"
xenblockctl --help >/dev/null 2>&1 || fail "xenblockctl does not start in dom0"
xenblockctl doctor --help >/dev/null 2>&1 || skip "xenblockctl has no doctor command yet"
modprobe xen-blkback
xenblockctl doctor || fail "xenblockctl doctor exited $? on a healthy dom0"
