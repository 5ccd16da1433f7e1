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
from typing import Protocol

from ..dma import Access, DmaSpace, TranslationMiss, ViewableDma, viewable

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


# Ring fields the driver reads while the device writes them (the used index and
# entries, avail_event) are stored as one copy of packed bytes, never with
# ``Struct.pack_into``: it zeroes its destination before it packs, so a driver
# polling the used index could read 0 for an instant, take the stale used entry
# at its own index for a completion and free a request the device has not read
# yet (tests/hostile/test_ring_stores.py).


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules; the device needs a reset."""


class Chain:
    """One descriptor chain: device-readable then device-writable buffers.

    The byte totals are computed once, when the chain is built: a chain is not
    changed afterwards.
    """

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(self, head: int, readable: list[tuple[int, int]] | None = None,
                 writable: list[tuple[int, int]] | None = None,
                 readable_len: int | None = None, writable_len: int | None = None) -> None:
        self.head = head
        self.readable: list[tuple[int, int]] = [] if readable is None else readable
        self.writable: list[tuple[int, int]] = [] if writable is None else writable
        self.readable_len = (sum(n for _, n in self.readable) if readable_len is None
                             else readable_len)
        """Total bytes the device may read."""
        self.writable_len = (sum(n for _, n in self.writable) if writable_len is None
                             else writable_len)
        """Total bytes the device may write."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chain):
            return NotImplemented
        return (self.head, self.readable, self.writable) == (
            other.head, other.readable, other.writable)

    __hash__ = None  # type: ignore[assignment]  # mutable lists, like the dataclass it was

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"


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
    if len(segs) == 1:  # the common case, without the generator
        addr, total = segs[0]
        if length is None:
            length = max(total - offset, 0)
        if offset + length > total:
            raise VirtqueueError(
                f"read of {length} bytes at {offset} beyond a {total}-byte buffer")
        return dma.read(addr + offset, length) if length > 0 else b""
    total = sum(n for _, n in segs)
    if length is None:
        length = max(total - offset, 0)
    if offset + length > total:
        raise VirtqueueError(f"read of {length} bytes at {offset} beyond a {total}-byte buffer")
    return b"".join(dma.read(a, n) for a, n in segments(segs, offset, length))


def scatter(dma: DmaSpace, segs: list[tuple[int, int]], data: bytes | bytearray | memoryview,
            offset: int = 0) -> None:
    """Writes ``data`` starting ``offset`` bytes into ``segs``; it must fit."""
    if len(segs) == 1 and offset == 0 and 0 < len(data) <= segs[0][1]:
        dma.write(segs[0][0], data)  # the common case, without the generator
        return
    total = sum(n for _, n in segs)
    if offset + len(data) > total:
        raise VirtqueueError(
            f"write of {len(data)} bytes at {offset} beyond a {total}-byte buffer")
    mv = memoryview(data)
    pos = 0
    for a, n in segments(segs, offset, len(data)):
        dma.write(a, mv[pos:pos + n])
        pos += n


class InflightTracker(Protocol):
    """Where a queue marks the chains it took and returned (vhost-user's in-flight
    region, :mod:`pviommu.transport.vhost_user.inflight`)."""

    def take(self, head: int) -> None:
        """``head`` was taken from the available ring."""

    def before_used(self, head: int) -> None:
        """``head`` is about to go in the used ring."""

    def after_used(self, head: int, used_idx: int) -> None:
        """``head`` is in the used ring, whose index is now ``used_idx``."""

    def recover(self, used_idx: int) -> list[int] | None:
        """The heads left in flight, oldest first (None: nothing was ever tracked)."""


