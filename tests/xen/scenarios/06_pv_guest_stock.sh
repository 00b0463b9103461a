#!/usr/bin/env bash
# Baseline for issue 7 scenario 2: a PV guest (xl create) with a rw and a ro disk through Xen's stock
# `block` script: the guest's blkfront reads and writes, and destroy-on-poweroff releases everything.
# xenci-timeout: 300
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"
pv_guest_cycle "" stock
