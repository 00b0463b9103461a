# A PV guest booted through pvgrub2 (sourced by scenarios after lib.sh and pvguest.sh). GRUB's own
# blkfront reads the kernel and our initramfs from xvda, closes the frontend (state 6, then 1) and hands
# it to Linux's blkfront in the same domain: the frontend reconnect every pvgrub boot does. The guest
# (domu/reconnect.init) then walks through phases with dom0 over xenstore: first I/O, `reboot -f` (xl
# restarts the domain: a new backend), `xl save` + `xl restore` (blkfront resumes on a new backend).
#
#   pvgrub_engine_scenario        a scenario that runs the guest on the engine starts with it: skips
#                                 without the engine, destroys the guest and restores blkback at exit
#   pvgrub_guest_cycle CONSUMER   CONSUMER: engine (started by the caller) or blkback (kernel blkback)
#   pvgrub_first_boot CONSUMER LABEL   the first boot alone (to the guest's first I/O), its phases
#                                      reported as LABEL's, then the guest destroyed
# Every boot's phases also go, one "LABEL PHASE SECONDS" line each, to $PVGRUB_PHASES (a scenario that
# compares boots reads them back: scenario 18).

PVGRUB=/usr/lib/grub-xen/grub-x86_64-xen.bin
PVGRUB_NAME=xenci-pvgrub
# The test sectors sit past GRUB's filesystem (reconnect.init's BASE).
BASE=65536
domid=
PVGRUB_PHASES=$XENCI_WORK/pvgrub-phases.txt

pvgrub_engine_scenario() {
  need_script
  xenblockctl backend --help >/dev/null 2>&1 || skip "xenblockctl has no backend command yet"
  trap pvgrub_engine_cleanup EXIT
  XENCI_ON_FAIL='dump_vbd; dump_pvgrub_domu'
}
pvgrub_engine_cleanup() {
  xl destroy "$PVGRUB_NAME" 2>/dev/null || true
  engine_restore
}

dump_pvgrub_domu() {
  if [ -n "${phase_watch_pid:-}" ]; then kill "$phase_watch_pid" 2>/dev/null || true; fi
  echo "--- guest console"
  grep -E 'DOMU|blkfront|xvd|Freezing|suspend|resum' "$DOMU_CONSOLE_DIR/guest-$PVGRUB_NAME.log" 2>/dev/null | tail -n 40 || true
  xl list 2>&1 || true
}

# wait_phase PHASE SECONDS: wait_guest_phase for this file's guest (sets $domid).
wait_phase() { wait_guest_phase "$PVGRUB_NAME" "$@"; }
ack() { xenstore-write "/local/domain/$domid/data/xenci-ack" "$1"; }
backend() { echo "/local/domain/0/backend/vbd/$domid/51712"; }
backend_node() { xenstore-read "$(backend)/$1" 2>/dev/null || true; }
# The one loop device bound to the image, and its diskseq in the luid's spelling (lowercase hex).
the_loop() {
  local loops
  loops=$(loops_of "$img")
  [ "$(wc -w <<<"$loops")" = 1 ] || fail "expected one loop device on the image, found: '${loops:-none}'"
  echo "$loops"
}

# engine_lines BACKEND PATTERN: how many engine log lines for that backend match.
engine_lines() { grep -c "$1: $2" "$engine_log" || true; }

# blkback_autoclear_off /dev/loopN: our add's deferred job (the warm server's worker after its
# reply, or the script's forked child) turned AUTOCLEAR off once blkback held the device
# (blockscript/autoclear.py) and rewrote the owner record to say so; the pvgrub -> Linux hand-over
# before this check was a frontend reconnect, which the device survived.
blkback_autoclear_off() {
  local record
  record=$(backend_node xenblockctl-owner)
  [ "$(cat "/sys/block/${1#/dev/}/loop/autoclear")" = 0 ] || fail "$1 still has AUTOCLEAR on"
  case " $record " in
    *" autoclear=0 "*) say "$1: AUTOCLEAR off, owner record: $record" ;;
    *) fail "owner record does not say autoclear=0: $record" ;;
  esac
}

