# Migration helpers (sourced by scenarios 23 and 24 after lib.sh and pvguest.sh). One PV guest
# (domu/migrate.init) with one rw disk through our script, on a file or on a block device (a loop device
# dom0 sets up by hand over the image, which our script then only opens). The guest writes, says
# "move-me", dom0 moves it to another domain, and the guest reads back and writes again there.
#
#   mig_prepare KIND           KIND: file | blockdev; sets mig_img, mig_target (and mig_admin_loop)
#   mig_boot LABEL             boot, wait for "move-me"; sets mig_src (domid) and mig_src_luid
#   mig_intruder_refused LABEL another guest (another uuid) asking for the disk writable gets busy
#   mig_one_bound LABEL DOMID  exactly one device of the disk is bound, published by DOMID, diskseq == luid
#   mig_finish LABEL DOMID     let the moved guest run, check its data, wait until nothing is bound
#   mig_cleanup                (EXIT trap) destroy every domain of ours, detach the hand-made loop

MIG_NAME=xenci-migrate
MIG_INTRUDER=xenci-intruder
MIG_DEVID=51712
mig_img=$XENCI_WORK/migrate.img
mig_initrd=$XENCI_WORK/migrate-initrd.gz
mig_cfg=$XENCI_WORK/migrate.cfg
mig_target=
mig_admin_loop=
mig_src=
mig_src_luid=
mig_token=

mig_backend() { echo "/local/domain/0/backend/vbd/$1/$MIG_DEVID"; }
mig_node() { xenstore-read "$(mig_backend "$1")/$2" 2>/dev/null || true; }

mig_cleanup() {
  local d
  for d in "$MIG_NAME" "$MIG_NAME--src" "$MIG_NAME--incoming" "$MIG_NAME--migratedaway" "$MIG_INTRUDER"; do
    xl destroy "$d" 2>/dev/null || true
  done
  if [ -n "$mig_admin_loop" ]; then losetup -d "$mig_admin_loop" 2>/dev/null || true; fi
  mig_admin_loop=
}

dump_migration() {
  echo "--- domains"; xl list 2>&1 || true
  echo "--- vbd backends"
  xenstore-ls -f /local/domain/0/backend/vbd 2>&1 \
    | grep -E '/(state|online|opened|physical-device|physical-device-luid|hotplug-status|hotplug-error)' || true
  echo "--- vm nodes"
  for d in $(xenstore-list /local/domain 2>/dev/null); do echo "$d $(xenstore-read "/local/domain/$d/vm" 2>&1)"; done
  echo "--- loops"; losetup -a 2>&1 || true
  if [ -s "${engine_log:-}" ]; then echo "--- engine log"; tail -n 40 "$engine_log"; fi
  echo "--- guest console"
  grep -E 'DOMU|blkfront|xvd|suspend|resum' "$DOMU_CONSOLE_DIR/guest-$MIG_NAME.log" 2>/dev/null | tail -n 30 || true
}

mig_prepare() {
  make_image "$mig_img"
  case $1 in
    file) mig_target=$mig_img ;;
    blockdev)
      mig_admin_loop=$(losetup -f --show "$mig_img") || fail "losetup of the block-device stand-in failed"
      mig_target=$mig_admin_loop
      ;;
    *) fail "mig_prepare: unknown kind $1" ;;
  esac
  [ -f "$mig_initrd" ] || build_domu_initrd "$mig_initrd" "$XENCI_SCENARIOS/domu/migrate.init"
  domu_console_logging
}