class SplitQueue:
    """The device side of one split virtqueue whose rings live in ``dma``.

    ``next_avail`` is the free-running index of the next available-ring entry
    to process (vhost-user's vring base); the used index is read from memory.

    Ring accesses are the hot path. When the DMA space has a ``generation``
    (it changes whenever a translation it gave may have gone: memory removed,
    an UNMAP, a DETACH) and each ring resolves to one local view, the views are
    kept until the generation changes, like a device IOTLB; otherwise every
    access is translated. Each operation checks the views once, then works on
    them with precompiled structs.
    """

    def __init__(self, dma: DmaSpace, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect: bool = False, next_avail: int = 0) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        for name, addr, align in (("descriptor table", desc, 16), ("available ring", avail, 2),
                                  ("used ring", used, 4)):
            if addr % align:
                raise VirtqueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
        self._dma = dma
        self._cacheable = hasattr(dma, "generation") and viewable(dma)
        self.size = size
        self._mask = size - 1
        self._desc = desc
        self._avail = avail
        self._used = used
        self._avail_event = 4 + 8 * size  # offsets in the used and available rings
        self._used_event = 4 + 2 * size
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = next_avail & 0xFFFF
        self._rings: tuple[memoryview, memoryview, memoryview] | None = None
        self._rings_generation: object = None
        self._used_idx: int | None = None
        self._signalled_used = 0
        self.inflight: InflightTracker | None = None
        self._recovered = True
        self._resubmit: list[int] = []  # heads to pop again first, the oldest last
        self._unpop_resubmitted: int | None = None  # the last pop's head, if resubmitted
        with contextlib.suppress(TranslationMiss):  # else read on first use, from a
            self._load_used_idx()                   # context that can wait for the fill

    # The DMA space and the ring addresses; changing one drops the cached views.

    @property
    def dma(self) -> DmaSpace:
        """The DMA space the rings (and the buffers) live in."""
        return self._dma

    @dma.setter
    def dma(self, dma: DmaSpace) -> None:
        self._dma, self._rings = dma, None
        self._cacheable = hasattr(dma, "generation") and viewable(dma)

    @property
    def desc(self) -> int:
        """The descriptor table's address."""
        return self._desc

    @desc.setter
    def desc(self, addr: int) -> None:
        self._desc, self._rings = addr, None

    @property
    def avail(self) -> int:
        """The available ring's address."""
        return self._avail

    @avail.setter
    def avail(self, addr: int) -> None:
        self._avail, self._rings = addr, None

    @property
    def used(self) -> int:
        """The used ring's address."""
        return self._used

    @used.setter
    def used(self, addr: int) -> None:
        self._used, self._rings = addr, None

    def _load_used_idx(self) -> int:
        """The device's used index, read from the used ring the first time."""
        if self._used_idx is None:
            rings = self._views()
            if rings is not None:
                value: int = _U16.unpack_from(rings[2], 2)[0]
            else:
                value = int.from_bytes(self.dma.read(self._used + 2, 2), "little")
            self._used_idx = self._signalled_used = value
        return self._used_idx

    @property
    def used_idx(self) -> int:
        """The free-running index of the next used-ring entry (read from memory at start)."""
        return self._load_used_idx()

    def _views(self) -> tuple[memoryview, memoryview, memoryview] | None:
        """The descriptor table, available and used rings as local views, if cacheable."""
        if not self._cacheable:
            return None
        dma: ViewableDma = self._dma  # type: ignore[assignment]  # checked by _cacheable
        generation = dma.generation
        if generation is None:
            return None
        rings = self._rings
        if rings is not None and generation == self._rings_generation:
            return rings
        self._rings = None
        try_view = dma.try_view
        desc = try_view(self._desc, 16 * self.size, Access.READ)
        avail = try_view(self._avail, 6 + 2 * self.size, Access.READ)
        used = try_view(self._used, 6 + 8 * self.size, Access.READ | Access.WRITE)
        if desc is None or avail is None or used is None:
            return None
        self._rings = rings = (desc, avail, used)
        self._rings_generation = generation
        return rings

    def _avail_u16(self, offset: int) -> int:
        rings = self._views()
        if rings is not None:
            value: int = _U16.unpack_from(rings[1], offset)[0]
            return value
        return int.from_bytes(self.dma.read(self._avail + offset, 2), "little")

    def avail_idx(self) -> int:
        """The driver's available index as it is in memory now."""
        return self._avail_u16(2)

    def has_work(self) -> bool:
        """Whether the driver has made buffers available that were not popped yet."""
        if self.inflight is not None and (not self._recovered or self._resubmit):
            return True
        return self.avail_idx() != self.next_avail

    def track_inflight(self, tracker: InflightTracker) -> None:
        """Marks every chain taken and returned in ``tracker``. What it holds as in
        flight from before (a back-end that died) is popped again first, oldest
        first, and ``next_avail`` goes past it: found at the first :meth:`pop`,
        where a translation miss on the used ring can be waited for."""
        self.inflight = tracker
        self._recovered = False

    def _recover(self, inflight: InflightTracker) -> None:
        used_idx = self._load_used_idx()  # a miss here: nothing changed yet
        heads = inflight.recover(used_idx)
        self._recovered = True
        if heads is None:  # a fresh region: nothing was in flight
            return
        if len(heads) > self.size:
            raise VirtqueueError(f"the in-flight region holds {len(heads)} chains, more than "
                                 f"the queue size {self.size}")
        self._resubmit = heads[::-1]
        self.next_avail = (used_idx + len(heads)) & 0xFFFF

    def _pop_resubmitted(self) -> Chain:
        head = self._resubmit[-1]
        rings = self._views()
        chain = self._walk(head, rings[0] if rings is not None else None)
        self._resubmit.pop()  # only now: a miss above pops it again
        return chain

    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty.

        With EVENT_IDX, an empty ring re-arms the driver's kick (avail_event).
        """
        inflight = self.inflight
        if inflight is not None:
            if not self._recovered:
                self._recover(inflight)
            self._unpop_resubmitted = None
            if self._resubmit:
                chain = self._pop_resubmitted()
                self._unpop_resubmitted = chain.head
                return chain
        rings = self._views()
        next_avail = self.next_avail
        if rings is not None:
            avail = rings[1]
            avail_idx: int = _U16.unpack_from(avail, 2)[0]
            if avail_idx == next_avail:
                if not self.event_idx:
                    return None
                event = self._avail_event  # one copy, not pack_into (see above)
                rings[2][event:event + 2] = _U16.pack(next_avail)
                avail_idx = _U16.unpack_from(avail, 2)[0]
                if avail_idx == next_avail:
                    return None
            self._check_pending(avail_idx)
            head: int = _U16.unpack_from(avail, 4 + 2 * (next_avail & self._mask))[0]
            chain = self._walk(head, rings[0])
        else:
            read = self.dma.read
            avail_idx = int.from_bytes(read(self._avail + 2, 2), "little")
            if avail_idx == next_avail:
                if not self.event_idx:
                    return None
                self.dma.write(self._used + self._avail_event, _U16.pack(next_avail))
                avail_idx = int.from_bytes(read(self._avail + 2, 2), "little")
                if avail_idx == next_avail:
                    return None
            self._check_pending(avail_idx)
            head = int.from_bytes(read(self._avail + 4 + 2 * (next_avail & self._mask), 2),
                                  "little")
            chain = self._walk(head, None)
        self.next_avail = (next_avail + 1) & 0xFFFF
        if inflight is not None:
            inflight.take(head)
        return chain

    def unpop(self) -> None:
        """Undoes the last :meth:`pop` (nothing was pushed since): the chain is popped
        again next time."""
        if self._unpop_resubmitted is not None:
            self._resubmit.append(self._unpop_resubmitted)
            self._unpop_resubmitted = None
            return
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _check_pending(self, avail_idx: int) -> None:
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"available index {avail_idx} is {pending} entries ahead of {self.next_avail}, "
                f"more than the queue size {self.size}")

    def _walk(self, head: int, descs: memoryview | None) -> Chain:
        """The chain at ``head``; ``descs`` is the descriptor table's view, if cached."""
        if head >= self.size:
            raise VirtqueueError(f"chain head {head} outside a queue of {self.size}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        readable_len = writable_len = 0
        table, count, idx = self._desc, self.size, head
        view = descs
        unpack_from = _DESC.unpack_from
        in_indirect = False
        seen = 0
        while True:
            seen += 1
            if seen > count:
                raise VirtqueueError(f"descriptor chain from {head} is longer than its table "
                                     f"({count} entries): a loop")
            if view is not None:
                addr, length, flags, nxt = unpack_from(view, 16 * idx)
            else:
                addr, length, flags, nxt = _DESC.unpack(self.dma.read(table + 16 * idx, 16))
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor but INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"indirect table length {length} is invalid")
                if readable or writable:
                    raise VirtqueueError("indirect descriptor after direct descriptors")
                table, count, idx = addr, length // 16, 0
                view = None
                in_indirect = True
                seen = 0
                continue
            if flags & DESC_F_WRITE:
                writable.append((addr, length))
                writable_len += length
            elif writable:
                raise VirtqueueError(
                    f"device-readable descriptor after a device-writable one in chain {head}")
            else:
                readable.append((addr, length))
                readable_len += length
            if readable_len + writable_len > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"descriptor chain from {head} exceeds 4 GiB")
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable, readable_len, writable_len)
            if nxt >= count:
                raise VirtqueueError(f"next descriptor {nxt} outside a table of {count}")
            idx = nxt

    def push(self, chain: Chain | int, written: int) -> None:
        """Returns a chain to the driver, saying ``written`` bytes were written."""
        head = chain.head if isinstance(chain, Chain) else chain
        used_idx = self._used_idx
        if used_idx is None:
            used_idx = self._load_used_idx()
        rings = self._views()
        nxt = (used_idx + 1) & 0xFFFF
        inflight = self.inflight
        if inflight is not None:
            inflight.before_used(head)
        if rings is not None:
            used = rings[2]
            at = 4 + 8 * (used_idx & self._mask)  # one copy each, not pack_into (see above)
            used[at:at + 8] = _USED_ELEM.pack(head, written)
            # x86-64 keeps stores in order, so the element is visible before the index.
            used[2:4] = _U16.pack(nxt)
        else:
            self.dma.write(self._used + 4 + 8 * (used_idx & self._mask),
                           _USED_ELEM.pack(head, written))
            self.dma.write(self._used + 2, _U16.pack(nxt))
        self._used_idx = nxt  # only now: a miss above leaves a push to redo whole
        if inflight is not None:
            inflight.after_used(head, nxt)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        new = self._used_idx
        if new is None:
            new = self._load_used_idx()
        old = self._signalled_used
        if old == new:
            return False
        if self.event_idx:
            used_event = self._avail_u16(self._used_event)
            self._signalled_used = new
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = self._avail_u16(0)
        self._signalled_used = new
        return not flags & AVAIL_F_NO_INTERRUPT
