"""Descriptor chains: a split virtqueue whose rings and tables the input writes.

The input lays out a queue in guest RAM: its size and features, the descriptor
table (addresses either raw, out of range as they come, or made to point into the
RAM), the available ring, and indirect tables. The device side
(:class:`~pviommu.virtio.queue.SplitQueue`, over a DMA space with cached ring views
or without) then pops every chain, gathers and scatters its buffers, pushes it and
asks whether to interrupt. Checks: each pop gives the chain a plain reference walk
of the spec's rules gives, or fails with VirtqueueError or a memory error where the
reference fails (a loop, an index out of the table, a readable descriptor after a
writable one, a nested or misplaced indirect table, more than 4 GiB, an address
outside guest memory); gathers and scatters touch only guest memory and move the
bytes the chain holds; the used ring gets exactly what was pushed; the interrupt
decision follows the spec's formula.
"""

from __future__ import annotations

import struct

from ..dma import DMA_ERRORS, Access, DmaSpace, PhysicalDma
from ..memory import MemoryAccessError, Piece
from ..virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    Chain,
    SplitQueue,
    VirtqueueError,
    gather,
    scatter,
)
from .common import Bytes, Finding, Ram, check

GPA = 0x40000000
RAM_SIZE = 1 << 16
DESC = struct.Struct("<QIHH")
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_MOVE = 1 << 13
"""Bytes a gather or scatter moves at most per chain (bounded work per input)."""
MAX_POPS = 18
"""Chains popped at most per input: each walk may take a whole table (256 descriptors,
twice with the reference), and inputs must stay cheap."""

_ram: Ram | None = None


def ram() -> Ram:
    """The guest RAM the queue lives in (made once, zeroed per input)."""
    global _ram
    if _ram is None:
        _ram = Ram(RAM_SIZE, GPA)
    return _ram


class PlainDma:
    """A DMA space without ring views: every ring access is translated."""

    def __init__(self, inner: PhysicalDma) -> None:
        self.inner = inner

    def read(self, addr: int, length: int) -> bytes:
        return self.inner.read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(addr, data)

    def resolve(self, addr: int, length: int, access: Access) -> list[Piece]:
        return self.inner.resolve(addr, length, access)


class RefError(Exception):
    """The reference walk refuses the chain."""


