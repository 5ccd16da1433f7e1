"""DMA spaces: the only place where a device's DMA address becomes guest memory.

Virtqueues and device models read and write through a :class:`DmaSpace`;
whatever sits in front of guest memory (nothing, a PV-IOMMU domain, an IOTLB
and stage 2) decides how an address translates. A failed translation raises
:class:`~pviommu.iommu.faults.DmaFault` (re-exported here, with
:class:`~pviommu.iommu.faults.Access`, for the device models), an address
outside guest memory raises :class:`~pviommu.memory.MemoryAccessError`;
``DMA_ERRORS`` catches both. A DMA space whose translations are fetched
asynchronously may raise :class:`~pviommu.iommu.translation.TranslationMiss`
instead (not a fault): code in an async context awaits :func:`fill` and
retries; nothing was changed by the access that missed.
"""

from __future__ import annotations

from typing import Protocol, TypeGuard

from .iommu.faults import Access, DmaFault
from .iommu.translation import TranslationMiss
from .memory import GuestMemory, MemoryAccessError, Piece, RemoteRange

__all__ = ["DMA_ERRORS", "Access", "DmaFault", "DmaSpace", "PhysicalDma", "TranslationMiss",
           "ViewableDma", "fill", "load", "local_views", "piece_len", "store", "viewable"]

DMA_ERRORS = (DmaFault, MemoryAccessError)


class DmaSpace(Protocol):
    """What a device sees of memory: reads and writes at DMA addresses."""

    def read(self, addr: int, length: int) -> bytes:
        """Copies ``length`` bytes from DMA address ``addr``."""
        ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to DMA address ``addr``."""
        ...

    def resolve(self, addr: int, length: int, access: Access) -> list[Piece]:
        """The pieces of guest memory behind ``[addr, addr+length)`` for ``access``.

        Translates the whole range before returning anything, so a device that
        resolves all its buffers first touches no byte of a request that faults.
        """
        ...

    # Optional, for caching views of long-lived buffers (virtqueue rings):
    # ``generation`` and ``try_view``, see ViewableDma.
    # Optional, for spaces whose accesses may raise TranslationMiss:
    # ``async fill(miss)``. See :func:`fill`.


class ViewableDma(DmaSpace, Protocol):
    """A DMA space that lends views of long-lived buffers (virtqueue rings) to cache."""

    @property
    def generation(self) -> object:
        """Changes whenever a translation or view given out before may have gone."""
        ...

    def try_view(self, addr: int, length: int, access: Access) -> memoryview | None:
        """One local view of the range, or None; no fault is reported, nothing missed."""
        ...


def viewable(dma: DmaSpace) -> TypeGuard[ViewableDma]:
    """Whether ``dma`` lends views to cache (see SplitQueue)."""
    return hasattr(dma, "try_view")


async def fill(dma: DmaSpace, miss: TranslationMiss) -> None:
    """Waits until ``dma`` has fetched the translation ``miss`` lacks.

    Afterwards the same access, by the same task, translates, raises the
    :class:`DmaFault` the fill found, or misses again if the translation was
    invalidated meanwhile. A space without ``fill`` cannot miss: ``miss`` is
    raised again.
    """
    filler = getattr(dma, "fill", None)
    if filler is None:
        raise miss
    await filler(miss)


def piece_len(piece: Piece) -> int:
    """The length of a resolved piece."""
    return piece.length if isinstance(piece, RemoteRange) else len(piece)


async def load(pieces: list[Piece]) -> bytes:
    """The bytes behind resolved ``pieces`` (remote ones fetched from the frontend)."""
    parts = [await p.read() if isinstance(p, RemoteRange) else p for p in pieces]
    return b"".join(parts)


async def store(pieces: list[Piece], data: bytes | bytearray | memoryview) -> None:
    """Writes ``data`` (exactly their total length) into resolved ``pieces``."""
    src = memoryview(data)
    pos = 0
    for p in pieces:
        n = piece_len(p)
        if isinstance(p, RemoteRange):
            await p.write(src[pos:pos + n])
        else:
            p[:] = src[pos:pos + n]
        pos += n


def local_views(pieces: list[Piece]) -> list[memoryview] | None:
    """The pieces as views if every one is local (zero-copy I/O), else None."""
    views = [p for p in pieces if not isinstance(p, RemoteRange)]
    return views if len(views) == len(pieces) else None


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

    def resolve(self, addr: int, length: int, access: Access) -> list[Piece]:
        """The one piece at guest-physical ``addr`` (it must lie in one region)."""
        return [self.memory.piece(addr, length, write=bool(access & Access.WRITE))]

    @property
    def generation(self) -> object:
        """Changes when views given out before may have become stale."""
        return self.memory.generation

    def try_view(self, addr: int, length: int, access: Access) -> memoryview | None:
        """One local view of the range, or None (nothing is reported)."""
        try:
            piece = self.memory.piece(addr, length, write=bool(access & Access.WRITE))
        except MemoryAccessError:
            return None
        return piece if isinstance(piece, memoryview) else None
