# Shared helpers for the provisioning scripts. Source it; do not run it.
# shellcheck shell=bash
set -euo pipefail

PVIOMMU_CACHE="${PVIOMMU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pviommu}"
DEBIAN_MIRROR="${PVIOMMU_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_KEYRING="${PVIOMMU_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
mkdir -p "$PVIOMMU_CACHE"

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'pviommu: error: %s\n' "$*" >&2; exit 1; }

# cache_lock NAME: holds an exclusive lock on the cache's NAME until the script
# exits, so that two provisioning runs (two terminals, a test run beside a setup)
# never build or unpack into the same directory at once; the second one waits.
cache_lock() {
    exec 9>"$PVIOMMU_CACHE/.$1.lock"
    if ! flock -n 9; then
        step "another pviommu is provisioning $1; waiting for it"
        flock 9
    fi
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run '$*' (install sudo or run as root)"; fi
}

# private_apt_init DIR ARCH SOURCES_LINE...
# Writes DIR/apt.conf: a private sources list, lists, cache and an empty dpkg
# status, so that the host's apt configuration is left untouched. Use it with
# `APT_CONFIG=DIR/apt.conf apt-get ...` (or apt-cache).
private_apt_init() {
    local dir=$1 arch=$2; shift 2
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    printf '%s\n' "$@" > "$dir/sources.list"
    cat > "$dir/apt.conf" <<CONF
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
Dir::Etc::SourceList "$dir/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$dir/lists";
Dir::Cache "$dir/cache";
Dir::State::status "/dev/null";
Debug::NoLocking "true";
APT::Sandbox::User "$(id -un)";
CONF
}