def reference_walk(mem: Ram, table: int, size: int, head: int, indirect_ok: bool
                   ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The chain at ``head`` by the spec's rules, read byte by byte from the RAM."""
    if head >= size:
        raise RefError("head")
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    count, idx, seen, nested, total = size, head, 0, False, 0
    while True:
        seen += 1
        if seen > count:
            raise RefError("loop")
        addr = table + 16 * idx
        if not mem.contains(addr, 16):
            raise RefError("descriptor outside memory")
        a, n, flags, nxt = DESC.unpack(bytes(mem.view[addr - mem.gpa:addr - mem.gpa + 16]))
        if flags & DESC_F_INDIRECT:
            if not indirect_ok or nested or flags & DESC_F_NEXT or readable or writable:
                raise RefError("indirect")
            if n == 0 or n % 16 or n // 16 > MAX_QUEUE_SIZE:
                raise RefError("indirect length")
            table, count, idx, seen, nested = a, n // 16, 0, 0, True
            continue
        if flags & DESC_F_WRITE:
            writable.append((a, n))
        elif writable:
            raise RefError("readable after writable")
        else:
            readable.append((a, n))
        total += n
        if total > MAX_CHAIN_BYTES:
            raise RefError("over 4 GiB")
        if not flags & DESC_F_NEXT:
            return readable, writable
        if nxt >= count:
            raise RefError("next out of table")
        idx = nxt


def _layout(mem: Ram, inp: Bytes, size: int) -> tuple[int, int, int]:
    """Writes the descriptor table and the available ring; returns their addresses and
    the used ring's."""
    desc = GPA
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3
    end = used + 6 + 8 * size
    relocate = inp.take((size + 7) // 8)
    for i in range(size):
        addr, length, flags, nxt = DESC.unpack(inp.take(16))
        if relocate[i // 8] >> (i % 8) & 1:
            addr = GPA + addr % RAM_SIZE  # into the RAM, anywhere (rings included)
        mem.fill(DESC.pack(addr, length, flags, nxt), desc - GPA + 16 * i)
    mem.fill(inp.take(4 + 2 * size + 2), avail - GPA)  # flags, idx, ring, used_event
    mem.fill(inp.take(4 + 8 * size + 2)[:4], used - GPA)  # flags and the used index
    # The rest goes after the rings: indirect tables and buffers.
    mem.fill(inp.rest()[:RAM_SIZE - end], end - GPA)
    return desc, avail, used


def _check_chain(mem: Ram, dma: DmaSpace, chain: Chain) -> None:
    check(chain.readable_len == sum(n for _, n in chain.readable)
          and chain.writable_len == sum(n for _, n in chain.writable),
          f"chain byte totals {chain.readable_len}/{chain.writable_len} are not the sums")
    n = min(chain.readable_len, MAX_MOVE)
    try:
        data = gather(dma, chain.readable, 0, n)
    except DMA_ERRORS:
        check(not all(mem.contains(a, k) for a, k in chain.readable if k),
              "gather failed on buffers inside guest memory")
    else:
        check(len(data) == n, f"gather gave {len(data)} bytes, not {n}")
        expected = b"".join(bytes(mem.view[a - GPA:a - GPA + k]) for a, k in
                            _prefix(chain.readable, n))
        check(data == expected, "gather read other bytes than the buffers hold")
    n = min(chain.writable_len, MAX_MOVE)
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(n))
    try:
        scatter(dma, chain.writable, pattern)
    except DMA_ERRORS:
        check(not all(mem.contains(a, k) for a, k in chain.writable if k),
              "scatter failed on buffers inside guest memory")
    except VirtqueueError as e:
        raise Finding(f"scatter of {n} bytes into a {chain.writable_len}-byte chain: {e}") \
            from None


def _prefix(segs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out = []
    for a, k in segs:
        if n <= 0:
            break
        take = min(k, n)
        out.append((a, take))
        n -= take
    return out


def one_input(data: bytes) -> None:
    """Lays out a queue from ``data`` and drives its device side over every chain."""
    inp = Bytes(data)
    mode = inp.u8()
    size = SIZES[inp.u8() % len(SIZES)]
    event_idx, indirect, plain = bool(mode & 1), bool(mode & 2), bool(mode & 4)
    next_avail = inp.u16() if mode & 8 else 0
    mem = ram()
    mem.clear()
    desc, avail, used = _layout(mem, inp, size)
    if mode & 16:
        used = GPA + RAM_SIZE - 4 if mode & 32 else used + RAM_SIZE  # past the end
    phys = PhysicalDma(mem.memory)
    dma: DmaSpace = PlainDma(phys) if plain else phys
    try:
        queue = SplitQueue(dma, size, desc, avail, used, event_idx=event_idx,
                           indirect=indirect, next_avail=next_avail)
        used_idx = queue.used_idx
    except MemoryAccessError:
        check(not mem.contains(used, 6 + 8 * size), "queue set-up failed on rings in memory")
        return
    for _ in range(min(size + 2, MAX_POPS)):
        before = queue.next_avail
        avail_idx = int.from_bytes(mem.view[avail - GPA + 2:avail - GPA + 4], "little")
        head = int.from_bytes(mem.view[avail - GPA + 4 + 2 * (before % size):][:2], "little")
        pending = (avail_idx - before) & 0xFFFF
        try:
            expected: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = \
                reference_walk(mem, desc, size, head, indirect) if pending else None
        except RefError:
            expected = None
        try:
            chain = queue.pop()
        except (VirtqueueError, *DMA_ERRORS) as e:
            rings_out = isinstance(e, DMA_ERRORS) and not mem.contains(used, 6 + 8 * size)
            check(rings_out or (pending and (pending > size or expected is None)),
                  f"pop refused a chain the spec allows ({e})")
            check(queue.next_avail == before, "a refused pop moved next_avail")
            return
        if chain is None:
            check(pending == 0, f"pop found no chain with {pending} pending")
            break
        check(pending <= size, f"pop accepted {pending} pending entries in a queue of {size}")
        check(expected is not None, f"pop accepted chain {head} the spec refuses")
        assert expected is not None
        check((chain.head, chain.readable, chain.writable) == (head, *expected),
              f"pop gave {chain}, the reference walk {expected}")
        _check_chain(mem, dma, chain)
        written = chain.writable_len & 0xFFFFFFFF
        try:
            queue.push(chain, written)
        except DMA_ERRORS:
            check(not mem.contains(used, 6 + 8 * size), "push failed on a used ring in memory")
            return
        slot = used - GPA + 4 + 8 * (used_idx % size)
        check(bytes(mem.view[slot:slot + 8]) == struct.pack("<II", chain.head, written),
              "the used element is not what was pushed")
        used_idx = (used_idx + 1) & 0xFFFF
        check(int.from_bytes(mem.view[used - GPA + 2:used - GPA + 4], "little") == used_idx,
              "the used index did not move by one")
        queue.needs_interrupt()
