"""Launching QEMU Arm virt machines: topology, DTB, guest image, process control."""
