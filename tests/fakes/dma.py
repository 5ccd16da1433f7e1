"""Fakes around DMA spaces: a frontend that reaches memory without an fd, and a DMA
space whose rings are reached guest-physically."""

from __future__ import annotations

import asyncio

from pviommu.dma import Access, DmaSpace, PhysicalDma
from pviommu.memory import GuestMemory, Piece


class FakeRemote:
    """The frontend's DMA_READ/DMA_WRITE over ``size`` bytes at ``base``.

    Records every call in ``calls`` (and by kind in ``reads``/``writes``); a set
    ``gate`` holds each call until the event is set. ``readable`` False makes a
    read an assertion failure (a device that must never read guest memory).
    """

    def __init__(self, base: int, size: int, fill: int = 0, readable: bool = True) -> None:
        self.base = base
        self.mem = bytearray([fill]) * size
        self.readable = readable
        self.gate: asyncio.Event | None = None
        self.calls: list[tuple[str, int, int]] = []
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    async def read(self, gpa: int, length: int) -> bytes:
        if not self.readable:
            raise AssertionError("this device never reads guest memory")
        self.calls.append(("read", gpa, length))
        self.reads.append((gpa, length))
        if self.gate is not None:
            await self.gate.wait()
        off = gpa - self.base
        return bytes(self.mem[off:off + length])

    async def write(self, gpa: int, data: bytes) -> None:
        self.calls.append(("write", gpa, len(data)))
        self.writes.append((gpa, len(data)))
        if self.gate is not None:
            await self.gate.wait()
        off = gpa - self.base
        self.mem[off:off + len(data)] = data


class RingsPhysical:
    """Rings reached guest-physically, buffers through ``dma`` (to test an unattached
    endpoint, whose rings would be unreachable too)."""

    def __init__(self, memory: GuestMemory, dma: DmaSpace) -> None:
        self.phys = PhysicalDma(memory)
        self.dma = dma

    def read(self, addr: int, length: int) -> bytes:
        return self.phys.read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.phys.write(addr, data)

    def resolve(self, addr: int, length: int, access: Access) -> list[Piece]:
        return self.dma.resolve(addr, length, access)
