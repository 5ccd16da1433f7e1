"""vfio-user: PCI functions served to QEMU's ``vfio-user-pci`` over a UNIX socket."""

from .server import VfioUserServer

__all__ = ["VfioUserServer"]
