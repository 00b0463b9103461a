#!/usr/bin/env bash
# Issue 17, consumer 1 on real Xen: a PV guest whose disk is an NBD export served by the bundled engine
# itself (kernel blkback unloaded, no nbd module, no kernel device). dom0 runs nbdkit on a unix socket;
# the disk spec is `script=block-xenblockctl,target=nbd+unix://...`. Our script sees the engine's claim
# (`opened`=0), negotiates the export and publishes only the owner record kind=nbd (URI, size, flags,
# socket dev:inode:ctime); the engine repeats the handshake, compares, writes `opened`=1 and serves the
# ring over its own NBD connection. The guest writes a pattern and reads it back; after `xl destroy` the
# record is withdrawn, the engine's connection is closed, and another NBD client reads the data back.
# xenci-timeout: 600
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"
. "$XENCI_SCENARIOS/nbdguest.sh"

need_script
xenblockctl backend --help >/dev/null 2>&1 || skip "xenblockctl has no backend command yet"
cleanup() {
  xl destroy "$nbd_name" 2>/dev/null || true
  nbd_stop
  engine_restore
}
trap cleanup EXIT
XENCI_ON_FAIL=dump_vbd

without_blkback
rmmod nbd 2>/dev/null || true
start_engine
nbd_serve
nbd_guest_start
be=/local/domain/0/backend/vbd/$domid/51712
for absent in physical-device physical-device-luid diskseq physical-device-path; do
  if xenstore-exists "$be/$absent" 2>/dev/null; then
    fail "$absent is published for an engine-served export: $(xenstore-read "$be/$absent")"
  fi
done
record=$(xenstore-read "$be/xenblockctl-owner")
case $record in *"kind=nbd "*"uri=nbd+unix://"*"$nbd_sock"*) ;; *) fail "owner record: $record" ;; esac
[ "$(xenstore-read "$be/opened")" = 1 ] || fail "the engine did not write opened=1"
no_nbd_devices || fail "a kernel NBD device exists ($(nbd_devices)): the engine should serve the export itself"
# the engine's own connection to nbdkit (its listener excluded): at least one established
conns=$(( $(ls -l "/proc/$nbdkit_pid/fd" | grep -c 'socket:') - 1 ))
[ "$conns" -ge 1 ] || fail "nbdkit has no client connection while the guest runs"
metric nbdkit_connections "$conns"
say "guest $domid runs on the export through the engine: $record"

t=$(now)
nbd_guest_destroy
metric destroy_to_backend_gone_s "$(elapsed "$t")" s
wait_for "nbdkit's connections to close" 30 bash -c \
  "[ \$(ls -l /proc/$nbdkit_pid/fd | grep -c 'socket:') -le 1 ]"
nbd_guest_check_data
grep -q 'nbd-export-mismatch' "$engine_log" && fail "the engine refused the export: $(grep -m1 nbd-export-mismatch "$engine_log")"
say "guest wrote through the engine -> nbdkit; record withdrawn, connection closed; data read back over NBD"
