#!/usr/bin/env bash
# xenci-timeout: 720
# Issue 14, item 2: storage driver domains. A PV domain created with driver_domain=1 (domu/driverdomain.init)
# runs `xl devd -F` with our block script and python package, and serves disks from images in its own
# memory, first with kernel blkback and then with our engine (blkback not loaded there):
#   * a guest whose disks say backend=<dd>,script=block-xenblockctl boots, reads both, writes the rw one,
#     cannot write the ro one; when it is gone our `remove` ran in the driver domain (its console shows
#     it), the backend directories are gone and no loop device stays bound there;
#   * `xenblockctl attach --backend-domain <dd>` into a running guest, rw (and ro in a full run), with
#     the guest reading and writing, then `detach`: the same checks.
# dom0 cannot see the driver domain's files or loop devices: the driver domain answers through xenstore.
. "$XENCI_SCENARIOS/lib.sh"
. "$XENCI_SCENARIOS/pvguest.sh"

need_script  # the block script the .deb installed (lib.sh: $script); the driver domain gets a copy
t=$(now)
xenblockctl backend --help >/dev/null 2>&1 || skip "no engine in this checkout"
say "xenblockctl backend --help took $(elapsed "$t") s"

dd_name=xenci-dd
guest=xenci-dd-guest
attach_guest=xenci-dd-attach
marker="XENCI-IMAGE-MARKER-$XENCI_SCENARIO"
dd_initrd=$XENCI_WORK/dd-initrd.cpio
dd_console=$DOMU_CONSOLE_DIR/guest-$dd_name.log
dd_id=
attach_id=
cleanup() {
  unwatch_dd
  xl destroy "$guest" 2>/dev/null || true
  xl destroy "$attach_guest" 2>/dev/null || true
  xl destroy "$dd_name" 2>/dev/null || true
}
dump_dd() {
  echo "--- driver domain console (last 60 lines)"
  tail -n 60 "$dd_console" 2>/dev/null || true
  if [ -n "$dd_id" ]; then
    echo "--- backends under domain $dd_id"
    xenstore-ls -f "/local/domain/$dd_id/backend" 2>&1 | grep -E '/(state|online|hotplug-status|hotplug-error|physical-device|opened)' | tail -n 30 || true
  fi
  grep 'DOMU:' "$DOMU_CONSOLE_DIR/guest-$guest.log" "$DOMU_CONSOLE_DIR/guest-$attach_guest.log" 2>/dev/null | tail -n 20 || true
}
trap cleanup EXIT
XENCI_ON_FAIL=dump_dd

# --- the driver domain's initramfs ------------------------------------------------------------------------
# Two concatenated cpio archives (the kernel unpacks them in order): a small tree made here (init, busybox,
# the block script, symlinks) and a list of files taken straight from dom0's own tree: the modules, xl and
# python3 with every library they link, and only the python modules our package can import (copying
# the whole stdlib, or even one file at a time, costs minutes under TCG).
# dd_files: that list (relative paths, parent directories first), computed in one python process.
dd_files() {
  python3 - "$@" <<'PY'
import importlib, importlib.util, os, pkgutil, re, site, subprocess, sys
modules, binaries = sys.argv[1].split(), sys.argv[2:]
IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([A-Za-z_][\w.]*)[ \t]+import\b|import[ \t]+([\w., \t]+))", re.M)
import xenblockctl
# runpy: `python3 -m xenblockctl`; __main__ is listed without importing it (that runs the CLI).
names = {"click", "pyxs", "runpy", "encodings.idna", "encodings.ascii", "encodings.latin_1"}
files = {os.path.join(os.path.dirname(os.path.realpath(xenblockctl.__file__)), "__main__.py")}
for mod in pkgutil.walk_packages(xenblockctl.__path__, "xenblockctl."):
    if mod.name.endswith("__main__"):
        continue
    names.add(mod.name)
    spec = importlib.util.find_spec(mod.name)
    if spec and spec.origin and spec.origin.endswith(".py"):
        # every absolute import, at any depth (functions import lazily); a line scan, not ast.walk,
        # which was most of this step's 47 s under TCG (ci37). A match in a docstring only adds a
        # name, and an unimportable one is said and skipped below.
        for found in IMPORT.finditer(open(spec.origin, encoding="utf-8").read()):
            if found[1]:
                names.add(found[1])
            else:
                names.update(part.split()[0] for part in found[2].split(",") if part.strip())
for name in sorted(names - {"__main__"}):
    try:
        importlib.import_module(name)
    except Exception as exc:  # e.g. a module only for another platform
        print(f"not importable here: {name}: {exc}", file=sys.stderr)
