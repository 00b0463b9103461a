#!/usr/bin/env bash
# A hotplug script that fails its `add`: xl must exit non-zero and print the script's hotplug-error text.
# libxl leaves the backend entry behind (it runs no `remove` after a failed add): detach cleans it up.
# xenci-timeout: 120
. "$XENCI_SCENARIOS/lib.sh"

img=$XENCI_WORK/disk.img
script=$XENCI_WORK/failscript
token="xenci-failscript: deliberate failure $RANDOM$RANDOM"
make_image "$img"
cat > "$script" <<SCRIPT
#!/bin/sh
# XENBUS_PATH is relative to the backend domain; prefix it so any xenstored accepts it.
base=/local/domain/0/\$XENBUS_PATH
case "\$1" in
  add)
    xenstore-write "\$base/hotplug-error" "$token" "\$base/hotplug-status" error
    exit 1 ;;
  remove) exit 0 ;;
esac
SCRIPT
chmod 0755 "$script"

set +e
t=$(now)
out=$(xl block-attach 0 "$(disk_spec xvdc rw "$img" "$script")" 2>&1)
rc=$?
set -e
metric attach_failing_xl_s "$(elapsed "$t")" s
printf '%s\n' "$out"
[ "$rc" -ne 0 ] || fail "xl block-attach with a failing script exited 0"
grep -qF "$token" <<<"$out" || fail "xl did not print the script's hotplug-error text"
no_loop_for "$img" || fail "a loop device is bound after the failed add"

# Documented libxl behaviour: the stale entry stays (frontend listed); block-detach removes it.
xl block-list 0
xl block-detach 0 xvdc || xl block-detach -f 0 xvdc || fail "cannot detach the stale xvdc entry"
wait_for "the stale xvdc backend to go" 30 \
  bash -c '! xenstore-ls -f /local/domain/0/backend/vbd/0 2>/dev/null | grep -q "/51744/"'
say "failing script reported, stale entry cleaned"
