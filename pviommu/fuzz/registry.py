"""The fuzz targets by name: the module holding each ``one_input`` and what it covers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One fuzz target: its name, its module (``pviommu.fuzz.<module>``), what it covers,
    and its largest useful input."""

    name: str
    module: str
    covers: str
    max_len: int = 4096

    def load(self) -> Callable[[bytes], None]:
        """The target's ``one_input``."""
        one_input: Callable[[bytes], None] = importlib.import_module(
            f"pviommu.fuzz.{self.module}").one_input
        return one_input


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("virtqueue", "virtqueue",
           "split virtqueue descriptor chains: loops, out-of-range addresses, huge "
           "lengths, wrong directions, indirect tables; gather/scatter, used ring, "
           "interrupt suppression"),
    Target("viommu", "viommu",
           "virtio-iommu requests (ATTACH, DETACH, MAP, UNMAP, PROBE, malformed) through "
           "the request queue of VirtioIommu over PvIommu, on the loop and the kick-thread "
           "path"),
    Target("vhost-user", "vhost_user",
           "vhost-user front-end messages (with file descriptors) read off a socket and "
           "handled by a VhostUserConnection serving the virtio-iommu"),
    Target("iotlb", "iotlb",
           "vhost-user device IOTLB: IOTLB_MSG UPDATE/INVALIDATE, MISS round trips on the "
           "back-end channel with good, refused and broken replies, lookups"),
    Target("vfio-user", "vfio_user",
           "vfio-user client commands (VERSION, DMA_MAP/UNMAP, region and IRQ commands, "
           "resets) read off a socket and handled by a VfioUserConnection serving a "
           "virtio-rng PCI function"),
    Target("qmp", "qmp",
           "QMP input: the JSON streamer fed in arbitrary chunks, then the server's "
           "session (greeting, negotiation, dispatch) with the PV-IOMMU commands"),
    Target("vmsa", "vmsa",
           "the VMSAv8-64 table walker (stage 1 and 2, 4K/16K/64K granules) on random "
           "tables, against a reference walk"),
)}
