"""DMA spaces: the only place where a device's DMA address becomes guest memory.

Virtqueues and device models read and write through a :class:`DmaSpace`;
whatever sits in front of guest memory (nothing, a PV-IOMMU domain, an IOTLB
and stage 2) decides how an address translates. A failed translation raises
:class:`DmaFault`, an address outside guest memory raises
:class:`~pviommu.memory.MemoryAccessError`; ``DMA_ERRORS`` catches both.
"""

from __future__ import annotations

import enum
from typing import Protocol

from .memory import GuestMemory, MemoryAccessError


class Access(enum.IntFlag):
    """The kind of DMA access (virtio-iommu fault flag values)."""

    READ = 1
    WRITE = 2
    EXEC = 4


class DmaFault(Exception):
    """A translation failed: no mapping, wrong permission or no domain."""

    def __init__(self, address: int, access: Access, reason: str,
                 endpoint: int | None = None) -> None:
        ep = f" endpoint {endpoint:#x}" if endpoint is not None else ""
        super().__init__(f"{reason} fault{ep} at {address:#x} ({access.name})")
        self.address = address
        self.access = access
        self.reason = reason
        self.endpoint = endpoint


DMA_ERRORS = (DmaFault, MemoryAccessError)


class DmaSpace(Protocol):
    """What a device sees of memory: reads and writes at DMA addresses."""

    def read(self, addr: int, length: int) -> bytes:
        """Copies ``length`` bytes from DMA address ``addr``."""
        ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to DMA address ``addr``."""
        ...


class PhysicalDma:
    """Identity DMA space: DMA addresses are guest-physical addresses."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def read(self, addr: int, length: int) -> bytes:
        """Copies ``length`` bytes at guest-physical ``addr``."""
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to guest-physical ``addr``."""
        self.memory.write(addr, data)
