"""The backend's DMA endpoints: the same virtio device models over two transports.

A PV-mode endpoint (:class:`Endpoint`) is a PCI function served over vfio-user:
its own socket, its own DMA-map table (the guest memory QEMU hands over with
DMA_MAP) and an endpoint ID, the PCI requester ID QEMU gives it on the bus; its
DMA space is its PV-IOMMU domain. A vSMMU-mode endpoint (:class:`VsmmuEndpoint`)
is served over vhost-user to QEMU's ``vhost-user-*-pci`` behind QEMU's SMMUv3:
its endpoint ID is its StreamID, and its DMA space translates through the
guest's stage 1 (the connection's device IOTLB) and the backend's stage 2.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .devices.blk import SECTOR, VirtioBlk
from .devices.rng import VirtioRng
from .dma import DmaSpace
from .iommu.faults import Access
from .iommu.nested import Stage1Refused, Stage1Unavailable
from .iommu.vsmmu import Vsmmu
from .machine.topology import pci_rid
from .memory import GuestMemory
from .transport.vfio_user.server import DEFAULT_MAX_DMA_MAPS, VfioUserServer
from .transport.vhost_user.backend import VhostUserConnection, VhostUserServer
from .transport.vhost_user.iotlb import DeviceIotlb, IotlbError, IotlbMissRefused
from .virtio.pci import VirtioPciFunction

KINDS = ("blk", "rng")
TRANSPORTS = {"vfio-user": "pv", "vhost-user": "vsmmu"}
"""Each transport and the translation mode its endpoints are in."""
_SIZE = re.compile(r"(\d+)([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_endpoint_id(text: str) -> int:
    """An endpoint ID: a number (0x10, 16) or a PCI address ([BUS:]DEV.FN).

    ValueError if it is neither, or does not fit in 32 bits.
    """
    try:
        if "." in text:
            bus, _, devfn = text.rpartition(":")
            return pci_rid(devfn, int(bus, 16) if bus else 0)
        value = int(text, 0)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a number nor a PCI address like 00:02.0") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"endpoint ID {text} does not fit in 32 bits")
    return value


def parse_size(text: str) -> int:
    """A disk size: bytes, or a number with K, M, G or T (binary units), e.g. 64M.

    ValueError unless it is a positive multiple of the 512-byte sector.
    """
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"size {text!r} is not a number of bytes or like 64M")
    size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if size <= 0 or size % SECTOR:
        raise ValueError(f"size {text} is not a positive multiple of {SECTOR} bytes")
    return size


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint device: its kind, socket, endpoint ID, transport and options.

    ``transport`` is "vfio-user" (PV mode, behind the PV-IOMMU) or "vhost-user"
    (vSMMU mode, behind QEMU's SMMUv3). A blk endpoint's ``image`` must exist,
    unless ``size`` is given: then :func:`create_image` creates it sparse, and an
    existing one must have that size.
    """

    kind: str
    socket: Path
    endpoint: int
    image: Path | None = None
    read_only: bool = False
    serial: str = "pviommu"
    size: int | None = None
    transport: str = "vfio-user"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown endpoint kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r} "
                             f"(known: {', '.join(TRANSPORTS)})")
        if self.kind != "blk":
            return
        if self.image is None:
            raise ValueError("a blk endpoint needs an image file (image=PATH)")
        image = Path(self.image)
        if image.exists() and not image.is_file():
            raise ValueError(f"blk image {image} is not a regular file")
        if not image.exists() and self.size is None:
            raise ValueError(f"blk image {image} does not exist (add size=SIZE, e.g. "
                             "size=64M, to create it)")

    @property
    def mode(self) -> str:
        """The translation mode: "pv" or "vsmmu"."""
        return TRANSPORTS[self.transport]

    @property
    def option(self) -> str:
        """The ``pviommu serve`` option that declares such an endpoint."""
        return f"--{kind_option(self.kind, self.transport)}"

    @classmethod
    def parse(cls, kind: str, text: str, transport: str = "vfio-user") -> EndpointSpec:
        """Parses ``SOCKET,endpoint=ID[,image=PATH][,size=SIZE][,ro][,serial=S]``
        (the options after SOCKET are blk's); ValueError says what is wrong."""
        option = kind_option(kind, transport)
        socket, *opts = text.split(",")
        fields: dict[str, Any] = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            if key == "endpoint" and eq:
                fields["endpoint"] = parse_endpoint_id(value)
            elif key == "image" and eq and kind == "blk":
                fields["image"] = Path(value)
            elif key == "size" and eq and kind == "blk":
                fields["size"] = parse_size(value)
            elif key == "serial" and eq and kind == "blk":
                fields["serial"] = value
            elif key == "ro" and not eq and kind == "blk":
                fields["read_only"] = True
            else:
                raise ValueError(f"{opt!r} is not an option of --{option}")
        if not socket or "endpoint" not in fields:
            raise ValueError(f"--{option} needs SOCKET,endpoint=ID")
        return cls(kind, Path(socket), **fields, transport=transport)


