# Guest helpers for virtio-blk DMA checks; sourced by scenarios.
# blk_dma DISK READ_BYTES WRITE_OFFSET WRITE_BYTES: reads READ_BYTES from the
# start of the disk and reports their sha256 (READ); writes WRITE_BYTES of random
# data at WRITE_OFFSET, reports their sha256 and the sha256 read back (WRITE), for
# the host to compare with the image file. Direct I/O: every byte crosses the device.
blk_dma() {
    bs=65536
    sum=$(dd if="/dev/$1" bs=$bs count=$(($2 / bs)) iflag=direct 2>/dev/null |
          sha256sum | cut -d' ' -f1)
    mark READ bytes="$2" sha256="$sum"
    dd if=/dev/urandom of=/tmp/payload bs=$bs count=$(($4 / bs)) 2>/dev/null
    wsum=$(sha256sum /tmp/payload | cut -d' ' -f1)
    dd if=/tmp/payload of="/dev/$1" bs=$bs seek=$(($3 / bs)) oflag=direct \
        conv=fsync 2>/dev/null || fail write
    back=$(dd if="/dev/$1" bs=$bs skip=$(($3 / bs)) count=$(($4 / bs)) \
           iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    mark WRITE bytes="$4" offset="$3" sha256="$wsum" readback="$back"
    rm -f /tmp/payload
    [ "$back" = "$wsum" ]
}

# iommu_group_of PCI: marks the function's IOMMU group and its type.
iommu_group_of() {
    dev=/sys/bus/pci/devices/$1
    wait_for "$dev/iommu_group" 30 || fail "no-iommu-group-$1"
    group=$(basename "$(readlink "$dev/iommu_group")")
    mark IOMMU_GROUP pci="$1" group="$group" type="$(cat "/sys/kernel/iommu_groups/$group/type")"
}

# read_until_io_error DISK SECONDS: reads the disk in a loop until a read fails
# (the host takes a mapping away under one), then waits for the kernel's I/O error
# line and marks IO_ERROR. Fails if no read fails within SECONDS.
read_until_io_error() {
    end=$(($(cut -d. -f1 /proc/uptime) + $2))
    failed=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        if ! dd if="/dev/$1" of=/dev/null bs=65536 count=16 iflag=direct 2>/dev/null; then
            failed=1
            break
        fi
    done
    [ "$failed" = 1 ] || fail no-io-error
    n=0
    while ! dmesg | grep -q "I/O error, dev $1"; do
        n=$((n + 1))
        [ "$n" -gt 50 ] && fail no-io-error-in-guest-log
        sleep 0.1
    done
    mark IO_ERROR dev="$1"
}