# Where a pvgrub boot's time goes (issue 20), for the engine and kernel blkback alike: every vbd
# backend/frontend `state` write, the backend's `physical-device` and `hotplug-status` and the guest's
# data/xenci-phase, stamped with dom0's uptime (the engine log's clock) and dom0's CPU counters
# (/proc/stat, USER_HZ ticks: busy, idle, steal) plus the engine's own CPU, so the boot splits into
# create -> backend Connected (GRUB's frontend) -> GRUB done (its frontend Closing) -> Linux's blkfront
# Initialised -> backend Connected again -> the guest's first I/O; and create -> Connected splits
# again into the backend's InitWait, our script's `physical-device`, its `hotplug-status`, GRUB's
# frontend Initialised (the domain runs once the script is done) and the backend's Connected: which
# of the backend, the script or the connect a difference is in. The stamps come from phase_stamp.py
# (stamped as each event arrives, values read in-process: a shell loop forking xenstore-read per
# event lagged by seconds on a loaded host); this file's marks from phase_mark, in the same format.
# phase_watch_start OUT before `xl create`; phase_watch_report CONSUMER after.
# phase_cpu: dom0's busy/idle/steal ticks and the engine's CPU ticks, with no fork (a mark must not
# wait tens of milliseconds for its own stamp).
phase_cpu() {
  local _c user nice sys idle iowait irq softirq steal _rest eng=- stat f
  read -r _c user nice sys idle iowait irq softirq steal _rest </proc/stat
  if [ -n "${engine_pid:-}" ] && read -r stat 2>/dev/null <"/proc/$engine_pid/stat"; then
    # utime + stime: fields 14 and 15, the 12th and 13th after "pid (comm) "
    read -r -a f <<<"${stat##*) }"
    eng=$((f[11] + f[12]))
  fi
  echo "$((user + nice + sys + irq + softirq)) $((idle + iowait)) $steal $eng"
}
phase_mark() { local up _; read -r up _ </proc/uptime; echo "$up mark $1 $(phase_cpu)" >>"$phase_log"; }
phase_watch_start() {
  local n=0
  phase_log=$1
  : >"$phase_log"
  rm -f "$phase_log.ready"
  # nothing of the stamper holds the scenario's stdout/stderr: a failure never waits on it
  python3 "$XENCI_SCENARIOS/phase_stamp.py" "$phase_log" "${engine_pid:-}" >/dev/null 2>"$phase_log.err" &
  phase_watch_pid=$!
  until [ -e "$phase_log.ready" ]; do
    kill -0 "$phase_watch_pid" 2>/dev/null || fail "the phase stamper exited: $(tail -n 3 "$phase_log.err")"
    n=$((n + 1)); [ $n -le 600 ] || fail "the phase stamper did not set its watch in 60 s"
    sleep 0.1
  done
  phase_mark create
}
# The phases of the first boot, from the log: an XENCI-METRIC per phase (seconds) and, per phase,
# dom0's busy/idle/steal ticks and the engine's CPU ticks (USER_HZ); the same seconds, create -> the
# guest's first I/O as `total` and create -> Connected's parts (`connect_*`), to $PVGRUB_PHASES.
phase_watch_report() {
  local consumer=$1 requests
  # GRUB's requests, from the engine's ring-stopped line for GRUB's ring (blkback: none, unused)
  requests=$(grep -m1 -o "backend/vbd/$domid/51712: ring stopped: [0-9]* requests" "$engine_log" 2>/dev/null \
    | grep -o '[0-9]* requests' | grep -o '[0-9]*' || true)
  sleep 0.5
  kill "$phase_watch_pid" 2>/dev/null || true
  echo "--- $consumer: vbd states and guest phases (dom0 uptime, value, dom0 busy/idle/steal ticks, engine ticks)"
  cat "$phase_log"
  awk -v c="$consumer" -v req="${requests:-0}" -v out="$PVGRUB_PHASES" '
    function at(name) { t[name] = $1; b[name] = $4; i[name] = $5; s[name] = $6; e[name] = $7 }
    function saved(name, seconds) { printf "%s %s %.3f\n", c, name, seconds >>out }
    $2 == "mark" && $3 == "create" { at("create") }
    # create -> Connected, split (informational: its own chain, the phases below are unchanged)
    $2 == "be" && $3 == 2 && !("initwait" in t) { at("initwait") }
    $2 == "pdev" && $3 != "gone" && !("pdev" in t) { at("pdev") }
    $2 == "hotplug" && $3 == "connected" && !("hotplug" in t) { at("hotplug") }
    $2 == "fe" && $3 == 3 && !("grub_connected" in t) && !("grub_init" in t) { at("grub_init") }
    $2 == "be" && $3 == 4 && !("grub_connected" in t) { at("grub_connected"); next }
    $2 == "fe" && ("grub_connected" in t) && !("grub_done" in t) && ($3 == 5 || $3 == 6 || $3 == 1) { at("grub_done"); next }
    $2 == "fe" && ("grub_done" in t) && ($3 == 3 || $3 == 4) && !("linux_init" in t) { at("linux_init"); next }
    $2 == "be" && ("grub_done" in t) && $3 == 4 && !("linux_connected" in t) { at("linux_connected"); next }
    $2 == "phase" && $3 == "connected" && !("guest_io" in t) { at("guest_io") }
    END {
      n = split("create grub_connected grub_done linux_init linux_connected guest_io", p, " ")
      for (k = 2; k <= n; k++) {
        a = p[k - 1]; z = p[k]
        if (!(a in t) || !(z in t)) continue
        eng = (e[z] == "-" || e[a] == "-") ? "-" : e[z] - e[a]
        printf "XENCI-METRIC: %s_phase_%s_s=%.2f s\n", c, z, t[z] - t[a]
        printf "  %-16s %7.2f s  dom0 busy %5d idle %5d steal %5d  engine %s ticks\n", a " -> " z, t[z] - t[a], b[z] - b[a], i[z] - i[a], s[z] - s[a], eng
        saved(z, t[z] - t[a])
      }
      if (("create" in t) && ("guest_io" in t)) saved("total", t["guest_io"] - t["create"])
      line = ""
      n = split("create initwait pdev hotplug grub_init grub_connected", p, " ")
      for (k = 2; k <= n; k++) {
        a = p[k - 1]; z = p[k]
        if (!(a in t) || !(z in t)) continue
        printf "XENCI-METRIC: %s_connect_%s_s=%.2f s\n", c, z, t[z] - t[a]
        line = line sprintf(" %s %.2f", z, t[z] - t[a])
        saved("connect_" z, t[z] - t[a])
      }
      if (line != "") print "  create -> Connected, split (s):" line
      # the engine CPU per GRUB request (ticks are USER_HZ = 100: 10 ms each)
      if (req > 0 && ("grub_done" in t) && ("grub_connected" in t) && e["grub_done"] != "-")
        printf "XENCI-METRIC: %s_grub_engine_cpu_ms_per_request=%.2f ms\n", c, (e["grub_done"] - e["grub_connected"]) * 10 / req
    }' "$phase_log"
}

