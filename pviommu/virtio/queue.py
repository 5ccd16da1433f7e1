"""Split virtqueues (virtio 1.x, "Split Virtqueues") over a DMA space.

Everything read from the ring is driver-controlled and untrusted: indices,
descriptor chains, indirect tables. A chain that breaks the spec's rules raises
:class:`VirtqueueError`; the device then marks itself broken (NEEDS_RESET)
instead of guessing.

A DMA space may answer an access with
:class:`~pviommu.iommu.translation.TranslationMiss` (its translation must be
fetched asynchronously). Every operation here is restartable: a miss leaves
the queue as it was (``pop`` advances ``next_avail`` only once the whole chain
is walked; ``push`` and ``needs_interrupt`` change their indices only after
their last access), so the caller awaits the fill and calls it again.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..dma import Access, DmaSpace, TranslationMiss, viewable

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
MAX_CHAIN_BYTES = 1 << 32
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules; the device needs a reset."""


@dataclass
class Chain:
    """One descriptor chain: device-readable then device-writable buffers."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        """Total bytes the device may read."""
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        """Total bytes the device may write."""
        return sum(n for _, n in self.writable)


def segments(segs: list[tuple[int, int]], offset: int, length: int
              ) -> Iterator[tuple[int, int]]:
    """The (addr, len) pieces of ``length`` bytes starting ``offset`` bytes into ``segs``."""
    for addr, n in segs:
        if length <= 0:
            return
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        yield addr + offset, take
        length -= take
        offset = 0


def gather(dma: DmaSpace, segs: list[tuple[int, int]], offset: int = 0,
           length: int | None = None) -> bytes:
    """Reads ``length`` bytes (default: all) starting ``offset`` bytes into ``segs``."""
    total = sum(n for _, n in segs)
    if length is None:
        length = max(total - offset, 0)
    if offset + length > total:
        raise VirtqueueError(f"read of {length} bytes at {offset} beyond a {total}-byte buffer")
    return b"".join(dma.read(a, n) for a, n in segments(segs, offset, length))


def scatter(dma: DmaSpace, segs: list[tuple[int, int]], data: bytes | bytearray | memoryview,
            offset: int = 0) -> None:
    """Writes ``data`` starting ``offset`` bytes into ``segs``; it must fit."""
    total = sum(n for _, n in segs)
    if offset + len(data) > total:
        raise VirtqueueError(
            f"write of {len(data)} bytes at {offset} beyond a {total}-byte buffer")
    mv = memoryview(data)
    pos = 0
    for a, n in segments(segs, offset, len(data)):
        dma.write(a, mv[pos:pos + n])
        pos += n


class SplitQueue:
    """The device side of one split virtqueue whose rings live in ``dma``.

    ``next_avail`` is the free-running index of the next available-ring entry
    to process (vhost-user's vring base); the used index is read from memory.

    Ring accesses are the hot path. When the DMA space has a ``generation``
    (it changes whenever a translation it gave may have gone: memory removed,
    an UNMAP, a DETACH) and each ring resolves to one local view, the views are
    kept until the generation changes, like a device IOTLB; otherwise every
    access is translated.
    """

    def __init__(self, dma: DmaSpace, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect: bool = False, next_avail: int = 0) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        for name, addr, align in (("descriptor table", desc, 16), ("available ring", avail, 2),
                                  ("used ring", used, 4)):
            if addr % align:
                raise VirtqueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
        self.dma = dma
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = next_avail & 0xFFFF
        self._rings: tuple[memoryview, memoryview, memoryview] | None = None
        self._rings_generation: object = None
        self._used_idx: int | None = None
        self._signalled_used = 0
        with contextlib.suppress(TranslationMiss):  # else read on first use, from a
            self._load_used_idx()                   # context that can wait for the fill

    def _load_used_idx(self) -> int:
        """The device's used index, read from the used ring the first time."""
        if self._used_idx is None:
            self._used_idx = self._signalled_used = self._used_u16(2)
        return self._used_idx

    @property
    def used_idx(self) -> int:
        """The free-running index of the next used-ring entry (read from memory at start)."""
        return self._load_used_idx()

    def _views(self) -> tuple[memoryview, memoryview, memoryview] | None:
        """The descriptor table, available and used rings as local views, if cacheable."""
        generation = getattr(self.dma, "generation", None)
        if generation is None:
            return None
        key = (generation, self.desc, self.avail, self.used)
        if self._rings is not None and key == self._rings_generation:
            return self._rings
        self._rings = None
        dma = self.dma
        if not viewable(dma):
            return None
        try_view = dma.try_view
        desc = try_view(self.desc, 16 * self.size, Access.READ)
        avail = try_view(self.avail, 6 + 2 * self.size, Access.READ)
        used = try_view(self.used, 6 + 8 * self.size, Access.READ | Access.WRITE)
        if desc is None or avail is None or used is None:
            return None
        self._rings = (desc, avail, used)
        self._rings_generation = key
        return self._rings

    def _avail_u16(self, offset: int) -> int:
        rings = self._views()
        if rings is not None:
            value: int = _U16.unpack_from(rings[1], offset)[0]
            return value
        return int.from_bytes(self.dma.read(self.avail + offset, 2), "little")

    def _used_u16(self, offset: int) -> int:
        rings = self._views()
        if rings is not None:
            value: int = _U16.unpack_from(rings[2], offset)[0]
            return value
        return int.from_bytes(self.dma.read(self.used + offset, 2), "little")

    def _put_used(self, offset: int, data: bytes) -> None:
        rings = self._views()
        if rings is not None:
            rings[2][offset:offset + len(data)] = data
        else:
            self.dma.write(self.used + offset, data)

    def _descriptor(self, table: int, idx: int) -> tuple[int, int, int, int]:
        if table == self.desc:
            rings = self._views()
            if rings is not None:
                return _DESC.unpack_from(rings[0], 16 * idx)
        return _DESC.unpack(self.dma.read(table + 16 * idx, 16))

    def avail_idx(self) -> int:
        """The driver's available index as it is in memory now."""
        return self._avail_u16(2)

    def has_work(self) -> bool:
        """Whether the driver has made buffers available that were not popped yet."""
        return self.avail_idx() != self.next_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty.

        With EVENT_IDX, an empty ring re-arms the driver's kick (avail_event).
        """
        avail_idx = self.avail_idx()
        if avail_idx == self.next_avail:
            if not self.event_idx:
                return None
            self._put_used(4 + 8 * self.size, _U16.pack(self.next_avail))
            avail_idx = self.avail_idx()
            if avail_idx == self.next_avail:
                return None
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"available index {avail_idx} is {pending} entries ahead of {self.next_avail}, "
                f"more than the queue size {self.size}")
        head = self._avail_u16(4 + 2 * (self.next_avail % self.size))
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> Chain:
        if head >= self.size:
            raise VirtqueueError(f"chain head {head} outside a queue of {self.size}")
        chain = Chain(head)
        table, count, idx = self.desc, self.size, head
        in_indirect = False
        seen = 0
        total = 0
        while True:
            seen += 1
            if seen > count:
                raise VirtqueueError(f"descriptor chain from {head} is longer than its table "
                                     f"({count} entries): a loop")
            addr, length, flags, nxt = self._descriptor(table, idx)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor but INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"indirect table length {length} is invalid")
                if chain.readable or chain.writable:
                    raise VirtqueueError("indirect descriptor after direct descriptors")
                table, count, idx = addr, length // 16, 0
                in_indirect = True
                seen = 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"descriptor chain from {head} exceeds 4 GiB")
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise VirtqueueError(
                    f"device-readable descriptor after a device-writable one in chain {head}")
            else:
                chain.readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= count:
                raise VirtqueueError(f"next descriptor {nxt} outside a table of {count}")
            idx = nxt

    def push(self, chain: Chain | int, written: int) -> None:
        """Returns a chain to the driver, saying ``written`` bytes were written."""
        head = chain.head if isinstance(chain, Chain) else chain
        used_idx = self._load_used_idx()
        self._put_used(4 + 8 * (used_idx % self.size), _USED_ELEM.pack(head, written))
        used_idx = (used_idx + 1) & 0xFFFF
        # x86-64 keeps stores in order, so the element is visible before the index.
        self._put_used(2, _U16.pack(used_idx))
        self._used_idx = used_idx  # only now: a miss above leaves a push to redo whole

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        new = self._load_used_idx()
        old = self._signalled_used
        if old == new:
            return False
        if self.event_idx:
            used_event = self._avail_u16(4 + 2 * self.size)
            self._signalled_used = new
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = self._avail_u16(0)
        self._signalled_used = new
        return not flags & AVAIL_F_NO_INTERRUPT
