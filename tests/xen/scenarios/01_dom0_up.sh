#!/usr/bin/env bash
# dom0 is a working Xen host: xl talks to the hypervisor, xenstored serves, the block modules load, and
# the checkout with its dependencies is importable (so later scenarios run the current code).
# xenci-timeout: 120
. "$XENCI_SCENARIOS/lib.sh"

xl info > xl-info.txt || fail "xl info exited $?"
grep -E '^(xen_version|xen_caps|total_memory|nr_cpus)' xl-info.txt
grep -q '^xen_version *: 4\.17' xl-info.txt || fail "xl info does not report Xen 4.17"
xl list | grep -q '^Domain-0 ' || fail "xl list has no Domain-0"

pgrep -x oxenstored >/dev/null || pgrep -x xenstored >/dev/null || fail "no xenstored process"
[ "$(xenstore-read /local/domain/0/name)" = Domain-0 ] || fail "xenstore does not name domain 0"
xenstore-write /local/domain/0/xenci-probe "$XENCI_SCENARIO" || fail "xenstore-write failed"
[ "$(xenstore-read /local/domain/0/xenci-probe)" = "$XENCI_SCENARIO" ] || fail "xenstore read-back differs"
xenstore-rm /local/domain/0/xenci-probe

modprobe xen-blkback || fail "modprobe xen-blkback failed"
[ -d /sys/module/xen_blkback ] || fail "xen_blkback not loaded"
[ -d /sys/bus/xen-backend/drivers/vbd ] || fail "blkback did not register the vbd backend driver"
[ -c /dev/xen/gntdev ] && [ -c /dev/xen/evtchn ] || fail "no /dev/xen/gntdev or /dev/xen/evtchn"

[ -f "$XENCI_CHECKOUT/xenblockctl/__init__.py" ] || fail "checkout not visible at $XENCI_CHECKOUT"
# Any process (xl's hotplug scripts too) must load the checkout's code, not some other copy.
python3 -c '
import os, sys, xenblockctl, click, pyxs, pyudev
print("imports ok:", xenblockctl.__file__, "click", click.__version__)
sys.exit(not xenblockctl.__file__.startswith(os.environ["XENCI_CHECKOUT"] + "/"))
' || fail "cannot import the checkout's xenblockctl and its dependencies in dom0"
say "dom0 up"
