# Scenario "anchor-dma": real DMA through a virtio-blk disk behind an IOMMU.
# Env (from /etc/pviommu.env): DISK, READ_BYTES, WRITE_OFFSET, WRITE_BYTES.
# Reads READ_BYTES from the start of the disk and reports their sha256; writes
# WRITE_BYTES of random data at WRITE_OFFSET and reports their sha256, for the
# host to compare with the image file afterwards.
wait_for "/dev/$DISK" 30 || fail "no-/dev/$DISK"
mark DISK dev="$DISK" sectors="$(cat "/sys/block/$DISK/size")"

pcidev=$(readlink -f "/sys/block/$DISK/device/..")
if [ -e "$pcidev/iommu_group" ]; then
    mark IOMMU_GROUP dev="$DISK" pci="$(basename "$pcidev")" \
        group="$(basename "$(readlink "$pcidev/iommu_group")")"
else
    mark IOMMU_GROUP dev="$DISK" pci="$(basename "$pcidev")" group=none
fi

bs=65536
sum=$(dd if="/dev/$DISK" bs=$bs count=$((READ_BYTES / bs)) iflag=direct 2>/dev/null |
      sha256sum | cut -d' ' -f1)
mark READ bytes="$READ_BYTES" sha256="$sum"

dd if=/dev/urandom of=/tmp/payload bs=$bs count=$((WRITE_BYTES / bs)) 2>/dev/null
wsum=$(sha256sum /tmp/payload | cut -d' ' -f1)
dd if=/tmp/payload of="/dev/$DISK" bs=$bs seek=$((WRITE_OFFSET / bs)) oflag=direct \
    conv=fsync 2>/dev/null || fail write
back=$(dd if="/dev/$DISK" bs=$bs skip=$((WRITE_OFFSET / bs)) count=$((WRITE_BYTES / bs)) \
       iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
mark WRITE bytes="$WRITE_BYTES" offset="$WRITE_OFFSET" sha256="$wsum" readback="$back"
[ "$back" = "$wsum" ]
