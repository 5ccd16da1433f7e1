#!/bin/busybox sh
# pviommu guest init. Lines starting with "@@PVIOMMU " are markers the host
# parses: "@@PVIOMMU NAME key=value ...". Every run ends with a DONE marker and
# a power-off, so the host never waits for a guest that gave up.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

mark() { echo "@@PVIOMMU $*"; }
fail() { mark FAIL "reason=$*"; mark DONE rc=1; poweroff -f; }

# wait_for PATH SECONDS: polls for a file to appear.
wait_for() {
    n=0
    while [ ! -e "$1" ]; do
        n=$((n + 1))
        [ "$n" -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
}

mark BOOTED uptime="$(cut -d' ' -f1 /proc/uptime)"
[ -f /etc/pviommu.env ] && . /etc/pviommu.env
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod.ko" || fail "insmod-$mod"
done < /etc/modules.order
mark MODULES_LOADED

. /scenario.sh
rc=$?
mark DONE rc=$rc
poweroff -f
