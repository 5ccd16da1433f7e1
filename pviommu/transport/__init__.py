"""Transports that connect QEMU to the backend's devices."""
