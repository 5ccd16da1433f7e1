"""QMP's rogue DMA: ``inject-dma`` makes an endpoint device do a DMA of its own.

The access goes through the endpoint's DMA space exactly as the device's own
requests do: the whole range is resolved for the access (translation misses
filled and retried, as a request task does), a fault is reported by the DMA
space down the endpoint's ordinary fault path (in PV mode the virtio-iommu
event queue and ``IOMMU_FAULT``), and only a range that translated is read or
written. So the fault the guest sees is a real translation fault, not the
record ``inject-fault`` makes up. Documented in docs/QMP.md.

The command is generic over any endpoint whose DMA space follows the seam
(:class:`~pviommu.dma.DmaSpace`, optionally with ``fill``): it finds the
space through one accessor, so a new kind of endpoint joins by being found
there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..dma import Access, DmaFault, DmaSpace, TranslationMiss, fill, load, store
from ..iommu.faults import Fault
from ..memory import MemoryAccessError, Piece
from .server import QmpError, QmpServer
from .viommu import check_args

log = logging.getLogger(__name__)

MAX_SIZE = 4096
"""The largest rogue DMA, in bytes (it is a probe, not a copy engine)."""
DEFAULT_SIZE = 4
MAX_REFILLS = 16
"""Fills of one rogue DMA before it gives up (a translator that never settles)."""
PATTERN = b"ROGUEDMA"
"""What a rogue write stores, repeated and cut to its size: easy to spot in memory."""

_ACCESS = {"read": Access.READ, "write": Access.WRITE}

DmaSpaces = Callable[[int], DmaSpace | None]
"""The DMA space of an endpoint device by endpoint ID; None if there is no such device."""


def fault_data(fault: Fault) -> dict[str, Any]:
    """A typed fault as QMP shows it (names as in ``IOMMU_FAULT``; ``stage`` only
    when the translation is staged)."""
    access = [name for name, flag in _ACCESS.items() if fault.access & flag]
    data: dict[str, Any] = {"endpoint": fault.endpoint, "address": fault.address,
                            "access": access[0] if len(access) == 1 else access,
                            "reason": fault.reason.name.lower()}
    if fault.stage is not None:
        data["stage"] = int(fault.stage)
    return data


def pattern(size: int) -> bytes:
    """The ``size`` bytes a rogue write stores."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


class DmaCommands:
    """Registers ``inject-dma`` on a QMP server; ``dma_spaces`` finds an endpoint's
    DMA space."""

    def __init__(self, server: QmpServer, dma_spaces: DmaSpaces) -> None:
        self.dma_spaces = dma_spaces
        server.register("inject-dma", self.inject_dma,
                        doc="Make an endpoint device do a DMA of its own (a rogue DMA)")

    async def inject_dma(self, args: dict[str, Any]) -> dict[str, Any]:
        """``inject-dma``: ``endpoint``'s device reads or writes ``size`` bytes at I/O
        virtual ``address`` through its DMA space; returns what happened."""
        a = check_args(args, {"endpoint": int, "address": int},
                       {"access": str, "size": int})
        endpoint, address = a["endpoint"], a["address"]
        size = a.get("size", DEFAULT_SIZE)
        access_name = a.get("access", "read")
        if access_name not in _ACCESS:
            raise QmpError("GenericError", f"Parameter 'access' does not accept value "
                           f"'{access_name}' (one of: {', '.join(_ACCESS)})")
        if not 1 <= size <= MAX_SIZE:
            raise QmpError("GenericError", f"Parameter 'size' must be 1 to {MAX_SIZE}")
        if address + size > 1 << 64:
            raise QmpError("GenericError", "'address' + 'size' is beyond the 64-bit space")
        if endpoint > 0xFFFFFFFF:
            raise QmpError("GenericError", "Parameter 'endpoint' is out of range")
        dma = self.dma_spaces(endpoint)
        if dma is None:
            raise QmpError("GenericError", f"Endpoint {endpoint:#x} has no device")
        access = _ACCESS[access_name]
        log.info("rogue DMA: endpoint %#x %s %d bytes at %#x", endpoint, access_name, size,
                 address)
        try:
            pieces = await self._resolve(dma, address, size, access)
        except DmaFault as fault:  # the DMA space has reported it
            return {"translated": False, "fault": fault_data(fault.fault)}
        except MemoryAccessError as exc:  # translated, to no guest memory
            return {"translated": True, "fault": None, "error": str(exc)}
        if access is Access.WRITE:
            await store(pieces, pattern(size))
            return {"translated": True, "fault": None}
        return {"translated": True, "fault": None, "data": (await load(pieces)).hex()}

    @staticmethod
    async def _resolve(dma: DmaSpace, address: int, size: int, access: Access) -> list[Piece]:
        """Resolves the range as a request task does: a miss is filled, then the whole
        access runs again (a failed fill makes the retry raise its fault)."""
        fills = 0
        while True:
            try:
                return dma.resolve(address, size, access)
            except TranslationMiss as miss:
                if fills == MAX_REFILLS:
                    raise QmpError("GenericError", f"The translation of {miss.iova:#x} "
                                   f"kept missing after {MAX_REFILLS} fills") from None
                fills += 1
                await fill(dma, miss)
