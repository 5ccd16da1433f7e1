"""pviommu: an out-of-process IOMMU device model lab for QEMU Arm virt guests."""

__version__ = "0.1.0"
