# Scenario "pv-iommu": the guest's virtio_iommu driver programs the backend's
# PV-IOMMU. Env (from /etc/pviommu.env): ENDPOINT_PCI (e.g. 0000:00:02.0),
# FAULT_WAIT (seconds to wait for the host's injected fault; 0: do not wait).
# Reports the virtio-iommu device and its driver, the endpoint's IOMMU group,
# its type and reserved regions, then READY; the host injects a fault and the
# guest reports when its log shows it.
viommu=""
for v in /sys/bus/virtio/devices/*; do
    [ "$(cat "$v/device" 2>/dev/null)" = "0x0017" ] && viommu=$v
done
[ -n "$viommu" ] || fail no-virtio-iommu-device
driver=none
[ -e "$viommu/driver" ] && driver=$(basename "$(readlink "$viommu/driver")")
mark VIOMMU dev="$(basename "$viommu")" driver="$driver" \
    features="$(cat "$viommu/features")"
[ "$driver" = virtio_iommu ] || fail "virtio-iommu-unbound"

dev=/sys/bus/pci/devices/$ENDPOINT_PCI
wait_for "$dev/iommu_group" 30 || fail "no-iommu-group-$ENDPOINT_PCI"
group=$(basename "$(readlink "$dev/iommu_group")")
g=/sys/kernel/iommu_groups/$group
mark IOMMU_GROUP pci="$ENDPOINT_PCI" group="$group" type="$(cat "$g/type")"
while read -r start end type; do
    mark RESV pci="$ENDPOINT_PCI" start="$start" end="$end" type="$type"
done < "$g/reserved_regions"

mark READY
if [ "${FAULT_WAIT:-0}" -gt 0 ]; then
    n=0
    while ! dmesg | grep -q "fault from EP"; do
        n=$((n + 1))
        [ "$n" -gt $((FAULT_WAIT * 10)) ] && fail no-fault-in-guest-log
        sleep 0.1
    done
    mark FAULT_SEEN
fi
true
