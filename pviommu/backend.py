"""The backend process: a PV-IOMMU served over vhost-user, its DMA endpoints served
over vfio-user (PV mode) or over vhost-user behind QEMU's SMMUv3 (vSMMU mode, with
the guest's stage 2 owned here), everything driven over QMP."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .devices.traced import TracedRequests
from .devices.viommu import VirtioIommu
from .dma import DmaSpace
from .endpoints import Endpoint, EndpointSpec, VsmmuEndpoint
from .events import DeviceNeedsReset, EventBus, MappingRevoked, RevokedMemoryChecked
from .iommu.dma_space import TranslatedDma
from .iommu.pv import IommuConfig, PvIommu
from .iommu.revocation import Revocations
from .iommu.stage2 import Stage2
from .iommu.stage2_store import Stage2Store
from .iommu.vsmmu import Vsmmu
from .memory import GuestMemory, MemoryAccessError
from .qmp.dma import DmaCommands
from .qmp.server import MAX_CLIENTS as QMP_MAX_CLIENTS
from .qmp.server import QmpServer
from .qmp.viommu import EVENT_NEEDS_RESET as EVENT_NEEDS_RESET
from .qmp.viommu import EVENT_REVOKED as EVENT_REVOKED
from .qmp.viommu import ViommuCommands, check_args
from .qmp.vsmmu import VsmmuCommands
from .trace import TraceRecorder
from .transport.vfio_user.server import DEFAULT_MAX_DMA_MAPS
from .transport.vhost_user.backend import VhostUserServer

log = logging.getLogger(__name__)

# The largest revoked mapping whose memory is digested (hashing blocks the loop).
REVOKED_DIGEST_MAX = 64 << 20


@dataclass
class BackendConfig:
    """Where the backend listens and what its PV-IOMMU presents.

    ``viommu_socket`` may be None when every device is a vSMMU endpoint: then no
    PV-IOMMU is served.
    """

    viommu_socket: Path | None
    qmp_socket: Path | None = None
    endpoints: list[int] | None = None
    iommu: IommuConfig = field(default_factory=IommuConfig)
    devices: list[EndpointSpec] = field(default_factory=list)
    allow_unsealed_memory: bool = False
    """Map guest memory fds that are not memfds sealed against shrinking (trusts the
    frontends not to shrink them: a shrunk one kills the backend with SIGBUS)."""
    socket_group: int | None = None
    """A group ID whose members may connect to every socket (0660); None: owner only."""
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    """DMA maps a vfio-user client may hold at once, per endpoint."""
    qmp_max_clients: int = QMP_MAX_CLIENTS
    """QMP clients connected at once; one more is refused."""
    trace: Path | None = None
    """Where to write the IOMMU traffic as a Trace Event Format timeline
    (docs/TRACING.md); None: no trace, and the request paths pay nothing for it."""
    kick_thread: bool = True
    """Serve the PV-IOMMU's request queue (MAP, UNMAP) on a thread of its own that
    blocks on the kick eventfd, instead of waking the event loop for each kick."""
    poll_us: int = 0
    """Microseconds that thread spins after a batch, watching for the next request,
    before it blocks again (0: it blocks at once). Saves the backend's wake-up when
    requests follow closely; worth it only with a core to spare."""
    state_dir: Path | None = None
    """Where the backend keeps what a restart must find again (vSMMU mode: stage 2,
    in stage2.sqlite); a backend started with the same directory takes it up
    instead of the identity map. None: nothing is kept."""

    def endpoint_ids(self) -> list[int] | None:
        """The IDs that exist behind the PV-IOMMU (None: any), its devices' included."""
        pv = [d.endpoint for d in self.devices if d.mode == "pv"]
        if self.endpoints is None and not pv:
            return None
        ids = list(self.endpoints or [])
        return ids + [e for e in pv if e not in ids]


def _qmp_version() -> dict[str, Any]:
    major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"pviommu {__version__}"}


