"""PCI functions as the backend presents them to a PCI transport (vfio-user)."""
