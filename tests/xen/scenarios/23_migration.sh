#!/usr/bin/env bash
# xenci-timeout: 900
# xenci-full-timeout: 1500
# Issue 14, item 3: migrating a guest with a writable disk. Live `xl migrate` cannot run on this
# hypervisor (24_migration_live says why), so its storage half is done by hand, exactly: `xl save -p`
# (the source stays paused and keeps its disk), `xl rename` of the source, `xl restore -p` (the
# destination's `add` runs while the source still holds the disk; both domains carry one /vm/<uuid>),
# then destroy the source and unpause the copy. For {kernel blkback, engine} x {file, block device}:
# the destination's writable add is allowed by the same-VM rule, another guest asking for the disk
# writable is refused (busy), after the source is gone exactly one device stays bound with diskseq ==
# luid, and the guest reads what it wrote before the move and writes after it.
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"
. "$XENCI_SCENARIOS/migration.sh"

need_script  # the block script the .deb installed (lib.sh: $script)
trap 'mig_cleanup; engine_restore' EXIT
XENCI_ON_FAIL=dump_migration
saved=$XENCI_WORK/migrate.save

cycle() {
  local consumer=$1 kind=$2 label="$1_$2" t dst vm_src vm_dst dst_luid
  mig_prepare "$kind"
  mig_boot "$label"
  say "$label: guest in domain $mig_src (luid $mig_src_luid); xl save -p, rename, xl restore -p"
  t=$(now)
  xl save -p "$MIG_NAME" "$saved" || fail "$label: xl save -p exited $?"
  xl rename "$MIG_NAME" "$MIG_NAME--src" || fail "$label: xl rename exited $?"
  metric "${label}_save_s" "$(elapsed "$t")" s
  t=$(now)
  xl restore -p "$saved" || fail "$label: xl restore -p exited $? (the destination's add refused?)"
  metric "${label}_restore_s" "$(elapsed "$t")" s
  rm -f "$saved"
  dst=$(xl domid "$MIG_NAME") || fail "$label: no domain $MIG_NAME after restore"
  vm_src=$(xenstore-read "/local/domain/$mig_src/vm")
  vm_dst=$(xenstore-read "/local/domain/$dst/vm")
  [ "$vm_src" = "$vm_dst" ] || fail "$label: source vm $vm_src, destination vm $vm_dst: not a migration's pair"
  [ "$(mig_node "$mig_src" hotplug-status)" = connected ] || fail "$label: the source let go of its disk too early"
  [ "$(mig_node "$dst" hotplug-status)" = connected ] || fail "$label: the destination's disk is not connected"
  dst_luid=$(mig_node "$dst" physical-device-luid)
  if [ "$kind" = file ]; then
    [ "$(loops_of "$mig_img" | wc -l)" = 2 ] || fail "$label: source and destination should each hold a loop device"
    [ "$dst_luid" != "$mig_src_luid" ] || fail "$label: the destination reuses the source's luid $dst_luid"
  fi
  say "$label: both domains ($mig_src paused, $dst restored paused) share $vm_src; destination luid $dst_luid"
  mig_intruder_refused "$label"
  t=$(now)
  xl destroy "$MIG_NAME--src" || fail "$label: xl destroy of the source exited $?"
  wait_for "$label: the source's backend to go" 30 bash -c "! xenstore-exists $(mig_backend "$mig_src") 2>/dev/null"
  if [ "$kind" = file ]; then wait_for "$label: the source's loop device to go" 30 \
    bash -c "[ \"\$(losetup -j '$mig_img' | wc -l)\" = 1 ]"; fi
  metric "${label}_source_released_s" "$(elapsed "$t")" s
  mig_one_bound "$label" "$dst"
  xl unpause "$MIG_NAME" || fail "$label: xl unpause exited $?"
  mig_finish "$label" "$dst"
}

# The engine first: its block-device cycle is where a loaded run once ran out of budget.
if xenblockctl backend --help >/dev/null 2>&1; then
  without_blkback
  start_engine
  cycle engine file
  # A check run (CI's) takes the two diagonal cases (engine + file, blkback + block device): 575 s for
  # all four on a slow 2-core CI machine. The same-VM rule and the refusal do not depend on the
  # consumer; the file and block-device paths each run once per consumer in a full run.
  if full_lane; then cycle engine blockdev; fi
  engine_restore  # stops the engine (nothing of ours is attached now) and loads blkback again
  engine_pid=
else
  say "xenblockctl has no backend command: engine cycles not run"
fi
modprobe xen-blkback || true
if full_lane; then cycle blkback file; fi
cycle blkback blockdev
rm -f "$mig_initrd"
