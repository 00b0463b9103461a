#!/usr/bin/env bash
# Baseline: Xen's own bash `block` script through kernel blkback and blkfront, both in dom0. Proves the
# lane can attach, do I/O and detach before our script is judged on the same steps (04).
# xenci-timeout: 180
. "$XENCI_SCENARIOS/lib.sh"

img=$XENCI_WORK/disk.img
make_image "$img"
attach_rw_cycle xvdb "$img" "" stock_rw
attach_ro_cycle xvdb "$img" "" stock_ro
rm -f "$img"
