"""Virtio: feature bits, split virtqueues over a DMA space, the device model base."""