class Backend:
    """Owns the PV-IOMMU state, its vhost-user server and its QMP server.

    Everything that happens is published on ``events``; QMP is one listener of it
    (docs/QMP.md), the revocation digest another.

    Use ``async with Backend(config) as backend:``; leaving the block closes
    both sockets.
    """

    def __init__(self, config: BackendConfig) -> None:
        ids = [d.endpoint for d in config.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"two endpoint devices share an endpoint ID: {ids}")
        self.config = config
        self.events = EventBus()
        self.iommu = PvIommu(config.iommu, config.endpoint_ids(), self.events)
        self.device = VirtioIommu(self.iommu, self.events)
        self.revocations = Revocations(self.iommu, self.events)
        if config.viommu_socket is None and any(d.mode == "pv" for d in config.devices):
            raise ValueError("PV endpoint devices need the PV-IOMMU's socket")
        self.vhost = (VhostUserServer(config.viommu_socket, self.device,
                                      allow_unsealed_memory=config.allow_unsealed_memory,
                                      group=config.socket_group,
                                      kick_threads=config.kick_thread,
                                      poll_us=config.poll_us)
                      if config.viommu_socket is not None else None)
        self.qmp = QmpServer(_qmp_version(), max_clients=config.qmp_max_clients)
        self.commands = ViommuCommands(self.qmp, self.iommu, self.device, self._transport_stats,
                                       self.events, self.revocations)
        # One guest, one stage 2: shared by every vSMMU endpoint.
        self.stage2_store: Stage2Store | None = None
        self.vsmmu = (Vsmmu(self.events, self._stage2())
                      if any(d.mode == "vsmmu" for d in config.devices) else None)
        self.endpoints: dict[int, Endpoint | VsmmuEndpoint] = {
            d.endpoint: self._endpoint(d) for d in config.devices}
        if self.vsmmu is not None:
            self.vsmmu_commands = VsmmuCommands(
                self.qmp, self.vsmmu.stage2, self.vsmmu.queue, self.events,
                self.vsmmu.revocations, [d.endpoint for d in config.devices if d.mode == "vsmmu"])
        self.qmp.register("query-endpoint-devices", self._query_devices,
                          doc="The backend's DMA endpoint devices and their counters")
        self.dma_commands = DmaCommands(self.qmp, self.dma_space)
        self.events.listen(self._check_revoked, MappingRevoked)
        self._announce_needs_reset()
        self.trace: TraceRecorder | None = None

    def _stage2(self) -> Stage2:
        """The guest's stage 2: the saved one if the state directory holds it."""
        stage2 = Stage2()
        if self.config.state_dir is not None:
            self.stage2_store = Stage2Store.in_dir(self.config.state_dir)
            if self.stage2_store.attach(stage2):
                log.info("stage 2 taken up from %s (generation %d)",
                         self.stage2_store.path, stage2.generation)
        return stage2

    def _endpoint(self, spec: EndpointSpec) -> Endpoint | VsmmuEndpoint:
        if spec.mode == "vsmmu":
            assert self.vsmmu is not None
            return VsmmuEndpoint(spec, self.vsmmu, socket_group=self.config.socket_group,
                                 allow_unsealed_memory=self.config.allow_unsealed_memory)
        return Endpoint(spec, self.endpoint_dma, max_dma_maps=self.config.max_dma_maps,
                        socket_group=self.config.socket_group,
                        allow_unsealed_memory=self.config.allow_unsealed_memory)

    def _announce_needs_reset(self) -> None:
        """Every device that enters NEEDS_RESET publishes DeviceNeedsReset (QMP
        DEVICE_NEEDS_RESET): the guest's driver may never say (Linux's virtio drivers
        wait for the device forever)."""
        def announcer(kind: str, endpoint: int | None) -> Callable[[int, str], None]:
            return lambda queue, reason: self.events.publish(
                DeviceNeedsReset(kind, queue, reason, endpoint))
        self.device.on_needs_reset = announcer("iommu", None)
        for ep in self.endpoints.values():
            ep.device.on_needs_reset = announcer(ep.spec.kind, ep.spec.endpoint)
            if isinstance(ep.device, TracedRequests):  # its requests, when someone listens
                ep.device.trace_to(self.events, ep.spec.endpoint)

    def _query_devices(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        check_args(args, {})
        return [ep.state() for ep in self.endpoints.values()]

    def _revoked_digest(self, endpoint: int, gpa: int, size: int) -> str | None:
        ep = self.endpoints.get(endpoint)
        if ep is None or size > REVOKED_DIGEST_MAX:
            return None
        try:
            return hashlib.sha256(ep.memory.view(gpa, size, write=False)).hexdigest()
        except MemoryAccessError:
            return None

    def _check_revoked(self, event: MappingRevoked) -> None:
        """Publishes RevokedMemoryChecked (QMP IOMMU_MAPPING_REVOKED) with a digest of
        the guest memory behind a revoked mapping, taken now and again once the device
        finished the request that faulted on it."""
        r = event.revoked
        before = self._revoked_digest(r.endpoint, r.phys_start, r.size)

        def after() -> None:
            now = self._revoked_digest(r.endpoint, r.phys_start, r.size)
            self.events.publish(RevokedMemoryChecked(r, before, now))
        # Runs after the request that faulted has completed (requests whose memory
        # is local finish within one step of the event loop).
        try:
            asyncio.get_running_loop().call_soon(after)
        except RuntimeError:  # no loop (a revocation from synchronous code): report now
            after()

    def _transport_stats(self) -> dict[str, Any]:
        if self.vhost is None:
            return {}
        return {"vhost-user": {"connections": self.vhost.connections,
                               "messages-refused": self.vhost.stats["refused"],
                               "protocol-errors": self.vhost.stats["protocol_errors"],
                               "device-errors": self.vhost.stats["device_errors"]}}

    def dma_space(self, endpoint: int) -> DmaSpace | None:
        """The DMA space endpoint device ``endpoint`` does its DMA through (None: the
        backend has no device with that ID). QMP's ``inject-dma`` finds endpoints here,
        so every kind of endpoint device is to be found here."""
        ep = self.endpoints.get(endpoint)
        return ep.dma if ep is not None else None

    def endpoint_dma(self, endpoint: int, memory: GuestMemory) -> TranslatedDma:
        """The DMA space of ``endpoint``: translated by the PV-IOMMU, revocable, and its
        faults reported to the guest's event queue (the one fault path)."""
        return TranslatedDma(self.iommu, endpoint, memory, self.device.report_fault,
                             self.revocations)

    async def start(self) -> None:
        """Listens on the vhost-user socket, the endpoints' sockets and the QMP socket.

        If one cannot be bound (SocketPathError: a live server or another file is
        there), the ones already bound are closed and removed before it raises.
        """
        try:
            if self.config.trace is not None:
                self.trace = TraceRecorder.open(self.config.trace, self.events, {
                    ep.spec.endpoint: ep.spec.kind for ep in self.endpoints.values()})
            if self.vhost is not None:
                await self.vhost.start()
            for ep in self.endpoints.values():
                await ep.start()
            if self.config.qmp_socket is not None:
                await self.qmp.start_unix(str(self.config.qmp_socket), self.config.socket_group)
        except BaseException:
            await self.close()
            raise
        eps = self.iommu.known
        if self.vhost is not None:
            log.info("PV-IOMMU listening on %s (QMP %s); endpoints %s",
                     self.config.viommu_socket, self.config.qmp_socket or "off",
                     ", ".join(f"{e:#x}" for e in sorted(eps)) if eps is not None
                     else "any ID")
        for ep in self.endpoints.values():
            log.info("%s endpoint %#x (%s, %s) on %s", ep.spec.kind, ep.spec.endpoint,
                     ep.spec.mode, ep.spec.transport, ep.spec.socket)

    async def close(self) -> None:
        """Closes every socket and drops the current frontends, then finishes the trace."""
        try:
            await self.qmp.close()
            for ep in self.endpoints.values():
                await ep.close()
            if self.vhost is not None:
                await self.vhost.close()
        finally:
            if self.trace is not None:
                self.trace.close()
                self.trace = None
            if self.stage2_store is not None:
                self.stage2_store.close()
                self.stage2_store = None

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Runs until cancelled."""
        await asyncio.Event().wait()
