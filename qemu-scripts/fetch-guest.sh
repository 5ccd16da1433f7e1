#!/usr/bin/env bash
# Downloads the guest assets into the cache and prints KEY=PATH lines on stdout:
#   BUSYBOX= a static arm64 busybox (Debian bookworm busybox-static)
#   KERNEL=  the arm64 kernel image (Debian bookworm-backports cloud kernel)
#   MODULES= its /lib/modules/VERSION directory
#   CONFIG=  its config file
# With --busybox-only, only BUSYBOX (for users who bring their own kernel).
# The kernel version is resolved from the metapackage linux-image-cloud-arm64,
# never hard-coded. Host apt configuration is not touched. Each asset is
# unpacked next to its final place and renamed when complete, so an
# interrupted run never leaves a half asset that looks cached.
source "$(dirname "$0")/common.sh"

busybox_only=false
[ "${1:-}" = "--busybox-only" ] && busybox_only=true
cache_lock guest

guest="$PVIOMMU_CACHE/guest"
meta=linux-image-cloud-arm64
busybox="$guest/busybox/root/bin/busybox"

cached_kernel() {
    local kdir ver
    for kdir in "$guest"/kernel/*/; do
        kdir=${kdir%/}; ver=$(basename "$kdir")
        if [ -f "$kdir/root/boot/vmlinuz-$ver" ]; then echo "$kdir"; return 0; fi
    done
    return 1
}

apt_ready=false
apt_setup() {
    $apt_ready && return 0
    private_apt_init "$guest/apt" arm64 \
        "deb [arch=arm64 signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR bookworm main" \
        "deb [arch=arm64 signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR bookworm-backports main"
    export APT_CONFIG="$guest/apt/apt.conf"
    step "updating private arm64 package lists (bookworm, bookworm-backports)"
    apt-get -q update >&2 || die "cannot reach $DEBIAN_MIRROR for the guest packages; set PVIOMMU_DEBIAN_MIRROR to a reachable Debian mirror"
    apt_ready=true
}

# fetch_deb PACKAGE DEST: downloads PACKAGE (arm64) and unpacks it into DEST.
fetch_deb() {
    local pkg=$1 dest=$2 dl="$guest/downloads"
    rm -rf "$dl" "$dest.partial" && mkdir -p "$dl" "$dest.partial"
    step "downloading $pkg (arm64)"
    (cd "$dl" && apt-get download "$pkg" >&2) || die "download of $pkg failed"
    step "unpacking $pkg"
    dpkg-deb -x "$dl"/*.deb "$dest.partial/root"
    rm -rf "$dl" "$dest"
    mv "$dest.partial" "$dest"
}

if [ ! -x "$busybox" ]; then
    apt_setup
    fetch_deb busybox-static "$guest/busybox"
    [ -x "$busybox" ] || die "busybox-static has no /bin/busybox"
fi
echo "BUSYBOX=$busybox"
$busybox_only && exit 0

if ! kdir=$(cached_kernel); then
    apt_setup
    # The metapackage depends on the versioned kernel package, e.g.
    # linux-image-6.12.95+deb12-cloud-arm64-unsigned (or the signed variant).
    kpkg=$(apt-cache -t bookworm-backports depends "$meta" 2>/dev/null |
           sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-arm64\(-unsigned\)\?\)$/\1/p' |
           head -n1)
    [ -n "$kpkg" ] || die "cannot resolve the kernel package behind $meta in bookworm-backports; pass --kernel and --modules to use your own"
    # Prefer the unsigned build (same kernel, no signing wrapper package).
    case "$kpkg" in
        *-unsigned) ;;
        *) apt-cache show "$kpkg-unsigned" >/dev/null 2>&1 && kpkg="$kpkg-unsigned" ;;
    esac
    ver=${kpkg#linux-image-}; ver=${ver%-unsigned}
    kdir="$guest/kernel/$ver"
    fetch_deb "$kpkg" "$kdir"
    [ -f "$kdir/root/boot/vmlinuz-$ver" ] || die "$kpkg has no /boot/vmlinuz-$ver"
fi
ver=$(basename "$kdir")
echo "KERNEL=$kdir/root/boot/vmlinuz-$ver"
echo "MODULES=$kdir/root/lib/modules/$ver"
echo "CONFIG=$kdir/root/boot/config-$ver"
