# NBD-export guest helper for shell scenarios 25 (kernel NBD + blkback) and 28 (the engine serves the
# export itself); sourced after lib.sh and pvguest.sh. dom0 runs nbdkit (file plugin) on a unix socket;
# a PV guest (domu/nbd.init) writes a 256 KiB pattern at 1 MiB and a token at sector 300 and reads them
# back; after the guest is gone, nbd_guest_check_data reads both back over a new NBD connection.

nbd_img=$XENCI_WORK/nbd-export.img
nbd_sock=$XENCI_WORK/nbd.sock
nbd_uri="nbd+unix:///?socket=$nbd_sock"
nbd_name=xenci-nbd
nbdkit_pid=
nbd_token=

nbd_devices() { ls -d /sys/block/nbd* 2>/dev/null || true; }
no_nbd_devices() { [ -z "$(nbd_devices)" ]; }

# nbd_read OFFSET LENGTH: bytes of the export read over a new NBD connection by our own client.
nbd_read() {
  python3 - "$nbd_uri" "$1" "$2" <<'PY'
import sys
from xenblockctl.nbd import client, uri
with client.NbdClient.connect(uri.parse(sys.argv[1])) as c:
    sys.stdout.buffer.write(c.read(int(sys.argv[2]), int(sys.argv[3])))
PY
}

# nbd_serve: a fresh image (with the scenario's marker) served by nbdkit on $nbd_sock.
nbd_serve() {
  command -v nbdkit >/dev/null || fail "nbdkit is not in the dom0 image (tests/xen/image/packages)"
  make_image "$nbd_img"
  nbdkit -f -U "$nbd_sock" file "$nbd_img" &
  nbdkit_pid=$!
  wait_for "nbdkit's socket" 30 test -S "$nbd_sock"
  say "nbdkit $(nbdkit --version | head -n1) serves $nbd_img on $nbd_sock"
}
nbd_stop() {
  if [ -n "$nbdkit_pid" ]; then kill "$nbdkit_pid" 2>/dev/null || true; wait "$nbdkit_pid" 2>/dev/null || true; fi
  nbdkit_pid=
}

# nbd_guest_start: create the PV guest on $nbd_uri through our script and wait until it has written and
# read back its data (sets $domid, $nbd_token).
nbd_guest_start() {
  local initrd=$XENCI_WORK/nbd-initrd.gz cfg=$XENCI_WORK/nbd.cfg t
  nbd_token="tok$RANDOM$RANDOM"
  build_domu_initrd "$initrd" "$XENCI_SCENARIOS/domu/nbd.init"
  domu_console_logging
  cat > "$cfg" <<CFG
name = "$nbd_name"
type = "pv"
memory = 160
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$initrd"
extra = "console=hvc0 rdinit=/init quiet xenci.token=$nbd_token"
disk = [ 'format=raw,vdev=xvda,access=rw,script=block-xenblockctl,target=$nbd_uri' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
  cat "$cfg"
  t=$(now)
  xl create "$cfg" || fail "xl create exited $?"
  metric create_xl_s "$(elapsed "$t")" s
  wait_guest_phase "$nbd_name" ready 240
  metric create_to_ready_s "$(elapsed "$t")" s
  rm -f "$initrd"
  [ "$(xenstore-read "/local/domain/$domid/data/xenci-marker")" = "XENCI-IMAGE-MARKER-$XENCI_SCENARIO" ] \
    || fail "the guest did not read the image's marker through NBD"
}

# nbd_guest_destroy: destroy the guest and wait for its backend to go.
nbd_guest_destroy() {
  xl destroy "$nbd_name" || fail "xl destroy exited $?"
  wait_for "domain $nbd_name to be gone" 60 bash -c "! xl domid $nbd_name >/dev/null 2>&1"
  wait_for "backend of domain $domid to go" 30 bash -c "! xenstore-exists /local/domain/0/backend/vbd/$domid 2>/dev/null"
}

# nbd_guest_check_data: the guest's pattern and token, over a new NBD connection and in nbdkit's file.
nbd_guest_check_data() {
  local expect got
  # `yes` dies of SIGPIPE when head has enough: under pipefail that is the pipeline's status
  expect=$( { yes "XENCI-NBD-$nbd_token" || true; } | head -c 262144 | md5sum | cut -d' ' -f1)
  got=$(nbd_read 1048576 262144 | md5sum | cut -d' ' -f1)
  [ "$got" = "$expect" ] || fail "the guest's pattern read over a new NBD connection differs ($got, want $expect)"
  [ "$(nbd_read 153600 512 | tr -d '\0')" = "NBD-GUEST $nbd_token" ] || fail "the guest's token is not in the export"
  [ "$(dd if="$nbd_img" bs=4096 skip=256 count=64 status=none | md5sum | cut -d' ' -f1)" = "$expect" ] \
    || fail "the guest's pattern is not in nbdkit's file"
}
