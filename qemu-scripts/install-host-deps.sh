#!/usr/bin/env bash
# Installs the Debian packages pviommu needs on the host (build tools for QEMU
# and pylibfdt, Python venv support, the arm64 cross compiler for the guest's
# fio). Only installs what is missing, and says so before it changes anything.
source "$(dirname "$0")/common.sh"

PKGS=(
    # python environment for pviommu and for QEMU's configure
    python3 python3-venv python3-dev
    # QEMU build (ARCHITECTURE.md: QEMU and guest)
    build-essential pkg-config ninja-build libglib2.0-dev libpixman-1-dev
    libfdt-dev flex bison device-tree-compiler dpkg-dev bzip2 xz-utils
    # pylibfdt builds from source with swig
    swig
    # downloads
    ca-certificates debian-archive-keyring curl
    # qemu-storage-daemon: QEMU's own C vhost-user-blk back-end, the benchmark's
    # reference for the vhost-user transport (BENCHMARKS.md)
    qemu-system-common
    # the guest's fio: Debian's fio source cross-built static for arm64
    # (qemu-scripts/fetch-fio.sh)
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross
)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Silent when nothing is missing: ./run and `pviommu setup` both call this.
[ ${#missing[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null || die "apt-get not found: install these packages by hand: ${missing[*]}"
step "installing host packages with apt-get (changes the host): ${missing[*]}"
as_root apt-get update -q
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
