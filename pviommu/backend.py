"""The backend process: a PV-IOMMU served over vhost-user, driven over QMP."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .devices.viommu import Fault, VirtioIommu
from .dma import DmaFault
from .iommu.dma_space import DomainDma
from .iommu.pv import IommuConfig, PvIommu
from .memory import GuestMemory
from .qmp.server import QmpServer
from .qmp.viommu import ViommuCommands
from .transport.vhost_user.backend import VhostUserServer

log = logging.getLogger(__name__)


@dataclass
class BackendConfig:
    """Where the backend listens and what its PV-IOMMU presents."""

    viommu_socket: Path
    qmp_socket: Path | None = None
    endpoints: list[int] | None = None
    iommu: IommuConfig = field(default_factory=IommuConfig)


def _qmp_version() -> dict[str, Any]:
    major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"pviommu {__version__}"}


class Backend:
    """Owns the PV-IOMMU state, its vhost-user server and its QMP server.

    Use ``async with Backend(config) as backend:``; leaving the block closes
    both sockets.
    """

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.iommu = PvIommu(config.iommu, config.endpoints)
        self.device = VirtioIommu(self.iommu)
        self.vhost = VhostUserServer(config.viommu_socket, self.device)
        self.qmp = QmpServer(_qmp_version())
        self.commands = ViommuCommands(self.qmp, self.iommu, self.device, self._transport_stats)

    def _transport_stats(self) -> dict[str, Any]:
        return {"vhost-user": {"connections": self.vhost.connections,
                               "messages-refused": self.vhost.stats["refused"],
                               "protocol-errors": self.vhost.stats["protocol_errors"],
                               "device-errors": self.vhost.stats["device_errors"]}}

    def report_dma_fault(self, fault: DmaFault) -> None:
        """The one fault path: a failed translation goes to the guest's event queue."""
        self.device.report_fault(Fault.from_dma(fault))

    def endpoint_dma(self, endpoint: int, memory: GuestMemory) -> DomainDma:
        """The DMA space of ``endpoint``: translated by the PV-IOMMU, faults reported."""
        return DomainDma(self.iommu, endpoint, memory, self.report_dma_fault)

    async def start(self) -> None:
        """Listens on the vhost-user socket and, if configured, the QMP socket."""
        await self.vhost.start()
        if self.config.qmp_socket is not None:
            await self.qmp.start_unix(str(self.config.qmp_socket))
        eps = self.config.endpoints
        log.info("PV-IOMMU listening on %s (QMP %s); endpoints %s", self.config.viommu_socket,
                 self.config.qmp_socket or "off",
                 ", ".join(f"{e:#x}" for e in eps) if eps is not None else "any ID")

    async def close(self) -> None:
        """Closes both sockets and drops the current frontend."""
        await self.qmp.close()
        await self.vhost.close()

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Runs until cancelled."""
        await asyncio.Event().wait()
