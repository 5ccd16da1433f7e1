#!/usr/bin/env bash
# Builds stock QEMU (aarch64-softmmu only) from Debian's source package into
# the cache and prints the path of qemu-system-aarch64 on stdout.
#
# Versions are tried newest known-good first, so one that vanished from the
# archive does not break setup. PVIOMMU_QEMU_VERSIONS overrides the list.
source "$(dirname "$0")/common.sh"

VERSIONS=(${PVIOMMU_QEMU_VERSIONS:-1:10.2.2+ds-1})
JOBS="${PVIOMMU_JOBS:-$(nproc)}"
MESON_VERSION=1.9.0
cache_lock qemu

for full in "${VERSIONS[@]}"; do
    upstream=${full#*:}; upstream=${upstream%%+*}; upstream=${upstream%%-*}
    prefix="$PVIOMMU_CACHE/qemu-$upstream"
    if [ -x "$prefix/bin/qemu-system-aarch64" ]; then
        echo "$prefix/bin/qemu-system-aarch64"
        exit 0
    fi
done

work="$PVIOMMU_CACHE/qemu-src"
got=""
for full in "${VERSIONS[@]}"; do
    step "downloading Debian source package qemu=$full (private apt lists in $work/apt)"
    rm -rf "$work" && mkdir -p "$work"
    private_apt_init "$work/apt" "$(dpkg --print-architecture)" \
        "deb-src [signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR sid main"
    if APT_CONFIG="$work/apt/apt.conf" apt-get -q update >&2 &&
       (cd "$work" && APT_CONFIG="$work/apt/apt.conf" apt-get source --download-only "qemu=$full" >&2); then
        got=$full
        break
    fi
    step "qemu=$full is not downloadable, trying the next version"
done
[ -n "$got" ] || die "none of the QEMU source versions (${VERSIONS[*]}) could be downloaded from $DEBIAN_MIRROR; set PVIOMMU_QEMU_VERSIONS to one the archive has, or PVIOMMU_QEMU to a QEMU >= 10.2 binary"

upstream=${got#*:}; upstream=${upstream%%+*}; upstream=${upstream%%-*}
prefix="$PVIOMMU_CACHE/qemu-$upstream"
step "unpacking qemu $got (upstream sources, Debian patches not applied)"
(cd "$work" && dpkg-source --skip-patches -x ./*.dsc src >&2)
src="$work/src"

# The +ds tarball drops the firmware blobs that pc-bios/meson.build installs;
# meson still wants the files to exist, and we never load them.
step "creating empty placeholders for the firmware blobs removed from the +ds tarball"
python3 - "$src/pc-bios" <<'PY' >&2
import bz2, pathlib, re, sys
pcbios = pathlib.Path(sys.argv[1])
text = (pcbios / "meson.build").read_text()
for name in re.findall(r"'([\w.-]+\.fd)'", text):
    blob = pcbios / (name + ".bz2")
    if not blob.exists():
        blob.write_bytes(bz2.compress(b""))
        print("  placeholder", blob.name)
PY

step "preparing the build's Python (meson $MESON_VERSION, pycotap)"
python3 -m venv "$work/venv" >&2
"$work/venv/bin/pip" install -q "meson==$MESON_VERSION" pycotap >&2

step "configuring QEMU $upstream (aarch64-softmmu)"
mkdir -p "$src/build"
(cd "$src/build" && ../configure --prefix="$prefix" --python="$work/venv/bin/python3" \
    --target-list=aarch64-softmmu --disable-docs --disable-werror \
    --without-default-features --enable-fdt=system --enable-vhost-user \
    --enable-tcg --disable-install-blobs >&2)

step "building QEMU $upstream with $JOBS jobs (a few minutes; ninja shows [done/total])"
ninja -C "$src/build" -j "$JOBS" qemu-system-aarch64 >&2
ninja -C "$src/build" install >&2 >/dev/null
[ -x "$prefix/bin/qemu-system-aarch64" ] || die "QEMU build finished but $prefix/bin/qemu-system-aarch64 is missing"
rm -rf "$work"
step "QEMU $upstream installed in $prefix"
echo "$prefix/bin/qemu-system-aarch64"