# mig_config NAME: a config for NAME with the disk; no uuid= line, so xl gives every `xl create` a new one.
mig_config() {
  cat <<CFG
name = "$1"
type = "pv"
memory = 128
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$mig_initrd"
extra = "console=hvc0 rdinit=/init quiet xenci.token=$mig_token"
disk = [ '$(disk_spec xvda rw "$mig_target" "$script")' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
}

mig_boot() {
  local label=$1 t
  mig_token="tok$RANDOM$RANDOM"
  mig_config "$MIG_NAME" > "$mig_cfg"
  say "$label: boot the guest (target $mig_target)"
  t=$(now)
  xl create "$mig_cfg" || fail "$label: xl create exited $?"
  wait_guest_phase "$MIG_NAME" move-me 240
  metric "${label}_create_to_guest_io_s" "$(elapsed "$t")" s
  mig_src=$domid
  mig_src_luid=$(mig_node "$mig_src" physical-device-luid)
  [ -n "$mig_src_luid" ] || fail "$label: the source backend has no luid"
  mig_one_bound "$label" "$mig_src"
}

# The backends (domid/devid) publishing physical-device PHYS.
mig_publishers() {
  xenstore-ls -f /local/domain/0/backend/vbd 2>/dev/null \
    | sed -n "s@^/local/domain/0/backend/vbd/\([0-9]*/[0-9]*\)/physical-device = \"$1\"\$@\1@p"
}

mig_one_bound() {
  local label=$1 d=$2 luid phys dev loops publishers
  luid=$(mig_node "$d" physical-device-luid)
  phys=$(mig_node "$d" physical-device)
  [ "$(mig_node "$d" hotplug-status)" = connected ] || fail "$label: backend of domain $d is not connected"
  if [ -n "$mig_admin_loop" ]; then
    dev=$mig_admin_loop
    [ "$phys" = "$(stat -L -c '%t:%T' "$dev")" ] || fail "$label: domain $d publishes $phys, not $dev"
    loops=$(loops_of "$mig_img")
    [ "$loops" = "$dev" ] || fail "$label: loop devices on the image besides $dev: '$loops'"
  else
    loops=$(loops_of "$mig_img")
    [ "$(wc -w <<<"$loops")" = 1 ] || fail "$label: expected one loop device on the image, found '${loops:-none}'"
    dev=$loops
  fi
  [ "$(diskseq_hex "$dev")" = "$luid" ] || fail "$label: $dev has diskseq $(diskseq_hex "$dev"), domain $d's luid is $luid"
  publishers=$(mig_publishers "$phys")
  [ "$publishers" = "$d/$MIG_DEVID" ] || fail "$label: backends publishing $phys: '$publishers' (want only $d)"
  say "$label: one device bound: $dev, diskseq == luid $luid, published by domain $d only"
}

# What is running and where it waits, for a create that takes long. (The one lane run that seemed to
# hang here, engine + block device, had run out of the scenario's 900 s budget instead: on a host
# loaded 4-8x, boots took 43-127 s, and the create had had 74 s of its usual 8-15 s x 4-8.)
mig_snapshot() {
  local pid
  echo "--- processes (state, wait channel)"
  ps -eo pid,ppid,stat,wchan:28,etimes,args 2>&1 | grep -vE ' \[[^]]*\]$' | tail -n 60 || true
  for pid in $(pgrep -f 'xl .*create|block-xenblockctl|xenblockctl backend' 2>/dev/null); do
    echo "--- /proc/$pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
    cat "/proc/$pid/stack" 2>/dev/null | head -n 12 || true
  done
  echo "--- backends of the disk"
  xenstore-ls -f /local/domain/0/backend/vbd 2>&1 | grep -E "/vbd/[0-9]+/$MIG_DEVID/" | tail -n 80 || true
  echo "--- xl log of the intruder"; tail -n 20 "/var/log/xen/xl-$MIG_INTRUDER.log" 2>/dev/null || true
  if [ -s "${engine_log:-}" ]; then echo "--- engine log"; tail -n 40 "$engine_log"; fi
}

mig_intruder_refused() {
  local label=$1 rc loops_before out=$XENCI_WORK/intruder.out pid t n=0
  loops_before=$(loops_of "$mig_img" | sort)
  mig_config "$MIG_INTRUDER" > "$XENCI_WORK/intruder.cfg"
  say "$label: another guest asks for the disk writable (must be refused)"
  t=$(now)
  # Into a file, not $(...): a command substitution also waits for every process that inherited
  # the pipe, and a hang must show what libxl printed so far.
  xl -vvv -T create -p "$XENCI_WORK/intruder.cfg" >"$out" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    n=$((n + 1))
    if [ "$n" = 600 ]; then say "$label: xl create still running after 60 s"; mig_snapshot; tail -n 30 "$out"; fi
    if [ "$n" -ge 1800 ]; then
      mig_snapshot
      echo "--- xl create output so far"; tail -n 40 "$out"
      kill "$pid" 2>/dev/null || true
      fail "$label: xl create of the second writer did not return in 180 s"
    fi
    sleep 0.1
  done
  set +e
  wait "$pid"
  rc=$?
  set -e
  metric "${label}_intruder_refused_s" "$(elapsed "$t")" s
  # A $(...) around xl would also wait for whoever inherited its output: name any such process.
  for pid in /proc/[0-9]*; do
    if ls -l "$pid/fd" 2>/dev/null | grep -qF "$out"; then
      echo "still holding xl's output: ${pid#/proc/} $(tr '\0' ' ' <"$pid/cmdline" 2>/dev/null)"
    fi
  done
  # Where its time went (libxl's timestamps, -T): the hotplug script's start and end, and the errors.
  grep -E 'calling hotplug script|hotplug_child_death|libxl: error' "$out" | cut -c1-240 | tail -n 8 || true
  [ "$rc" -ne 0 ] || fail "$label: a second writer with another uuid was accepted"
  grep -q 'script: busy: target already in use writable by ' "$out" \
    || { tail -n 40 "$out"; fail "$label: the second writer was refused, but not by our sharing check"; }
  xl destroy "$MIG_INTRUDER" 2>/dev/null || true
  [ "$(loops_of "$mig_img" | sort)" = "$loops_before" ] || fail "$label: the refused attach changed the image's loops"
}

mig_finish() {
  local label=$1 d=$2 t
  xenstore-write "/local/domain/$d/data/xenci-ack" move-me
  t=$(now)
  wait_guest_phase "$MIG_NAME" done 240
  [ "$domid" = "$d" ] || fail "$label: the guest answered from domain $domid, not $d"
  metric "${label}_resume_to_guest_io_s" "$(elapsed "$t")" s
  xenstore-write "/local/domain/$d/data/xenci-ack" done
  wait_for "$label: domain $MIG_NAME to finish" 120 bash -c "! xl domid $MIG_NAME >/dev/null 2>&1"
  wait_for "$label: backend of domain $d to go" 30 bash -c "! xenstore-exists $(mig_backend "$d") 2>/dev/null"
  if [ -n "$mig_admin_loop" ]; then
    [ "$(loops_of "$mig_img")" = "$mig_admin_loop" ] || fail "$label: our script left a loop device on the image"
    losetup -d "$mig_admin_loop"
    mig_admin_loop=
  fi
  wait_for "$label: no loop device bound to the image" 30 no_loop_for "$mig_img"
  [ "$(read_sector "$mig_img" 300)" = "BEFORE $mig_token" ] || fail "$label: the write before the move is lost"
  [ "$(read_sector "$mig_img" 302)" = "AFTER $mig_token" ] || fail "$label: the write after the move is not in the image"
  [ "$(read_sector "$mig_img" 320)" = "DOMU-REPLY $mig_token ok" ] || fail "$label: the guest's final reply is missing"
  rm -f "$mig_img"
  say "$label: moved guest read its data and wrote after the move; nothing bound"
}
