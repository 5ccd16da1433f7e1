#!/usr/bin/env bash
# Builds the guest's fio into the cache and prints FIO=PATH on stdout: a static
# arm64 fio (no shared libraries, no dynamic loader) made from Debian bookworm's
# fio source package with Debian's patches, cross-compiled with Debian's
# gcc-aarch64-linux-gnu and linked against Debian's arm64 libaio.a.
#
# Why not Debian's arm64 fio binary: it links the libraries of every optional
# engine (librbd, librados, libgfapi, libibverbs, libpmem, libnbd, ...), whose
# closure is 63 libraries and 83 MB (31 MB gzipped): about 2 s more boot and 5 s
# more lab start (BENCHMARKS.md, "fio in the guest"). This build keeps the
# engines a block benchmark uses (libaio, io_uring, psync, sync, mmap, posixaio)
# and leaves out those that need other libraries: 2.4 MB, 0.8 MB gzipped.
#
# Idempotent: a cached fio is printed without touching the network; the build
# happens next to its final place and is renamed when complete. Host apt
# configuration is not touched (private lists under the cache).
source "$(dirname "$0")/common.sh"

cache_lock fio
top="$PVIOMMU_CACHE/fio"

for cached in "$top"/*/bin/fio; do
    if [ -x "$cached" ]; then echo "FIO=$cached"; exit 0; fi
done

cross=aarch64-linux-gnu
if ! command -v "$cross-gcc" >/dev/null || [ ! -f "/usr/$cross/lib/libc.a" ]; then
    step "the guest's fio needs Debian's arm64 cross compiler; installing the host packages"
    bash "$(dirname "$0")/install-host-deps.sh"
fi
command -v "$cross-gcc" >/dev/null || die "$cross-gcc not found: install gcc-$cross and libc6-dev-arm64-cross"

private_apt_init "$top/apt" arm64 \
    "deb [arch=arm64 signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR bookworm main" \
    "deb-src [signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR bookworm main"
export APT_CONFIG="$top/apt/apt.conf"
step "updating private package lists for fio (bookworm main, arm64 and sources)"
apt-get -q update >&2 || die "cannot reach $DEBIAN_MIRROR for fio's source; set PVIOMMU_DEBIAN_MIRROR to a reachable Debian mirror"

ver=$(apt-cache showsrc fio 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
[ -n "$ver" ] || die "cannot find the fio source package in bookworm"
dest="$top/$ver"
build="$top/build"
rm -rf "$build" "$dest.partial"
mkdir -p "$build/dl" "$dest.partial/bin"

step "downloading fio $ver (Debian source) and libaio-dev (arm64)"
(cd "$build/dl" && apt-get source --download-only fio >&2 && apt-get download libaio-dev >&2) ||
    die "download of fio's source or libaio-dev failed"
step "unpacking them"
dpkg-source --no-check -x "$build"/dl/fio_*.dsc "$build/src" >&2
dpkg-deb -x "$build"/dl/libaio-dev_*.deb "$build/aio"

step "configuring fio: static, arm64, engines that need other libraries off"
cd "$build/src"
aio="$build/aio/usr"
LDFLAGS="-L$aio/lib/$cross" ./configure --cc="$cross-gcc" --build-static --disable-native \
    --extra-cflags="-I$aio/include" \
    --disable-numa --disable-rdma --disable-rados --disable-rbd --disable-http --disable-gfapi \
    --disable-pmem --disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs \
    > "$dest.partial/configure.txt" 2>&1 || { cat "$dest.partial/configure.txt" >&2; die "fio's configure failed"; }
grep -q '^Linux AIO support *yes' "$dest.partial/configure.txt" || die "fio's configure found no libaio"

jobs=${PVIOMMU_JOBS:-$(nproc)}
step "building fio (make -j$jobs, about 30 s on 2 cores)"
make -j"$jobs" fio >"$build/make.log" 2>&1 || { tail -n 30 "$build/make.log" >&2; die "fio's build failed"; }
"$cross-strip" -o "$dest.partial/bin/fio" fio
if "$cross-readelf" -l "$dest.partial/bin/fio" | grep -q INTERP; then
    die "the fio built is not static"
fi

cd "$top"
rm -rf "$build" "$dest"
mv "$dest.partial" "$dest"
step "fio $ver for the guest: $dest/bin/fio ($(du -h "$dest/bin/fio" | cut -f1))"
echo "FIO=$dest/bin/fio"
