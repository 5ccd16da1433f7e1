"""A virtio driver's side of one split virtqueue in fuzz RAM: chains of direct
descriptors posted at once, and the used ring read back."""

from __future__ import annotations

import struct

from .common import Ram

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE = 1, 2


class RingDriver:
    """The driver side of a ``size``-entry queue at ``base`` in ``ram``; buffers are
    carved from ``[heap, heap_end)``."""

    def __init__(self, ram: Ram, base: int, size: int, heap: int, heap_end: int) -> None:
        self.ram, self.size = ram, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = (self.used + 6 + 8 * size + 15) & ~15
        self.heap, self.heap_end = heap, heap_end
        self._next = 0
        self._avail_idx = 0
        self._last_used = 0
        ram.fill(bytes(self.end - base), base - ram.gpa)

    def alloc(self, data: bytes | int) -> int | None:
        """Room for ``data`` (or that many zero bytes) in the heap; None when full."""
        n = data if isinstance(data, int) else len(data)
        if self.heap + n > self.heap_end:
            return None
        addr, self.heap = self.heap, (self.heap + n + 7) & ~7
        if not isinstance(data, int):
            self.ram.fill(data, addr - self.ram.gpa)
        return addr

    def post(self, buffers: list[tuple[int, int, bool]]) -> int | None:
        """Posts a chain of (address, length, device-writable); its head, or None when
        the table is full."""
        if not buffers or self._next + len(buffers) > self.size:
            return None
        head = self._next
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.ram.fill(DESC.pack(addr, length, flags, 0 if last else head + i + 1),
                          self.desc - self.ram.gpa + 16 * (head + i))
        self._next += len(buffers)
        slot = self.avail + 4 + 2 * (self._avail_idx % self.size)
        self.ram.fill(struct.pack("<H", head), slot - self.ram.gpa)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.ram.fill(struct.pack("<H", self._avail_idx), self.avail + 2 - self.ram.gpa)
        return head

    def completed(self) -> list[tuple[int, int]]:
        """The (head, written) elements used since the last call."""
        base = self.used - self.ram.gpa
        idx = struct.unpack_from("<H", self.ram.view, base + 2)[0]
        out = []
        while self._last_used != idx:
            off = base + 4 + 8 * (self._last_used % self.size)
            out.append(USED_ELEM.unpack_from(self.ram.view, off))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes of RAM at ``addr``."""
        off = addr - self.ram.gpa
        return bytes(self.ram.view[off:off + n])