for mod in list(sys.modules.values()):
    path = getattr(mod, "__file__", None)
    if not path or not os.path.isfile(path):
        continue
    files.add(os.path.realpath(path))
    if path.endswith(".py"):
        cached = importlib.util.cache_from_source(os.path.realpath(path))
        if os.path.exists(cached):
            files.add(cached)
for where in site.getsitepackages():  # .pth files (dom0's points at the checkout copy)
    if os.path.isdir(where):
        files.update(os.path.join(where, f) for f in os.listdir(where) if f.endswith(".pth"))
files.update(modules)
# Libraries, by the name the loader asks for (often a symlink: then its target too), in their
# canonical directory (Debian's /lib is a symlink to usr/lib, made in the small tree).
linked = binaries + [f for f in files if f.endswith(".so")]
out = subprocess.run(["ldd", *linked], capture_output=True, text=True).stdout
for line in out.splitlines():
    words = line.split()
    if not words or words[0].endswith(":"):  # ldd's "FILE:" header when given several
        continue
    for word in words:
        if word.startswith("/"):
            name = os.path.join(os.path.realpath(os.path.dirname(word)), os.path.basename(word))
            files.add(name)
            files.add(os.path.realpath(word))
files.update(os.path.realpath(b) for b in binaries)
dirs = {os.path.dirname(os.path.realpath(site.__file__)) + "/lib-dynload"}
for path in files:
    d = os.path.dirname(path)
    while d not in ("/", ""):
        dirs.add(d)
        d = os.path.dirname(d)
for path in sorted(dirs) + sorted(files):
    print(path.lstrip("/"))
PY
}
build_dd_initrd() {
  local root xl python mods t0
  t0=$(now)
  root=$(mktemp -d "$XENCI_WORK/dd-root.XXXXXX")
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,var,etc/xen/scripts,usr/bin,usr/sbin,usr/lib,usr/lib64}
  ln -s usr/lib "$root/lib"
  ln -s usr/lib64 "$root/lib64"
  cp /bin/busybox "$root/bin/busybox"
  ln -s /bin/busybox "$root/usr/bin/env"  # the block script's #!/usr/bin/env python3
  cp "$XENCI_SCENARIOS/domu/xs.sh" "$root/xs.sh"
  cp "$XENCI_SCENARIOS/domu/driverdomain.init" "$root/init"
  chmod 0755 "$root/init"
  # Modules in dependency order, as modprobe would load them ("builtin" lines need nothing; without
  # -a, modprobe takes every name after the first for a module parameter).
  modprobe -a --show-depends loop xen-blkback xen-privcmd xen-evtchn xen-gntdev xen-gntalloc xenfs \
    | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' > "$root/modules.order"
  while read -r mod; do
    case $mod in *.ko) ;; *) fail "module $mod is not a plain .ko (busybox insmod cannot load it)" ;; esac
  done < "$root/modules.order"
  [ "$(wc -l < "$root/modules.order")" -ge 6 ] || fail "modprobe named only: $(cat "$root/modules.order")"
  # xl itself (Debian's /usr/sbin/xl is a wrapper script) and python3.
  xl=$(ls /usr/lib/xen-*/bin/xl | head -n 1)
  python=$(readlink -f /usr/bin/python3)
  ln -s "$xl" "$root/usr/sbin/xl"
  ln -s /usr/sbin/xl "$root/bin/xl"
  ln -s "$python" "$root/usr/bin/python3"
  if [ -e /etc/xen/xl.conf ]; then cp /etc/xen/xl.conf "$root/etc/xen/"; fi
  # the hotplug client and the Python script beside it, as the .deb lays them; no hotplug server
  # runs in the driver domain, so the client runs the script (its fallback)
  cp "$script" "$root/etc/xen/scripts/block-xenblockctl"
  cp "$script.py" "$root/etc/xen/scripts/block-xenblockctl.py"
  chmod 0755 "$root/etc/xen/scripts/block-xenblockctl" "$root/etc/xen/scripts/block-xenblockctl.py"
  # and the hotplug bundle the package's postinst writes (debian/xenblockctl.postinst): without it
  # the driver domain's first two adds each compile the whole hotplug graph to write one, at once on
  # its one vCPU, and ran past libxl's 40 s on a slow host (stop 37, ci31: python still running at
  # 20 s, reading our sources)
  [ -f /var/cache/xenblockctl/hotplug.bundle ] || fail "dom0 has no /var/cache/xenblockctl/hotplug.bundle: the postinst wrote none"
  mkdir -p "$root/var/cache/xenblockctl"
  cp -p /var/cache/xenblockctl/hotplug.bundle "$root/var/cache/xenblockctl/"
  mods=$(readlink -f $(cat "$root/modules.order"))
  dd_files "$mods" "$xl" "$python" > "$XENCI_WORK/dd-files"
  say "dd initrd: $(wc -l < "$XENCI_WORK/dd-files") paths from dom0, $(wc -l < "$root/modules.order") modules ($(elapsed "$t0") s)"
  # Uncompressed: gzip under TCG costs more than the larger copy into the domain.
  (cd "$root" && find . | cpio -o -H newc --quiet) > "$dd_initrd"
  (cd / && cpio -o -H newc --quiet < "$XENCI_WORK/dd-files") >> "$dd_initrd"
  rm -rf "$root"
  say "dd initrd: built ($(elapsed "$t0") s)"
}

