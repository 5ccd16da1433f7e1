"""Where tables live: a two-method memory protocol and a pool of table pages.

The library never touches memory except through :class:`TableMemory`, so the
caller decides where tables are (a private buffer for a hypervisor's stage 2,
an adapter over guest memory for a guest's stage 1).
"""

from __future__ import annotations

import struct
from typing import Protocol

_U64 = struct.Struct("<Q")


class TableAccessError(LookupError):
    """A descriptor address the table memory does not back."""


class TableMemory(Protocol):
    """Little-endian 64-bit descriptor access at a physical address.

    ``read_u64`` raises :class:`TableAccessError` (or another
    :class:`LookupError`) for an address it does not back; the walker turns
    that into an F_WALK_EABT fault.
    """

    def read_u64(self, pa: int) -> int: ...

    def write_u64(self, pa: int, value: int) -> None: ...


class TableAllocator(Protocol):
    """Hands out table memory: ``size`` bytes (a power of two) aligned to ``size``."""

    def alloc(self, size: int) -> int: ...

    def free(self, pa: int, size: int) -> None: ...


class TablePoolExhausted(Exception):
    """The allocator has no room for another table."""


class BufferMemory:
    """Table memory over a bytearray that appears at physical address ``base``."""

    def __init__(self, size: int, base: int = 0) -> None:
        if size <= 0 or size % 8 or base % 8 or base < 0:
            raise ValueError(f"bad table memory {base:#x}+{size:#x}")
        self.buffer = bytearray(size)
        self.base = base
        self.size = size
        self._last = size - 8

    def read_u64(self, pa: int) -> int:
        off = pa - self.base
        if off < 0 or off > self._last or off & 7:
            raise TableAccessError(f"descriptor address {pa:#x} is outside the table memory")
        value: int = _U64.unpack_from(self.buffer, off)[0]
        return value

    def write_u64(self, pa: int, value: int) -> None:
        off = pa - self.base
        if off < 0 or off > self._last or off & 7:
            raise TableAccessError(f"descriptor address {pa:#x} is outside the table memory")
        _U64.pack_into(self.buffer, off, value)


class PoolAllocator:
    """Naturally aligned blocks from ``[base, base + size)``: a bump pointer and
    a free list per block size (freed blocks are reused, never coalesced)."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.end = base + size
        self._next = base
        self._free: dict[int, list[int]] = {}
        self.in_use: dict[int, int] = {}  # pa -> size of every block handed out

    @classmethod
    def over(cls, memory: BufferMemory) -> PoolAllocator:
        """An allocator for the whole of ``memory``."""
        return cls(memory.base, memory.size)

    def alloc(self, size: int) -> int:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"table size {size:#x} is not a power of two")
        free = self._free.get(size)
        if free:
            pa = free.pop()
        else:
            pa = -(-self._next // size) * size
            if pa + size > self.end:
                raise TablePoolExhausted(f"no room for a {size:#x}-byte table")
            self._next = pa + size
        self.in_use[pa] = size
        return pa

    def free(self, pa: int, size: int) -> None:
        if self.in_use.get(pa) != size:
            raise ValueError(f"{pa:#x}+{size:#x} was not allocated here")
        del self.in_use[pa]
        self._free.setdefault(size, []).append(pa)
