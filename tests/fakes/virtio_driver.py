"""A fake *driver side* of a split virtqueue, living in real (memfd-backed) guest memory.

Typical use::

    memory, fd = memfd_memory(1 << 20)
    driver = FakeDriver(memory, GPA, queue_size=8)
    queue = driver.queue(PhysicalDma(memory))      # the device side under test
    head = driver.add([b"request"], [4])           # 1 readable, 1 writable buffer
    driver.publish()
    ... device pops, pushes ...
    assert driver.used() == [(head, 4)]
    driver.read_writable(head)                      # what the device wrote

Layout at ``base`` (all guest-physical): descriptor table (16 * size bytes),
then the available ring (flags, idx, ring[size], used_event), then, 4-byte
aligned, the used ring (flags, idx, ring[size] of (id, len), avail_event).
Buffers come from a bump allocator between the end of the used ring and
``base + span``; nothing is ever freed except descriptor slots.

Malicious chains: :meth:`add_raw_descriptors` writes arbitrary descriptors,
:meth:`make_available` puts any head index in the available ring and
:meth:`set_avail_idx` writes any available index.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from pviommu.memory import GuestMemory, RegionSpec
from pviommu.virtio.queue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    SplitQueue,
)

from .memfd import sealed_memfd

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
DEFAULT_GPA = 0x40000000
DEFAULT_UADDR = 0x7F0000000000


def memfd_memory(size: int, gpa: int = DEFAULT_GPA, uaddr: int = DEFAULT_UADDR
                 ) -> tuple[GuestMemory, int]:
    """A GuestMemory with one region of ``size`` bytes of a new memfd at ``gpa``.

    Returns the memory and the memfd. The caller owns both: ``memory.clear()``
    and ``os.close(fd)`` when done. (``set_regions`` closes the fd it is given,
    so it gets a dup; the returned fd stays open, e.g. to send over a socket.)
    """
    fd = sealed_memfd(size)
    try:
        memory = GuestMemory()
        memory.set_regions([RegionSpec(gpa, size, uaddr, 0)], [os.dup(fd)])
    except BaseException:
        os.close(fd)
        raise
    return memory, fd


@dataclass
class _Posted:
    """Bookkeeping of one chain the driver made available."""

    descs: list[int]
    writable: list[tuple[int, int]] = field(default_factory=list)


class FakeDriver:
    """The driver side of one split virtqueue of ``queue_size`` entries at ``base``."""

    def __init__(self, memory: GuestMemory, base: int = DEFAULT_GPA, queue_size: int = 8,
                 span: int = 0x10000) -> None:
        self.memory = memory
        self.size = queue_size
        self.desc = base
        self.avail = base + 16 * queue_size
        self.used_ring = (self.avail + 6 + 2 * queue_size + 3) & ~3
        self.limit = base + span
        self._next = (self.used_ring + 6 + 8 * queue_size + 15) & ~15
        if self._next > self.limit:
            raise ValueError("rings do not fit in span")
        memory.write(base, bytes(self._next - base))  # rings start zeroed
        self.avail_idx = 0  # shadow of what publish() writes
        self.last_used = 0
        self._free = list(range(queue_size))
        self._posted: dict[int, _Posted] = {}

    # -- memory ----------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        """``size`` bytes of zeroed buffer space (bump allocator)."""
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self.limit:
            raise MemoryError(f"FakeDriver span exhausted ({size} bytes wanted)")
        self._next = addr + size
        self.memory.write(addr, bytes(size))
        return addr

    def buffer(self, data: bytes) -> int:
        """A new buffer holding ``data``."""
        addr = self.alloc(max(len(data), 1))
        self.memory.write(addr, data)
        return addr

    def queue(self, dma, **kwargs) -> SplitQueue:
        """The device side of this queue over ``dma`` (kwargs go to SplitQueue)."""
        return SplitQueue(dma, self.size, self.desc, self.avail, self.used_ring, **kwargs)

    # -- making buffers available -------------------------------------------------------

    def add(self, readable: list[bytes], writable_sizes: list[int], indirect: bool = False
            ) -> int:
        """Posts a chain: device-readable buffers, then zeroed device-writable ones.

        Returns the head index. The chain is in the available ring but only
        visible to the device after :meth:`publish`. With ``indirect`` the
        chain is one ring descriptor pointing to an indirect table.
        """
        segs = [(self.buffer(d), len(d), 0) for d in readable]
        segs += [(self.alloc(max(n, 1)), n, DESC_F_WRITE) for n in writable_sizes]
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.alloc(16 * len(segs))
            for i, (addr, n, flags) in enumerate(segs):
                last = i == len(segs) - 1
                self.memory.write(table + 16 * i, DESC.pack(
                    addr, n, flags | (0 if last else DESC_F_NEXT), 0 if last else i + 1))
            descs = self._take(1)
            self.write_desc(descs[0], table, 16 * len(segs), DESC_F_INDIRECT, 0)
        else:
            descs = self._take(len(segs))
            for i, (addr, n, flags) in enumerate(segs):
                last = i == len(segs) - 1
                self.write_desc(descs[i], addr, n, flags | (0 if last else DESC_F_NEXT),
                                0 if last else descs[i + 1])
        head = descs[0]
        self._posted[head] = _Posted(descs, [(a, n) for a, n, f in segs if f & DESC_F_WRITE])
        self.make_available(head)
        return head

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"no {n} free descriptors (of {self.size})")
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int,
                   table: int | None = None) -> None:
        """Writes descriptor ``index`` of the ring's table (or of ``table``) as given."""
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr, length, flags, nxt))

    def add_raw_descriptors(self, descs: list[tuple[int, int, int, int]], first: int = 0,
                            table: int | None = None) -> None:
        """Writes (addr, len, flags, next) descriptors from index ``first`` on, unchecked.

        Into the ring's descriptor table, or into ``table`` (e.g. an indirect
        table from :meth:`alloc`). Nothing is made available: see
        :meth:`make_available`.
        """
        for i, (addr, length, flags, nxt) in enumerate(descs):
            self.write_desc(first + i, addr, length, flags, nxt, table)

    def make_available(self, head: int) -> None:
        """Puts ``head`` (any value) in the next available-ring slot; see :meth:`publish`."""
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.size),
                          struct.pack("<H", head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Makes every chain added so far visible: writes the available index."""
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Writes ``value`` as the available index (also moves the shadow index)."""
        self.avail_idx = value & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def read_avail_idx(self) -> int:
        """The available index in memory."""
        return self._u16(self.avail + 2)

    # -- completions ---------------------------------------------------------------------

    def used_idx(self) -> int:
        """The used index the device wrote."""
        return self._u16(self.used_ring + 2)

    def used(self) -> list[tuple[int, int]]:
        """The (id, len) used-ring entries added since the last call.

        Descriptors of known chains go back to the free list.
        """
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used_ring + 4 + 8 * (self.last_used % self.size)
            head, length = USED_ELEM.unpack(self.memory.read(slot, 8))
            out.append((head, length))
            posted = self._posted.get(head)
            if posted is not None:
                self._free.extend(posted.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def read_writable(self, head: int) -> bytes:
        """The whole device-writable part of chain ``head`` as it is in memory now."""
        return b"".join(self.memory.read(a, n) for a, n in self._posted[head].writable)

    def fill_writable(self, head: int, byte: int = 0xFF) -> None:
        """Fills the writable part of chain ``head`` with ``byte`` (to spot what the device
        wrote and what it left alone)."""
        for a, n in self._posted[head].writable:
            self.memory.write(a, bytes([byte]) * n)

    # -- notification suppression ------------------------------------------------------

    @property
    def used_event(self) -> int:
        """The driver's used_event (EVENT_IDX): interrupt once used idx passes it."""
        return self._u16(self.avail + 4 + 2 * self.size)

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.memory.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    @property
    def avail_event(self) -> int:
        """The device's avail_event (EVENT_IDX): kick once avail idx passes it."""
        return self._u16(self.used_ring + 4 + 8 * self.size)

    @avail_event.setter
    def avail_event(self, value: int) -> None:
        self.memory.write(self.used_ring + 4 + 8 * self.size, struct.pack("<H", value & 0xFFFF))

    @property
    def no_interrupt(self) -> bool:
        """The available ring's NO_INTERRUPT flag (used without EVENT_IDX)."""
        return bool(self._u16(self.avail) & AVAIL_F_NO_INTERRUPT)

    @no_interrupt.setter
    def no_interrupt(self, value: bool) -> None:
        self.memory.write(self.avail, struct.pack("<H", AVAIL_F_NO_INTERRUPT if value else 0))

    def _u16(self, addr: int) -> int:
        return int.from_bytes(self.memory.read(addr, 2), "little")


class RecordingTransport:
    """A device's transport that records what the device asks of it."""

    def __init__(self) -> None:
        self.notified: list[int] = []
        self.errors: list[tuple[int, str]] = []

    def notify(self, queue: int) -> None:
        self.notified.append(queue)

    def device_error(self, queue: int, reason: str) -> None:
        self.errors.append((queue, reason))
