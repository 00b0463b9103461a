#!/usr/bin/env bash
# Issue 7, scenario 1: our block script (hotplug/block-xenblockctl from the checkout) on the kernel
# blkback path, rw and ro, judged by the same steps as the stock script in 02.
# xenci-timeout: 240
. "$XENCI_SCENARIOS/lib.sh"

script=$XENCI_CHECKOUT/hotplug/block-xenblockctl
[ -e "$script" ] || skip "hotplug/block-xenblockctl not present"
[ -x "$script" ] || fail "$script is not executable"

img=$XENCI_WORK/disk.img
make_image "$img"
attach_rw_cycle xvdb "$img" "$script" ours_rw
attach_ro_cycle xvdb "$img" "$script" ours_ro
rm -f "$img"
