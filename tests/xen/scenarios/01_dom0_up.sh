#!/usr/bin/env bash
# dom0 is a working Xen host: xl talks to the hypervisor, xenstored serves, the block modules load, and
# the package built from the checkout for this run is installed and importable.
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

# The package this run built from the checkout is what is installed, and any process (xl's hotplug
# scripts too) loads it from the distribution's path, not from some other copy.
installed=$(dpkg-query -W -f='${Status} ${Version}' xenblockctl) || fail "xenblockctl is not installed"
case $installed in "install ok installed "*) ;; *) fail "xenblockctl package state: $installed" ;; esac
[ "$(dpkg-deb -f "$XENCI_DEB" Version)" = "${installed##* }" ] || fail "installed $installed, built $(basename "$XENCI_DEB")"
say "installed xenblockctl ${installed##* }"
for path in /usr/bin/xenblockctl "$script" /usr/lib/udev/xenblockctl-udev; do
  [ -x "$path" ] || fail "$path missing or not executable"
done
python3 -c '
import sys, xenblockctl, click, pyxs
print("imports ok:", xenblockctl.__file__, "click", click.__version__)
sys.exit(not xenblockctl.__file__.startswith("/usr/lib/python3/dist-packages/"))
' || fail "python3 does not import the packaged xenblockctl and its dependencies"
say "dom0 up"
