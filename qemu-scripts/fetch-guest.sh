#!/usr/bin/env bash
# Downloads the guest assets into the cache and prints KEY=PATH lines on stdout:
#   KERNEL=  the arm64 kernel image (Debian bookworm-backports cloud kernel)
#   MODULES= its /lib/modules/VERSION directory
#   CONFIG=  its config file
#   BUSYBOX= a static arm64 busybox
# The kernel version is resolved from the metapackage linux-image-cloud-arm64,
# never hard-coded. Host apt configuration is not touched.
source "$(dirname "$0")/common.sh"

guest="$PVIOMMU_CACHE/guest"
meta=linux-image-cloud-arm64

print_paths() {
    local kdir=$1
    local ver; ver=$(basename "$kdir")
    echo "KERNEL=$kdir/root/boot/vmlinuz-$ver"
    echo "MODULES=$kdir/root/lib/modules/$ver"
    echo "CONFIG=$kdir/root/boot/config-$ver"
    echo "BUSYBOX=$guest/busybox/root/bin/busybox"
}

# Cached? (any unpacked kernel plus busybox)
if [ -x "$guest/busybox/root/bin/busybox" ]; then
    for kdir in "$guest"/kernel/*/; do
        kdir=${kdir%/}
        ver=$(basename "$kdir")
        if [ -f "$kdir/root/boot/vmlinuz-$ver" ]; then print_paths "$kdir"; exit 0; fi
    done
fi

apt_dir="$guest/apt"
private_apt_init "$apt_dir" arm64 \
    "deb [arch=arm64 signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR bookworm main" \
    "deb [arch=arm64 signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR bookworm-backports main"
export APT_CONFIG="$apt_dir/apt.conf"
step "updating private arm64 package lists (bookworm, bookworm-backports)"
apt-get -q update >&2 || die "cannot reach $DEBIAN_MIRROR for the guest packages; set PVIOMMU_DEBIAN_MIRROR, or pass --kernel/--modules"

# The metapackage depends on the versioned kernel package, e.g.
# linux-image-6.12.57+deb12-cloud-arm64-unsigned (or the signed variant).
kpkg=$(apt-cache -t bookworm-backports depends "$meta" 2>/dev/null |
       sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-arm64\(-unsigned\)\?\)$/\1/p' | head -n1)
[ -n "$kpkg" ] || die "cannot resolve the kernel package behind $meta in bookworm-backports"
# Prefer the unsigned build (same kernel, no signing wrapper package).
case "$kpkg" in *-unsigned) ;; *) apt-cache show "$kpkg-unsigned" >/dev/null 2>&1 && kpkg="$kpkg-unsigned" ;; esac
ver=${kpkg#linux-image-}; ver=${ver%-unsigned}

dl="$guest/downloads"
mkdir -p "$dl"
step "downloading $kpkg and busybox-static (arm64)"
(cd "$dl" && apt-get download "$kpkg" busybox-static >&2) || die "download of $kpkg / busybox-static failed"

kdir="$guest/kernel/$ver"
rm -rf "$kdir" "$guest/busybox"
mkdir -p "$kdir" "$guest/busybox"
step "unpacking $kpkg"
dpkg-deb -x "$(ls "$dl"/"${kpkg}"_*.deb | head -n1)" "$kdir/root"
dpkg-deb -x "$(ls "$dl"/busybox-static_*.deb | head -n1)" "$guest/busybox/root"
rm -rf "$dl"
[ -f "$kdir/root/boot/vmlinuz-$ver" ] || die "$kpkg has no /boot/vmlinuz-$ver"
print_paths "$kdir"
