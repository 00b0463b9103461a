#!/usr/bin/env bash
# Issue 15.3: the install of an admin without the .deb. The wheel built from this checkout goes into a
# venv (Debian's pip, offline; the venv sees Debian's click and pyxs), `xenblockctl install-hooks --root` lays the
# host files, and an attach/detach runs through the block script it laid down. That script's interpreter
# is the venv's, so it imports the wheel's package (not the .deb's, which is installed too).
# xenci-timeout: 300
. "$XENCI_SCENARIOS/lib.sh"

[ -f "${XENCI_WHEEL:-}" ] || fail "no wheel staged for this run (XENCI_WHEEL=${XENCI_WHEEL:-})"
venv=$XENCI_WORK/venv
root=$XENCI_WORK/root

t=$(now)
# --without-pip: the venv's own pip (ensurepip) took 142 s of the lane's hour under TCG (ci37), most
# of it byte-compiling pip; Debian's pip (python3-pip, compiled when the image was built), seen
# through --system-site-packages and run by the venv's interpreter, installs into the venv all the same.
python3 -m venv --without-pip --system-site-packages "$venv" || fail "python3 -m venv exited $?"
metric venv_create_s "$(elapsed "$t")" s
t=$(now)
# --ignore-installed: the venv sees the .deb's xenblockctl of the same version in the system
# site-packages, and pip would call that "already satisfied" and install nothing. --no-deps, since
# nothing may be fetched: click and pyxs are Debian's, seen through --system-site-packages.
"$venv/bin/python" -m pip install --no-index --disable-pip-version-check -q --ignore-installed --no-deps "$XENCI_WHEEL" \
  || fail "pip install $(basename "$XENCI_WHEEL") into the venv exited $?"
metric wheel_install_s "$(elapsed "$t")" s
"$venv/bin/python" -c '
import sys, xenblockctl
print("venv imports", xenblockctl.__file__)
sys.exit(not xenblockctl.__file__.startswith(sys.prefix + "/"))
' || fail "the venv does not import the wheel's xenblockctl"

"$venv/bin/xenblockctl" install-hooks --root "$root" > install.txt || fail "install-hooks exited $?"
cat install.txt
grep -q '^installed  *\/etc\/xen\/scripts\/block-xenblockctl$' install.txt || fail "install-hooks did not lay the block script"
"$venv/bin/xenblockctl" install-hooks --root "$root" > again.txt || fail "second install-hooks exited $?"
if grep -v '^unchanged ' again.txt; then fail "a second install-hooks changed files"; fi
# install-hooks has the laid script write its hotplug bundle (blockscript/bundle.py) under the root
[ -f "$root/var/cache/xenblockctl/hotplug.bundle" ] || fail "install-hooks wrote no hotplug bundle"

client=$root/etc/xen/scripts/block-xenblockctl
[ -x "$client" ] || fail "$client is not executable"
case $(head -c4 "$client" | od -An -c | tr -d ' ') in '177ELF') ;; *) fail "$client is not the compiled hotplug client" ;; esac
# The Python script beside the client (the wheel carries the client: setup.py builds it). The attach
# runs it directly: the client would hand the VM start to the running hotplug server, which is the
# .deb's (installed too), not the venv's.
laid=$client.py
[ -x "$laid" ] || fail "$laid is not executable"
case $(head -n1 "$laid") in "#!$venv/bin/python"*) ;; *) fail "$laid runs with $(head -n1 "$laid"), not the venv" ;; esac
# Laid to start without site.py (-S): the venv's site-packages is on its path by the script's own line.
case $(head -n1 "$laid") in *" -S") ;; *) fail "$laid does not start with -S: $(head -n1 "$laid")" ;; esac

img=$XENCI_WORK/disk.img
make_image "$img"
attach_rw_cycle xvdc "$img" "$laid" wheel_rw
rm -f "$img"
# libxl ran the laid script with the host's bundle directory: the .deb's bundle (postinst) was
# written for the .deb's package directory, so the venv's script wrote its own there, root's alone
case $(stat -c '%U %a' /var/cache/xenblockctl/hotplug.bundle 2>&1) in
  "root 644") ;; *) fail "no root-owned 0644 hotplug bundle in /var/cache/xenblockctl after the attach" ;;
esac
say "wheel + install-hooks: attach/detach through the laid script ok"
