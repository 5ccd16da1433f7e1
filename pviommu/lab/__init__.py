"""The lab: guests people script their own IOMMU tests with (see docs/LAB.md).

A :class:`Topology` (in Python or a TOML file) describes the machine; a
:class:`Lab` runs it (``async with Lab(topology) as lab:``): the backend, QEMU
and the guest, a shell in the guest, QMP clients of QEMU and of the backend,
the backend's events and the faults seen. Names exported here are public and
typed (the package ships ``py.typed``); everything else in pviommu is internal.
"""

from ..machine.console import GuestFailed, GuestTimeout
from ..machine.guest_image import ExtraFile
from .backend_process import BackendError
from .lab import BOOT_TIMEOUT, Lab, LabError
from .machine import LabEndpoint
from .shell import CommandFailed, CommandResult, CommandTimeout, GuestShell
from .topology import (
    DEFAULT_DISK,
    ENDPOINT_KINDS,
    IOMMU_KINDS,
    Endpoint,
    Iommu,
    Placed,
    Topology,
    TopologyError,
)

__all__ = [
    "BOOT_TIMEOUT",
    "DEFAULT_DISK",
    "ENDPOINT_KINDS",
    "IOMMU_KINDS",
    "BackendError",
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "Endpoint",
    "ExtraFile",
    "GuestFailed",
    "GuestShell",
    "GuestTimeout",
    "Iommu",
    "Lab",
    "LabEndpoint",
    "LabError",
    "Placed",
    "Topology",
    "TopologyError",
]
