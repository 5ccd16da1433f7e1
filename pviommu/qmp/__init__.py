"""QMP, the protocol QEMU's monitor speaks, served by our own processes."""

from pviommu.qmp.server import Handler, QmpError, QmpServer

__all__ = ["Handler", "QmpError", "QmpServer"]
