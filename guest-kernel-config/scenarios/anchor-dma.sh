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

. /lib/pviommu/blk.sh
blk_dma "$DISK" "$READ_BYTES" "$WRITE_OFFSET" "$WRITE_BYTES"
