#!/bin/busybox sh
# Init of the guest images `pviommu guest-image` writes: loads the image's
# modules in /etc/modules.order (virtio_iommu first), then runs the user's
# script /etc/pviommu/init.sh if the image has one (--init), else a shell on
# the console. The guest powers off when either ends.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

loaded=""
while read -r mod; do
    [ -n "$mod" ] || continue
    if insmod "/lib/modules/$mod.ko"; then
        loaded="$loaded $mod"
    else
        echo "pviommu-guest: insmod $mod failed"
    fi
done < /etc/modules.order
echo "pviommu-guest: modules loaded:${loaded:- none}"
iommu=none
for v in /sys/bus/virtio/devices/*; do
    [ "$(cat "$v/device" 2>/dev/null)" = "0x0017" ] && [ -e "$v/driver" ] &&
        iommu="$(basename "$v") bound to $(basename "$(readlink "$v/driver")")"
done
echo "pviommu-guest: virtio-iommu: $iommu"

cd /root
if [ -f /etc/pviommu/init.sh ]; then
    sh /etc/pviommu/init.sh
    echo "pviommu-guest: /etc/pviommu/init.sh exited with $?; powering off"
else
    echo "pviommu-guest: a shell on the console; 'poweroff -f' ends the guest"
    # cttyhack gives the shell the console as controlling terminal (Ctrl-C works).
    if busybox --list | grep -qx cttyhack; then setsid cttyhack sh -l; else sh -l; fi
fi
poweroff -f
