# Scenario "vsmmu": the guest's arm-smmu-v3 driver programs stage 1 in QEMU's SMMUv3,
# the backend owns stage 2, and drivers do DMA through both. Env (/etc/pviommu.env):
#   ENDPOINTS    PCI names behind the SMMU (e.g. "0000:00:02.0 0000:00:03.0")
#   DISK, READ_BYTES, WRITE_OFFSET, WRITE_BYTES   virtio-blk DMA check
#   RNG_BYTES    bytes to read from /dev/hwrng
#   STEP_WAIT    seconds each host step may take
# Reports the SMMU device and its driver, each endpoint's IOMMU group, the DMA
# checks, then READY. Then, while the host takes an IPA page out of stage 2 under
# a disk read: reads until one fails (IO_ERROR), then reads again and checks the
# data (IO_RECOVERED). Then, while the host makes the disk do a rogue DMA at an
# I/O virtual address the guest never mapped: waits for the stage-1 fault in its
# log (S1_FAULT_SEEN; the event lines are dev_info, so the console level is
# raised to show them), and reads the disk once more (S1_CARRIED_ON).
. /lib/pviommu/blk.sh
. /lib/pviommu/rng.sh
smmu=""
for s in /sys/bus/platform/devices/*.smmuv3; do
    [ -e "$s" ] && smmu=$s
done
[ -n "$smmu" ] || fail no-smmuv3-device
driver=none
[ -e "$smmu/driver" ] && driver=$(basename "$(readlink "$smmu/driver")")
mark SMMU dev="$(basename "$smmu")" driver="$driver" \
    iommu="$(ls /sys/class/iommu | tr '\n' ',' | sed 's/,$//')"
[ "$driver" = arm-smmu-v3 ] || fail arm-smmu-v3-unbound

wait_for "/dev/$DISK" 30 || fail "no-/dev/$DISK"
for ep in $ENDPOINTS; do
    iommu_group_of "$ep"
done
mark DISK dev="$DISK" sectors="$(cat "/sys/block/$DISK/size")" \
    serial="$(cat "/sys/block/$DISK/serial" 2>/dev/null)" \
    pci="$(basename "$(readlink -f "/sys/block/$DISK/device/..")")"
blk_dma "$DISK" "$READ_BYTES" "$WRITE_OFFSET" "$WRITE_BYTES" || fail blk-readback
rng_read "$RNG_BYTES"
first=$(dd if="/dev/$DISK" bs=65536 count=$((READ_BYTES / 65536)) iflag=direct \
        2>/dev/null | sha256sum | cut -d' ' -f1)
mark READY

# Stage 2: read until a read fails (the host unmaps the IPA page under one).
read_until_io_error "$DISK" "$STEP_WAIT"
# The host maps the page back: the same data reads again.
n=0
while :; do
    sum=$(dd if="/dev/$DISK" bs=65536 count=$((READ_BYTES / 65536)) iflag=direct \
          2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$sum" = "$first" ] && break
    n=$((n + 1))
    [ "$n" -gt $((STEP_WAIT * 2)) ] && fail no-recovery
    sleep 0.5
done
mark IO_RECOVERED dev="$DISK" sha256="$sum"

# Stage 1: the host's rogue DMA at an address this guest never mapped.
dmesg -n 7
mark S1_WAIT
n=0
while ! dmesg | grep -q "smmuv3: event 0x10 received"; do
    n=$((n + 1))
    [ "$n" -gt $((STEP_WAIT * 10)) ] && fail no-stage1-fault-in-guest-log
    sleep 0.1
done
sleep 0.5  # the record's lines follow the event line
dmesg -n 4
mark S1_FAULT_SEEN
sum=$(dd if="/dev/$DISK" bs=65536 count=$((READ_BYTES / 65536)) iflag=direct \
      2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$sum" = "$first" ] || fail no-io-after-stage1-fault
mark S1_CARRIED_ON dev="$DISK" sha256="$sum"
true
