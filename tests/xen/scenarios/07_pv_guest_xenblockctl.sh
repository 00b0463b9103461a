#!/usr/bin/env bash
# Issue 7, scenario 2: the same PV guest with both disks through our installed block-xenblockctl; after the
# guest is gone our `remove` has run and no loop device stays bound.
# xenci-timeout: 300
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"
need_script
pv_guest_cycle "$script" ours
