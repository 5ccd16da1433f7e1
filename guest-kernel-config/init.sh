#!/bin/busybox sh
# pviommu guest init. Lines starting with "@@PVIOMMU " are markers the host
# parses: "@@PVIOMMU NAME key=value ...". Every run ends with a DONE marker and
# a power-off, so the host never waits for a guest that gave up.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

. /lib/pviommu/scenario.sh
fail() { mark FAIL "reason=$*"; mark DONE rc=1; poweroff -f; }

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