def kind_option(kind: str, transport: str) -> str:
    """The serve option's name for ``kind`` over ``transport`` (blk, vsmmu-blk...)."""
    return kind if transport == "vfio-user" else f"vsmmu-{kind}"


def create_image(spec: EndpointSpec) -> bool:
    """Creates a blk endpoint's missing image, sparse, of ``spec.size`` bytes.

    Returns whether it created one. An existing image is left as it is, but
    with ``size`` given it must have that size (ValueError otherwise: the
    caller asked for another disk than the one there). OSError if it cannot
    be created.
    """
    if spec.kind != "blk" or spec.image is None or spec.size is None:
        return False
    try:
        fd = os.open(spec.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        actual = spec.image.stat().st_size
        if actual != spec.size:
            raise ValueError(f"blk image {spec.image} is {actual} bytes, not size={spec.size}; "
                             "remove size= to use it as it is") from None
        return False
    try:
        os.ftruncate(fd, spec.size)
    finally:
        os.close(fd)
    return True


def make_device(spec: EndpointSpec) -> VirtioBlk | VirtioRng:
    """The virtio device model of ``spec``."""
    if spec.kind == "blk":
        assert spec.image is not None
        return VirtioBlk(spec.image, read_only=spec.read_only, serial=spec.serial)
    return VirtioRng()


class _Server(Protocol):
    """What an endpoint needs of its server, vfio-user or vhost-user."""

    stats: Counter[str]

    @property
    def connections(self) -> int:
        """How many clients have connected so far."""
        ...

    async def start(self) -> None:
        """Starts listening on the socket."""
        ...

    async def close(self) -> None:
        """Stops serving."""
        ...


class _ServedDevice:
    """A device model served on its own socket (``server``: a vfio-user or vhost-user
    server); what both kinds of endpoint share."""

    spec: EndpointSpec
    device: VirtioBlk | VirtioRng
    server: _Server

    async def start(self) -> None:
        """Listens on the endpoint's socket."""
        await self.server.start()

    async def close(self) -> None:
        """Stops serving, closes the device's backing file."""
        await self.server.close()
        if isinstance(self.device, VirtioBlk):
            self.device.close()

    def state(self) -> dict[str, Any]:
        """What QMP reports about the endpoint (``query-endpoint-devices``)."""
        return {"id": self.spec.endpoint, "kind": self.spec.kind,
                "transport": self.spec.transport, "mode": self.spec.mode,
                "socket": str(self.spec.socket),
                "image": str(self.spec.image) if self.spec.image else None,
                "connections": self.server.connections,
                "status": self.device.status,
                "needs-reset": self.device.needs_reset,
                "stats": dict(self.device.stats),
                "transport-stats": dict(self.server.stats)}


class Endpoint(_ServedDevice):
    """A running endpoint: device, PCI function, DMA-map table, vfio-user server."""

    server: VfioUserServer

    def __init__(self, spec: EndpointSpec,
                 dma_factory: Callable[[int, GuestMemory], DmaSpace], *,
                 max_dma_maps: int = DEFAULT_MAX_DMA_MAPS,
                 socket_group: int | None = None,
                 allow_unsealed_memory: bool = False) -> None:
        self.spec = spec
        self.memory = GuestMemory(allow_unsealed=allow_unsealed_memory)
        self.dma: DmaSpace = dma_factory(spec.endpoint, self.memory)
        self.device = make_device(spec)
        self.function = VirtioPciFunction(self.device, self.dma)
        self.server = VfioUserServer(spec.socket, self.function, self.memory,
                                     name=f"{spec.kind}@{spec.endpoint:#x}",
                                     max_dma_maps=max_dma_maps, socket_group=socket_group)

    async def close(self) -> None:
        """Stops serving, closes the device's backing file, drops the DMA-map table."""
        await super().close()
        self.memory.clear()


class IotlbStage1:
    """A vhost-user device IOTLB as the nested translator's stage 1: the transport's
    errors become the IOMMU layer's (a MISS QEMU acked with failure is a stage-1 fault
    QEMU's SMMUv3 reported to the guest; any other is a stage 1 that cannot be had)."""

    def __init__(self, iotlb: DeviceIotlb) -> None:
        self.iotlb = iotlb
        self.lookup = iotlb.lookup

    @property
    def generation(self) -> int:
        """The IOTLB's generation (moves on every invalidation, stop and new memory)."""
        return self.iotlb.generation

    def invalidated_since(self, generation: int) -> list[tuple[int, int]] | None:
        """The ranges the IOTLB dropped since ``generation`` (None: not known)."""
        return self.iotlb.invalidated_since(generation)

    async def fill(self, iova: int, access: Access | int) -> None:
        """Asks QEMU for the translation of ``iova`` (IOTLB MISS)."""
        await self._stage1(self.iotlb.fill(iova, access))

    async def prefetch(self, iova: int, access: Access | int) -> None:
        """Asks QEMU for ``iova`` ahead of its access, unless the back-end channel is busy
        (see :meth:`DeviceIotlb.prefetch`)."""
        await self._stage1(self.iotlb.prefetch(iova, access))

    @staticmethod
    async def _stage1(fill: Awaitable[None]) -> None:
        try:
            await fill
        except IotlbMissRefused as e:
            raise Stage1Refused(str(e)) from None
        except IotlbError as e:
            raise Stage1Unavailable(str(e)) from None


class VsmmuEndpoint(_ServedDevice):
    """A running vSMMU endpoint: the device model served over vhost-user; each
    connection's rings and buffers go through the nested translation of ``vsmmu``."""

    server: VhostUserServer

    def __init__(self, spec: EndpointSpec, vsmmu: Vsmmu, *,
                 socket_group: int | None = None, allow_unsealed_memory: bool = False,
                 iotlb_miss_timeout: float = 10.0) -> None:
        self.spec = spec
        self.vsmmu = vsmmu
        self.device = make_device(spec)
        self.translation_stats: Counter[str] = Counter()
        self.server = VhostUserServer(spec.socket, self.device, on_connect=self._wire,
                                      allow_unsealed_memory=allow_unsealed_memory,
                                      group=socket_group, iotlb_miss_timeout=iotlb_miss_timeout)
        self._empty = GuestMemory()

    def _wire(self, conn: VhostUserConnection) -> None:
        conn.iotlb.trace_to(self.vsmmu.events, self.spec.endpoint)
        conn.iova_dma = self.vsmmu.dma(IotlbStage1(conn.iotlb), self.spec.endpoint,
                                       conn.memory, self.translation_stats)

    @property
    def dma(self) -> DmaSpace | None:
        """The DMA space of the current connection (None while QEMU is not connected)."""
        conn = self.server.connection
        return conn.iova_dma if conn is not None else None

    @property
    def memory(self) -> GuestMemory:
        """The guest memory of the current connection (empty while none)."""
        conn = self.server.connection
        return conn.memory if conn is not None else self._empty

    def state(self) -> dict[str, Any]:
        """What QMP reports about the endpoint: as a PV one, plus the IOTLB round trips
        and the nested translation's counters."""
        stats = self.server.stats
        return super().state() | {
            "iotlb": {"miss": stats["iotlb_miss"], "update": stats["iotlb_update"],
                      "invalidate": stats["iotlb_invalidate"],
                      "miss-refused": stats["iotlb_miss_refused"],
                      "miss-timeout": stats["iotlb_miss_timeout"],
                      "update-unsolicited": stats["iotlb_update_unsolicited"]},
            "translation": dict(self.translation_stats)}
