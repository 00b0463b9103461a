#!/usr/bin/env bash
# Build the Xen lane's boot files and dom0 disk image into OUT (an empty directory the caller renames
# into the cache when this exits 0). Every file in tests/xen/image/ is part of the cache key.
#
#   build.sh OUT
#
# Environment: XENLANE_MIRROR  optional Debian mirror URL (…/debian); default: Debian's archive
# Needs root (mmdebstrap --mode=root), mmdebstrap, mke2fs.
set -euo pipefail

out=$1
here=$(dirname "$(readlink -f "$0")")
rootfs=$out/rootfs
mkdir -p "$out/boot" "$rootfs"

step() { printf 'XENLANE-BUILD: %s (t=%ss)\n' "$*" "$SECONDS"; }

packages=$(grep -v '^\s*#' "$here/packages" | grep -v '^\s*$' | paste -sd, -)
mirrors=()
if [ -n "${XENLANE_MIRROR:-}" ]; then
  m=${XENLANE_MIRROR%/}
  mirrors=("deb $m bookworm main" "deb ${m%/debian}/debian-security bookworm-security main"
           "deb $m bookworm-updates main")
fi

step "mmdebstrap bookworm ($packages)"
# Docs, man pages and locales are never read in dom0: leaving them out makes mke2fs and the image smaller.
# xenblockctl's own man pages are let through (the rule stays in the image's dpkg config): doctor checks
# that the package installed them.
mmdebstrap --variant=minbase --mode=root --format=directory \
  --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-include=/usr/share/man/man?/*xenblockctl*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='echo xenci-dom0 > "$1/etc/hostname"' \
  --customize-hook="install -m 0755 '$here/xen-ci-init' \"\$1/sbin/xen-ci-init\"" \
  --customize-hook='rm -rf "$1/var/cache/apt/archives/"*.deb "$1/var/lib/apt/lists/"*' \
  bookworm "$rootfs" "${mirrors[@]}"

# No xenblockctl in the image: each run builds the .deb from the checkout on the host and installs it
# in dom0 (tests/xen/guest/run_scenarios.py), offline, so its dependencies must be here already.
step "package dependencies"
chroot "$rootfs" python3 -c 'import click, pyxs, venv; print("deps ok: click", click.__version__)'

step "boot files"
kver=$(basename "$(ls -1 "$rootfs"/boot/vmlinuz-* | sort -V | tail -n1)")
kver=${kver#vmlinuz-}
cp "$rootfs/boot/vmlinuz-$kver" "$out/boot/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$out/boot/initrd.img"
# QEMU's multiboot v1 loader takes the uncompressed ELF, not Debian's gzip.
zcat "$rootfs"/boot/xen-4.17-amd64.gz > "$out/boot/xen.elf"
echo "$kver" > "$out/boot/kernel-version"
chroot "$rootfs" dpkg-query -W -f='${Package} ${Version}\n' > "$out/packages.txt"

step "mke2fs dom0.img"
# -d fills the filesystem from the directory: no loop mount on the build host.
mke2fs -q -t ext4 -L dom0root -d "$rootfs" "$out/dom0.img" 2G
rm -rf "$rootfs"
step "done"
