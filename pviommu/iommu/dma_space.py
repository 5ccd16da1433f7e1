"""The DMA space of an endpoint behind the PV-IOMMU.

Every access is translated through the endpoint's domain before guest memory
is touched; a failed translation is reported (to the guest's event queue, via
``report``) and raised, so that the device completes its request with its own
error status. Nothing outside the domain's mappings is read or written: all
pieces of an access are translated first, then copied.
"""

from __future__ import annotations

from collections.abc import Callable

from ..dma import DMA_ERRORS
from ..memory import GuestMemory, Piece
from .faults import Access, DmaFault, Fault
from .pv import PvIommu

FaultReport = Callable[[Fault], None]


class DomainDma:
    """What endpoint ``endpoint`` sees: I/O virtual addresses of its domain."""

    def __init__(self, iommu: PvIommu, endpoint: int, memory: GuestMemory,
                 report: FaultReport | None = None) -> None:
        self.iommu = iommu
        self.endpoint = endpoint
        self.memory = memory
        self.report = report

    def _translate(self, addr: int, length: int, access: Access) -> list[tuple[int, int]]:
        try:
            return self.iommu.translate(self.endpoint, addr, length, access)
        except DmaFault as fault:
            if self.report is not None:
                self.report(fault.fault)
            raise

    @property
    def generation(self) -> int:
        """Changes whenever a translation given out before may no longer hold (both
        counters only grow, so their sum changes whenever either does)."""
        return self.memory.generation + self.iommu.generation

    def try_view(self, addr: int, length: int, access: Access) -> memoryview | None:
        """One local view of the translated range, or None; faults are not reported and
        the lookup is no DMA (an armed revocation waits for a real one)."""
        try:
            pieces = self.iommu.translate(self.endpoint, addr, length, access, dma=False)
            if len(pieces) != 1:
                return None
            piece = self.memory.piece(pieces[0][0], length, bool(access & Access.WRITE))
        except DMA_ERRORS:
            return None
        return piece if isinstance(piece, memoryview) else None

    def resolve(self, addr: int, length: int, access: Access) -> list[Piece]:
        """The guest memory behind ``[addr, addr+length)``, every piece translated first."""
        write = bool(access & Access.WRITE)
        return [self.memory.piece(gpa, n, write)
                for gpa, n in self._translate(addr, length, access)]

    def read(self, addr: int, length: int) -> bytes:
        """Copies ``length`` bytes from I/O virtual address ``addr``."""
        pieces = self._translate(addr, length, Access.READ)
        views = [self.memory.view(gpa, n, write=False) for gpa, n in pieces]
        return b"".join(views)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to I/O virtual address ``addr``."""
        pieces = self._translate(addr, len(data), Access.WRITE)
        views = [self.memory.view(gpa, n) for gpa, n in pieces]
        src = memoryview(data)
        pos = 0
        for view in views:
            view[:] = src[pos:pos + len(view)]
            pos += len(view)