# --- talking to the domains --------------------------------------------------------------------------------
# wait_ready NAME SECONDS: until NAME writes "0 ok ready" to its data/xenci-phase; sets $ready_id.
wait_ready() {
  local name=$1 limit=$2 start id got=
  start=$(now)
  while :; do
    id=$(xl domid "$name" 2>/dev/null || true)
    if [ -n "$id" ]; then
      got=$(xenstore-read "/local/domain/$id/data/xenci-phase" 2>/dev/null || true)
      case $got in
        "0 ok ready") ready_id=$id; return 0 ;;
        "0 fail: "*) fail "$name says: ${got#0 fail: }" ;;
      esac
    fi
    if awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
      fail "$name not ready within ${limit}s (last '${got:-none}', domain ${id:-none})"
    fi
    sleep 0.2
  done
}
seq=0
# ask DOMID CMD...: write "<id> CMD" to the domain's data/xenci-cmd, wait for "<id> ok ANSWER"; sets $answer.
ask() {
  local id=$1 start got
  shift
  seq=$((seq + 1))
  xenstore-write "/local/domain/$id/data/xenci-cmd" "$seq $*" || fail "cannot write domain $id's command"
  start=$(now)
  while :; do
    got=$(xenstore-read "/local/domain/$id/data/xenci-phase" 2>/dev/null || true)
    case $got in
      "$seq ok"*) answer=${got#"$seq ok"}; answer=${answer# }; return 0 ;;
      "$seq fail: "*) fail "domain $id says: ${got#"$seq fail: "}" ;;
    esac
    if awk -v a="$start" -v b="$(now)" 'BEGIN { exit !(b - a > 120) }'; then
      fail "no answer from domain $id to '$*' within 120 s (last '$got')"
    fi
    sleep 0.2
  done
}
# watch_dd FILE: every change under the driver domain's backend/vbd, stamped with dom0's clock, into
# FILE until unwatch_dd. Timed from dom0, not in the driver domain: a stamping loop there read devd's
# output a byte per syscall on its one vCPU, the vCPU the adds being timed need.
watcher=
watch_dd() {
  # the stamping loop ends at EOF, when unwatch_dd has killed xenstore-watch
  xenstore-watch "/local/domain/$dd_id/backend/vbd" > >(while IFS= read -r path; do echo "$EPOCHREALTIME $path"; done > "$1") &
  watcher=$!
}
unwatch_dd() {
  if [ -n "$watcher" ]; then kill "$watcher" 2>/dev/null || true; fi
  watcher=
}
# dd_adds LABEL FILE: from the first change of the guest's backends (dom0's libxl creating them) to
# the last hotplug-status (the driver domain's libxl, once our add exited), by dom0's clock: the time
# the guest's adds took together (libxl kills each at 40 s; stop 37's CI saw both killed).
dd_adds() {
  local span
  span=$(awk -v root="/local/domain/$dd_id/backend/vbd" '
    $2 == root { next }  # the watch firing once when it is set
    !s { s = $1 }
    $2 ~ /\/hotplug-status$/ { e = $1; n++ }
    $2 ~ /\/physical-device$/ { p++ }
    END { if (n) printf "%.2f %d %d", e - s, n, p }' "$2" 2>/dev/null)
  if [ -z "$span" ]; then
    say "$1: no hotplug-status written under the driver domain's backends"
    return 0
  fi
  set -- "$1" $span
  say "$1: $3 hotplug-status and $4 physical-device writes, $2 s from the first backend node to the last hotplug-status"
  metric "$1_dd_adds_s" "$2" s
}
removes_seen() { grep -c 'removed (' "$dd_console" 2>/dev/null || true; }
# dd_clean LABEL REMOVES_BEFORE N: our remove ran N more times in the driver domain, no backend of it
# is left and no loop device stays bound there.
dd_clean() {
  local label=$1 before=$2 n=$3
  wait_for "$label: $n more 'removed' lines on the driver domain's console" 30 \
    bash -c "[ \$(grep -c 'removed (' '$dd_console' 2>/dev/null || true) -ge $((before + n)) ]"
  # No backend directory left (an emptied guest directory above them does not count).
  wait_for "$label: the driver domain's vbd backends to go" 30 bash -c \
    "! xenstore-ls -f /local/domain/$dd_id/backend 2>/dev/null | grep -q '/state = '"
  ask "$dd_id" loops
  [ "${answer%% *}" = 0 ] || fail "$label: loop devices still bound in the driver domain: $answer"
  # a remove that came after dom0's libxl had removed the backend directory (10 s) detached by tag
  say "$label: remove ran in the driver domain, no backend left, no loop bound there" \
    "($(grep -c 'by its tag' "$dd_console" 2>/dev/null || true) detached by tag so far)"
}
devid_of() {  # xvdb -> 51728
  local letter=${1#xvd}
  echo $((202 * 256 + ($(printf '%d' "'$letter") - 97) * 16))
}

# --- one consumer --------------------------------------------------------------------------------------------
guest_with_dd_disks() {
  local consumer=$1 token="tok$RANDOM$RANDOM" ro_sum t before reply
  ask "$dd_id" md5 ro
  ro_sum=$answer
  before=$(removes_seen)
  cat > "$XENCI_WORK/guest.cfg" <<CFG
name = "$guest"
type = "pv"
memory = 128
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$XENCI_WORK/guest-initrd.gz"
extra = "console=hvc0 rdinit=/init quiet xenci.token=$token"
disk = [ 'format=raw,vdev=xvda,access=rw,backend=$dd_name,script=block-xenblockctl,target=/disk/rw.img',
         'format=raw,vdev=xvdb,access=ro,backend=$dd_name,script=block-xenblockctl,target=/disk/ro.img' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
  watch_dd "$XENCI_WORK/$consumer-watch.log"
  t=$(now)
  xl create "$XENCI_WORK/guest.cfg" || fail "$consumer: xl create of the guest exited $?"
  metric "${consumer}_guest_create_xl_s" "$(elapsed "$t")" s
  wait_for "$consumer: guest $guest to finish" 180 bash -c "! xl domid $guest >/dev/null 2>&1"
  metric "${consumer}_guest_create_to_gone_s" "$(elapsed "$t")" s
  unwatch_dd
  dd_adds "${consumer}_guest" "$XENCI_WORK/$consumer-watch.log"
  # whether the adds ran from the hotplug bundle dom0's postinst wrote (a miss is logged with why),
  # and the driver domain's load and random pool (driverdomain.init logs them every 15 s)
  grep -F -e 'hotplug bundle' -e 'load at uptime' "$dd_console" | tail -n 8 || true
  grep 'DOMU:' "$DOMU_CONSOLE_DIR/guest-$guest.log" 2>/dev/null || true
  dd_clean "$consumer guest" "$before" 2
  ask "$dd_id" sector rw 300
  reply=$answer
  echo "reply: $reply"
  case $reply in "DOMU-REPLY $token "*) ;; *) fail "$consumer: the rw image has no reply from this boot: '$reply'" ;; esac
  grep -qF "rw=$marker " <<<"$reply" || fail "$consumer: the guest did not read the rw disk's marker"
  grep -qF "ro=$marker " <<<"$reply" || fail "$consumer: the guest did not read the ro disk's marker"
  grep -qF "ro_write=refused" <<<"$reply" || fail "$consumer: the guest could write its read-only disk"
  ask "$dd_id" md5 ro
  [ "$answer" = "$ro_sum" ] || fail "$consumer: the read-only image changed"
  say "$consumer: guest with driver-domain disks read both, wrote rw, ro refused"
}

# attach_via_dd CONSUMER MODE VDEV IMG: xenblockctl attach --backend-domain, guest I/O, detach, checks.
attach_via_dd() {
  local consumer=$1 mode=$2 vdev=$3 img=$4 flag=w token="tok$RANDOM$RANDOM" t before sum devid label
  label="${consumer}_attach_$mode"
  [ "$mode" = ro ] && flag=r
  devid=$(devid_of "$vdev")
  ask "$dd_id" md5 "$img"
  sum=$answer
  before=$(removes_seen)
  say "$label: xenblockctl attach $attach_id /disk/$img.img --backend-domain $dd_id --mode $flag --$consumer"
  t=$(now)
  xenblockctl attach "$attach_id" "/disk/$img.img" --vdev "$vdev" --mode "$flag" --backend-domain "$dd_id" \
    "--$consumer" --wait 60 || fail "$label: xenblockctl attach exited $?"
  metric "${label}_s" "$(elapsed "$t")" s
  [ "$(xenstore-read "/local/domain/$attach_id/device/vbd/$devid/state")" = 4 ] || fail "$label: frontend not Connected"
  # Which consumer took it shows in the driver domain's backend directory: our engine writes `opened`.
  if xenstore-exists "/local/domain/$dd_id/backend/vbd/$attach_id/$devid/opened"; then got=engine; else got=kernel; fi
  [ "$got" = "$consumer" ] || fail "$label: served by $got, not $consumer"
  ask "$attach_id" "$vdev" "$mode" "$token"
  say "$label: xenblockctl detach $attach_id $vdev"
  t=$(now)
  xenblockctl detach "$attach_id" "$vdev" || fail "$label: xenblockctl detach exited $?"
  metric "${label}_detach_s" "$(elapsed "$t")" s
  ! xenstore-exists "/local/domain/$attach_id/device/vbd/$devid" 2>/dev/null || fail "$label: frontend dir left"
  dd_clean "$label" "$before" 1
  if [ "$mode" = rw ]; then
    ask "$dd_id" sector "$img" 300
    [ "$answer" = "GUEST-WROTE $token" ] || fail "$label: the guest's write is not in the image ('$answer')"
  else
    ask "$dd_id" md5 "$img"
    [ "$answer" = "$sum" ] || fail "$label: the read-only image changed"
  fi
  say "$label: guest read$([ "$mode" = rw ] && echo ' and wrote'), detached, remove ran in the driver domain"
}

run_consumer() {
  local consumer=$1 t
  cat > "$XENCI_WORK/dd.cfg" <<CFG
name = "$dd_name"
type = "pv"
memory = 512
vcpus = 1
driver_domain = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$dd_initrd"
extra = "console=hvc0 rdinit=/init quiet xenci.consumer=$consumer xenci.marker=$marker"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
  t=$(now)
  xl create "$XENCI_WORK/dd.cfg" || fail "$consumer: xl create of the driver domain exited $?"
  wait_ready "$dd_name" 180
  dd_id=$ready_id
  metric "${consumer}_dd_boot_to_ready_s" "$(elapsed "$t")" s
  say "$consumer: driver domain $dd_id ready"
  t=$(now)
  guest_with_dd_disks "$consumer"
  attach_via_dd "$consumer" rw xvdb arw
  # A read-only disk from the driver domain is checked above (the guest's xvdb, refused a write);
  # its hot-plug twice more (~22 s each) is a full run's, for the check lane's hour (ci37)
  if full_lane; then attach_via_dd "$consumer" ro xvdc aro; fi
  metric "${consumer}_run_s" "$(elapsed "$t")" s
  xenstore-write "/local/domain/$dd_id/data/xenci-cmd" "$((seq += 1)) quit"
  wait_for "driver domain to finish" 60 bash -c "! xl domid $dd_name >/dev/null 2>&1"
}

domu_console_logging
t=$(now)
build_dd_initrd
metric dd_initrd_build_s "$(elapsed "$t")" s
metric dd_initrd_mib "$(( $(stat -c %s "$dd_initrd") / 1048576 ))" MiB
build_domu_initrd "$XENCI_WORK/guest-initrd.gz"
build_domu_initrd "$XENCI_WORK/attach-initrd.gz" "$XENCI_SCENARIOS/domu/attach.init"
cat > "$XENCI_WORK/attach.cfg" <<CFG
name = "$attach_guest"
type = "pv"
memory = 128
vcpus = 1
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$XENCI_WORK/attach-initrd.gz"
extra = "console=hvc0 rdinit=/init quiet"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
xl create "$XENCI_WORK/attach.cfg" || fail "xl create of the attach guest exited $?"
wait_ready "$attach_guest" 180
attach_id=$ready_id
say "attach guest $attach_id running, no disks"

run_consumer kernel
run_consumer engine
xenstore-write "/local/domain/$attach_id/data/xenci-cmd" "$((seq += 1)) quit"
wait_for "attach guest to finish" 60 bash -c "! xl domid $attach_guest >/dev/null 2>&1"