# dom0's speed at this moment: the CPU a fixed Python loop takes (ms). Under TCG on a loaded host
# it moves with the host's load, and so does every CPU figure of the boot: per-request CPU is
# comparable between boots only next to it.
dom0_speed() {
  metric "${1}_dom0_python_loop_ms" "$(python3 -c 'import time
t = time.process_time()
s = 0
for i in range(200000):
    s += i
print(round((time.process_time() - t) * 1000, 1))')" ms
}

pvgrub_first_boot() { pvgrub_guest_cycle "$1" "$2" first-only; }

pvgrub_guest_cycle() {
  local consumer=$1 label=${2:-$1} only=${3:-} name=$PVGRUB_NAME root t first_domid be luid loop luid2 loop2 luid3
  local img=$XENCI_WORK/pvgrub-$label.img cfg=$XENCI_WORK/pvgrub-$label.cfg saved=$XENCI_WORK/pvgrub-$label.save
  local token="tok$RANDOM$RANDOM"
  [ -f "$PVGRUB" ] || fail "$PVGRUB missing (grub-xen-host is in the image recipe)"
  # xvda: an ext2 filesystem in its first 32 MiB with what pvgrub2's built-in config looks for
  # (/boot/grub/grub.cfg) plus the kernel and our initramfs; dom0's marker at BASE+200.
  root=$(mktemp -d "$XENCI_WORK/pvgrub.XXXXXX")
  mkdir -p "$root/boot/grub"
  cp "/boot/vmlinuz-$(uname -r)" "$root/boot/vmlinuz"
  build_domu_initrd "$root/boot/initrd.gz" "$XENCI_SCENARIOS/domu/reconnect.init"
  cat > "$root/boot/grub/grub.cfg" <<GRUB
linux /boot/vmlinuz console=hvc0 rdinit=/init quiet xenci.token=$token
initrd /boot/initrd.gz
boot
GRUB
  mke2fs -q -t ext2 -b 4096 -L xenci-boot -d "$root" "$img" 32M || fail "mke2fs of the boot disk failed"
  rm -rf "$root"
  truncate -s 64M "$img"
  printf 'XENCI-IMAGE-MARKER-%s' "$XENCI_SCENARIO" | dd of="$img" bs=512 seek=$((BASE + 200)) conv=notrunc,fsync status=none
  domu_console_logging
  cat > "$cfg" <<CFG
name = "$name"
type = "pv"
memory = 128
vcpus = 1
kernel = "$PVGRUB"
disk = [ '$(disk_spec xvda rw "$img" "$script")' ]
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
CFG

  say "create the guest (pvgrub2, one rw disk through our script, consumer: $label)"
  dom0_speed "$label"
  phase_watch_start "$XENCI_WORK/pvgrub-$label-phases.log"
  t=$(now)
  xl create "$cfg" || fail "xl create exited $?"
  metric "create_${label}_pv_xl_s" "$(elapsed "$t")" s
  phase_mark xl-create-returned

  wait_phase connected 480
  metric "${label}_create_to_guest_io_s" "$(elapsed "$t")" s
  phase_watch_report "$label"
  dom0_speed "${label}_after"
  first_domid=$domid
  be=backend/vbd/$domid/51712
  luid=$(backend_node physical-device-luid)
  loop=$(the_loop)
  [ -n "$luid" ] || fail "backend $(backend) has no physical-device-luid"
  [ "$(diskseq_hex "$loop")" = "$luid" ] || fail "$loop diskseq $(diskseq_hex "$loop") != luid $luid"
  [ "$(backend_node state)" = 4 ] || fail "backend not Connected: state $(backend_node state)"
  if [ "$consumer" = engine ]; then
    grep "$be: " "$engine_log" || true
    # GRUB's frontend, then Linux's, on one open device.
    [ "$(engine_lines "$be" 'opened ')" = 1 ] || fail "the engine opened the device more than once"
    [ "$(engine_lines "$be" "opened .* diskseq $luid ")" = 1 ] || fail "the engine opened a device other than luid $luid"
    [ "$(engine_lines "$be" 'connected: ')" = 2 ] || fail "expected two connections (pvgrub, then Linux)"
    [ "$(engine_lines "$be" 'frontend re-initialising')" = 1 ] || fail "the engine did not see the frontend re-initialise"
    # Issue 20: the ring thread sleeps in one blocking read of the event channel, interrupted at stop
    # through a loopback channel on the same fd; the engine warns where Xen refuses that loopback.
    if grep -q "no loopback channel for a blocking wake-up" "$engine_log"; then
      fail "the ring thread fell back to waking by poll: $(grep -m1 'no loopback channel' "$engine_log")"
    fi
  else
    # Kernel blkback says so in dom0's log when a frontend comes back (informational).
    dmesg | grep -E "$be.*(reconnect|Closed|Initi)" | tail -n 4 || true
    blkback_autoclear_off "$loop"
  fi
  say "pvgrub then Linux on one device: domain $domid, $loop, luid $luid"
  if [ "$only" = first-only ]; then
    xl destroy "$name" || fail "xl destroy exited $?"
    wait_for "no loop device bound after the guest is destroyed" 30 no_loop_for "$img"
    rm -f "$img"
    say "$label: first boot measured, guest destroyed"
    return 0
  fi
  ack connected

  say "guest reboot: xl restarts the domain"
  t=$(now)
  wait_phase rebooted 480
  metric "${consumer}_reboot_to_guest_io_s" "$(elapsed "$t")" s
  [ "$domid" != "$first_domid" ] || fail "the domain id did not change across the reboot"
  if xenstore-exists "/local/domain/0/backend/vbd/$first_domid/51712" 2>/dev/null; then
    fail "the first domain's backend is still there"
  fi
  if [ "$consumer" = engine ]; then
    grep -q "$be: released the device" "$engine_log" || fail "the engine did not release the first domain's device"
  fi
  luid2=$(backend_node physical-device-luid)
  loop2=$(the_loop)
  [ "$(diskseq_hex "$loop2")" = "$luid2" ] || fail "after the reboot $loop2 diskseq != luid $luid2"
  [ "$luid2" != "$luid" ] || fail "the reboot reused diskseq $luid: the first loop device was not released"
  [ "$consumer" = engine ] || blkback_autoclear_off "$loop2"
  say "rebooted: domain $domid, $loop2, luid $luid2 (was $luid)"
  ack rebooted

  wait_phase save-me 60
  say "save the guest to a file, then restore it"
  t=$(now)
  xl save "$name" "$saved" || fail "xl save exited $?"
  metric "${consumer}_save_xl_s" "$(elapsed "$t")" s
  wait_for "no loop device bound while the guest is saved" 30 no_loop_for "$img"
  t=$(now)
  xl restore "$saved" || fail "xl restore exited $?"
  metric "${consumer}_restore_xl_s" "$(elapsed "$t")" s
  domid=$(xl domid "$name") || fail "no domain $name after restore"
  luid3=$(backend_node physical-device-luid)
  [ -n "$luid3" ] && [ "$luid3" != "$luid2" ] || fail "restore did not get a fresh device (luid '$luid3')"
  say "restored as domain $domid, luid $luid3"
  rm -f "$saved"
  ack save-me
  wait_phase done 120
  metric "${consumer}_restore_to_guest_io_s" "$(elapsed "$t")" s
  ack done

  wait_for "domain $name to finish" 120 bash -c "! xl domid $name >/dev/null 2>&1"
  wait_for "no loop device bound after the guest is gone" 30 no_loop_for "$img"
  [ "$(read_sector "$img" $((BASE + 300)))" = "FIRST $token" ] || fail "BASE+300 is not in the image"
  [ "$(read_sector "$img" $((BASE + 302)))" = "RESTORED $token" ] || fail "BASE+302 is not in the image"
  [ "$(read_sector "$img" $((BASE + 320)))" = "DOMU-REPLY $token ok" ] || fail "the guest's final reply is not in the image"
  rm -f "$img"
  say "$consumer: one device across pvgrub -> Linux; reboot and save/restore reached the same data; nothing bound"
}
