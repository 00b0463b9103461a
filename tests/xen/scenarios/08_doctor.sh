#!/usr/bin/env bash
# `xenblockctl doctor` on a real dom0 with the package installed by apt reports a healthy host (blkback
# loaded, xenstored reachable, loop devices available) and a clean installation: the block script libxl
# runs (the hotplug client) and its Python script, the hotplug server answering, attach.script, the udev rules and hook, the units, blkback's meaning, the man
# pages. Then a broken script is found, with its fix, and the install is put back.
# xenci-timeout: 120
. "$XENCI_SCENARIOS/lib.sh"
xenblockctl --help >/dev/null 2>&1 || fail "xenblockctl does not start in dom0"
modprobe xen-blkback
xenblockctl doctor || fail "xenblockctl doctor exited $? on a healthy dom0"

xenblockctl doctor --json > doctor.json || fail "xenblockctl doctor --json exited $?"
python3 - doctor.json <<'PY' || fail "doctor does not find the installed package clean"
import json, sys
doc = json.load(open(sys.argv[1]))
install = [
    "block-script", "script-import", "hotplug-client", "hotplug-server",
    "attach-script", "udev-rules", "udev-hook", "units", "blkback", "man-pages",
]
found = {f["check"]: f for f in doc["findings"]}
bad = 0
for check in install:
    f = found.get(check)
    print(f"{check}: {f['status'] if f else 'MISSING'}: {f['message'] if f else ''}")
    # units: attach.backend=auto with blkback loaded, so the engine unit is not needed (info).
    bad += f is None or f["status"] not in ("ok", "info")
# the package enabled the warm hotplug server (the runner started it as at boot) and laid the client
for check in ("hotplug-client", "hotplug-server"):
    bad += found.get(check, {}).get("status") != "ok"
sys.exit(1 if bad else 0)
PY

# A script laid by a Python without the package: doctor names it and the fix; the .deb's is restored
# (-p: the same mtime and size, so the hotplug server's stamps still match it). The script is the
# Python one beside the client: the client runs it when no server answers.
script=$script.py
cp -p "$script" script.orig
trap 'cp -p "$XENCI_WORK/script.orig" "$script"' EXIT
sed -i '1s|.*|#!/nonexistent/python3|' "$script"
if xenblockctl doctor > broken.txt; then cat broken.txt; fail "doctor exited 0 with a broken block script"; fi
cat broken.txt
grep -q '^error    script-import .*its interpreter /nonexistent/python3 does not exist' broken.txt \
  || fail "doctor did not report the broken interpreter"
cp -p script.orig "$script"
xenblockctl doctor >/dev/null || fail "doctor not clean again after restoring the script"
say "doctor: healthy host and a clean installation"
