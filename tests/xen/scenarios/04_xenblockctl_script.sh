#!/usr/bin/env bash
# Issue 7, scenario 1: our block script as the package installs it on the kernel blkback path, rw and
# ro, judged by the same steps as the stock script in 02. The rw cycle names it as an admin writes a
# disk spec (`script=block-xenblockctl`: libxl looks in /etc/xen/scripts), the ro cycle by full path.
# xenci-timeout: 240
. "$XENCI_SCENARIOS/lib.sh"

need_script

img=$XENCI_WORK/disk.img
make_image "$img"
attach_rw_cycle xvdb "$img" block-xenblockctl ours_rw
attach_ro_cycle xvdb "$img" "$script" ours_ro
rm -f "$img"
