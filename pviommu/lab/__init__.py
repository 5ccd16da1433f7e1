"""The lab: guests people script their own IOMMU tests with (see docs/LAB.md).

This is the beginning of the public API: a lab's :class:`Topology` and its TOML
file format. Names exported here are public and typed (the package ships
``py.typed``); everything else in pviommu is internal.
"""

from ..machine.guest_image import ExtraFile
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
    "DEFAULT_DISK",
    "ENDPOINT_KINDS",
    "IOMMU_KINDS",
    "Endpoint",
    "ExtraFile",
    "Iommu",
    "Placed",
    "Topology",
    "TopologyError",
]
