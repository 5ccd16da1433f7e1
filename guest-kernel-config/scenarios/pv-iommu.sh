# Scenario "pv-iommu": the guest's virtio_iommu driver programs the backend's
# PV-IOMMU, and drivers do DMA through it. Env (from /etc/pviommu.env):
#   ENDPOINTS    PCI names behind the IOMMU (e.g. "0000:00:02.0 0000:00:03.0")
#   DISK, READ_BYTES, WRITE_OFFSET, WRITE_BYTES   virtio-blk DMA check (no DISK: none)
#   RNG_BYTES    bytes to read from /dev/hwrng (0: none)
#   FAULT_WAIT   seconds to wait for the host's injected fault (0: do not wait)
#   REVOKE_WAIT  seconds of disk reads while the host revokes a mapping (0: none)
#   HOLD_WAIT    seconds to wait at READY for the host's go-ahead, /tmp/pviommu-go (0: none)
# Reports the virtio-iommu device and its driver, each endpoint's IOMMU group,
# type and reserved regions, the DMA checks, then READY (and, with HOLD_WAIT, waits
# for the host's go-ahead); then the fault steps.
. /lib/pviommu/blk.sh
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

for ep in $ENDPOINTS; do
    iommu_group_of "$ep"
    while read -r start end type; do
        mark RESV pci="$ep" start="$start" end="$end" type="$type"
    done < "/sys/kernel/iommu_groups/$group/reserved_regions"
done

if [ -n "${DISK:-}" ]; then
    wait_for "/dev/$DISK" 30 || fail "no-/dev/$DISK"
    mark DISK dev="$DISK" sectors="$(cat "/sys/block/$DISK/size")" \
        serial="$(cat "/sys/block/$DISK/serial" 2>/dev/null)" \
        pci="$(basename "$(readlink -f "/sys/block/$DISK/device/..")")"
    blk_dma "$DISK" "$READ_BYTES" "$WRITE_OFFSET" "$WRITE_BYTES" || fail blk-readback
fi

if [ "${RNG_BYTES:-0}" -gt 0 ]; then
    wait_for /dev/hwrng 30 || fail no-/dev/hwrng
    current=$(cat /sys/class/misc/hw_random/rng_current)
    got=$(dd if=/dev/hwrng bs=64 count=$((RNG_BYTES / 64)) 2>/dev/null | wc -c)
    distinct=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr ' ' '\n' |
               grep -v '^$' | sort -u | wc -l)
    mark RNG current="$current" bytes="$got" distinct="$distinct"
fi

mark READY
# Hold on until the host has read the IOMMU state it reports (it creates
# /tmp/pviommu-go): the fault steps would change that state under the query.
if [ "${HOLD_WAIT:-0}" -gt 0 ]; then
    wait_for /tmp/pviommu-go "$HOLD_WAIT" || fail no-go-ahead-from-host
fi
if [ "${FAULT_WAIT:-0}" -gt 0 ]; then
    n=0
    while ! dmesg | grep -q "fault from EP"; do
        n=$((n + 1))
        [ "$n" -gt $((FAULT_WAIT * 10)) ] && fail no-fault-in-guest-log
        sleep 0.1
    done
    mark FAULT_SEEN
fi

if [ "${REVOKE_WAIT:-0}" -gt 0 ]; then
    # Read the disk until a read fails: the host revokes the mapping under one.
    mark IO_LOOP
    read_until_io_error "$DISK" "$REVOKE_WAIT"
    # The device and the driver carry on: the next reads succeed.
    dd if="/dev/$DISK" of=/dev/null bs=65536 count=16 iflag=direct 2>/dev/null ||
        fail no-recovery
    mark IO_RECOVERED dev="$DISK"
fi
true
