"""The backend's DMA endpoints: virtio devices on PCI functions served over vfio-user.

Each endpoint has its own vfio-user socket, its own DMA-map table (the guest
memory QEMU hands over with DMA_MAP) and an endpoint ID, the PCI requester ID
QEMU gives it on the bus. Its DMA space is its PV-IOMMU domain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .devices.blk import VirtioBlk
from .devices.rng import VirtioRng
from .dma import DmaSpace
from .memory import GuestMemory
from .transport.vfio_user.server import VfioUserServer
from .virtio.device import VirtioDevice
from .virtio.pci import VirtioPciFunction

KINDS = ("blk", "rng")


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint device: its kind, vfio-user socket, endpoint ID and options."""

    kind: str
    socket: Path
    endpoint: int
    image: Path | None = None
    read_only: bool = False
    serial: str = "pviommu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown endpoint kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.kind == "blk" and self.image is None:
            raise ValueError("a blk endpoint needs an image file")
        if self.kind == "blk" and not Path(self.image).is_file():  # type: ignore[arg-type]
            raise ValueError(f"blk image {self.image} is not a file")


def make_device(spec: EndpointSpec) -> VirtioDevice:
    """The virtio device model of ``spec``."""
    if spec.kind == "blk":
        assert spec.image is not None
        return VirtioBlk(spec.image, read_only=spec.read_only, serial=spec.serial)
    return VirtioRng()


class Endpoint:
    """A running endpoint: device, PCI function, DMA-map table, vfio-user server."""

    def __init__(self, spec: EndpointSpec,
                 dma_factory: Callable[[int, GuestMemory], DmaSpace]) -> None:
        self.spec = spec
        self.memory = GuestMemory()
        self.dma: DmaSpace = dma_factory(spec.endpoint, self.memory)
        self.device = make_device(spec)
        self.function = VirtioPciFunction(self.device, self.dma)
        self.server = VfioUserServer(spec.socket, self.function, self.memory,
                                     name=f"{spec.kind}@{spec.endpoint:#x}")

    async def start(self) -> None:
        """Listens on the endpoint's vfio-user socket."""
        await self.server.start()

    async def close(self) -> None:
        """Stops serving, closes the device's backing file."""
        await self.server.close()
        if isinstance(self.device, VirtioBlk):
            self.device.close()
        self.memory.clear()

    def state(self) -> dict[str, Any]:
        """What QMP reports about the endpoint."""
        return {"id": self.spec.endpoint, "kind": self.spec.kind,
                "socket": str(self.spec.socket),
                "image": str(self.spec.image) if self.spec.image else None,
                "connections": self.server.connections,
                "status": self.device.status,
                "needs-reset": self.device.needs_reset,
                "stats": dict(self.device.stats),  # type: ignore[attr-defined]
                "transport": dict(self.server.stats)}
