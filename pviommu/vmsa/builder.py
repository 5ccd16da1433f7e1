"""Builds and edits translation tables: map, unmap, protect, with blocks kept canonical.

The tables a builder leaves are canonical: a function of the mapping alone,
whatever sequence of calls made it. After every change, each table the
change went through is tidied on the way back up:

* a table whose entries are all invalid is freed and its parent entry
  invalidated (no empty table stays linked; the start table is never freed);
* a table whose entries are all leaves with the same attributes and
  consecutive output addresses starting at an address aligned to the parent
  entry's size is replaced by one block, where the granule allows a block at
  the parent's level.

So an aligned block-sized range mapped in one call becomes a block at once,
and one mapped page by page (or split by a protect and later made uniform
again) is merged back. A change to part of a block splits the block into a
next-level table that reproduces it, then changes that table.

Mapping over an existing mapping replaces it. There is no break-before-make:
the builder assumes no walk runs concurrently with a change (the caller
invalidates its cached translations afterwards). The contiguous bit is
never set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .config import LevelInfo, VmsaConfig
from .descriptors import (
    ADDR_MASK,
    ATTRS_MASK,
    S1_PERM_MASK,
    S2_PERM_MASK,
    TYPE_TABLE,
)
from .memory import TableAllocator, TableMemory
from .walker import Walker


class Mapping(NamedTuple):
    """One leaf of the tables."""

    ia: int
    oa: int
    size: int
    level: int
    attrs: int


class Builder:
    """Owns one set of tables: allocates the start table(s) and edits them."""

    def __init__(self, config: VmsaConfig, memory: TableMemory,
                 allocator: TableAllocator) -> None:
        self.config = config
        self.memory = memory
        self.allocator = allocator
        self._levels = config.levels
        self._granule = config.granule.size
        self._table_size = config.granule.size
        self._perm_mask = S1_PERM_MASK if config.stage == 1 else S2_PERM_MASK
        self.root = allocator.alloc(config.root_size)
        if self.root % config.root_size:
            raise ValueError(f"allocator returned {self.root:#x}, not aligned to "
                             f"{config.root_size:#x}")
        self._zero(self.root, config.root_size)

    def walker(self) -> Walker:
        """A walker over these tables."""
        return Walker(self.config, self.memory, self.root)

    # Public operations.

    def map(self, ia: int, oa: int, size: int, attrs: int) -> None:
        """Map ``[ia, ia + size)`` to ``[oa, oa + size)`` with leaf attribute bits ``attrs``."""
        self._check_range(ia, size)
        if oa % self._granule or oa < 0 or oa + size > 1 << self.config.oas:
            raise ValueError(f"output range {oa:#x}+{size:#x} is unaligned or beyond "
                             f"the {self.config.oas}-bit output address size")
        if attrs & ~ATTRS_MASK:
            raise ValueError(f"attributes {attrs:#x} have bits outside the attribute fields")
        self._map(self.root, 0, ia, ia + size, oa - ia, attrs)

    def unmap(self, ia: int, size: int) -> None:
        """Unmap ``[ia, ia + size)``; unmapped parts of it are left as they are."""
        self._check_range(ia, size)
        self._unmap(self.root, 0, ia, ia + size)

    def protect(self, ia: int, size: int, perm_bits: int) -> None:
        """Replace the permission bits (stage 1: AP, PXN, UXN; stage 2: S2AP, XN)
        of everything mapped in ``[ia, ia + size)``; holes stay holes."""
        self._check_range(ia, size)
        if perm_bits & ~self._perm_mask:
            raise ValueError(f"{perm_bits:#x} has bits outside the stage-{self.config.stage} "
                             "permission fields")
        self._protect(self.root, 0, ia, ia + size, perm_bits)

    def mappings(self) -> Iterator[Mapping]:
        """Every leaf, in input-address order."""
        yield from self._leaves(self.root, 0, 0)

    def destroy(self) -> None:
        """Free every table, the start table(s) included; the builder is unusable after."""
        for i in range(self._levels[0].index_mask + 1):
            self._release(self.memory.read_u64(self.root + 8 * i), 0)
        self.allocator.free(self.root, self.config.root_size)

    # Recursive edits. ``depth`` indexes config.levels (0 = the start level).

    def _map(self, table: int, depth: int, lo: int, hi: int, delta: int, attrs: int) -> None:
        lv = self._levels[depth]
        size = lv.size
        for start, pa in self._entries(table, lv, lo, hi):
            s, e = max(lo, start), min(hi, start + size)
            desc = self.memory.read_u64(pa)
            if s == start and e == start + size and lv.leaf_ok and not (start + delta) % size:
                self._release(desc, depth)
                self.memory.write_u64(pa, (start + delta) | attrs | lv.leaf_type)
                continue
            child = self._child(pa, desc, depth)
            try:
                self._map(child, depth + 1, s, e, delta, attrs)
            finally:
                self._tidy(pa, depth)

    def _unmap(self, table: int, depth: int, lo: int, hi: int) -> None:
        lv = self._levels[depth]
        size = lv.size
        for start, pa in self._entries(table, lv, lo, hi):
            desc = self.memory.read_u64(pa)
            if not desc & 1:
                continue
            s, e = max(lo, start), min(hi, start + size)
            if s == start and e == start + size:
                self._release(desc, depth)
                self.memory.write_u64(pa, 0)
                continue
            child = self._child(pa, desc, depth)
            try:
                self._unmap(child, depth + 1, s, e)
            finally:
                self._tidy(pa, depth)

    def _protect(self, table: int, depth: int, lo: int, hi: int, perm_bits: int) -> None:
        lv = self._levels[depth]
        size = lv.size
        for start, pa in self._entries(table, lv, lo, hi):
            desc = self.memory.read_u64(pa)
            if not desc & 1:
                continue
            s, e = max(lo, start), min(hi, start + size)
            if s == start and e == start + size and not self._is_table(desc, depth):
                self.memory.write_u64(pa, (desc & ~self._perm_mask) | perm_bits)
                continue
            child = self._child(pa, desc, depth)
            try:
                self._protect(child, depth + 1, s, e, perm_bits)
            finally:
                self._tidy(pa, depth)

    # Helpers.

    def _check_range(self, ia: int, size: int) -> None:
        if size <= 0 or ia < 0 or ia % self._granule or size % self._granule:
            raise ValueError(f"range {ia:#x}+{size:#x} is empty or not granule-aligned")
        if ia + size > 1 << self.config.ias:
            raise ValueError(f"range {ia:#x}+{size:#x} is beyond the {self.config.ias}-bit "
                             "input address size")

    def _entries(self, table: int, lv: LevelInfo, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """(input address the entry starts at, descriptor address) for entries meeting [lo, hi)."""
        size = lv.size
        start = lo - lo % size
        while start < hi:
            yield start, table + (((start >> lv.shift) & lv.index_mask) << 3)
            start += size

    def _is_table(self, desc: int, depth: int) -> bool:
        return desc & 0b11 == TYPE_TABLE and self._levels[depth].level < 3

    def _zero(self, pa: int, size: int) -> None:
        write = self.memory.write_u64
        for off in range(0, size, 8):
            write(pa + off, 0)

    def _new_table(self) -> int:
        pa = self.allocator.alloc(self._table_size)
        self._zero(pa, self._table_size)
        return pa

    def _child(self, pa: int, desc: int, depth: int) -> int:
        """The next-level table under the entry at ``pa``: existing, new, or split from a block."""
        if self._is_table(desc, depth):
            return desc & ADDR_MASK
        child = self._new_table()
        if desc & 1:
            sub = self._levels[depth + 1]
            size = self._levels[depth].size
            base = (desc & ADDR_MASK & ~(size - 1)) | (desc & ATTRS_MASK) | sub.leaf_type
            write = self.memory.write_u64
            for i in range(sub.index_mask + 1):
                write(child + 8 * i, base + i * sub.size)
        self.memory.write_u64(pa, child | TYPE_TABLE)
        return child

    def _tidy(self, pa: int, depth: int) -> None:
        """Free the table under ``pa`` if empty, or merge it into a block if uniform."""
        desc = self.memory.read_u64(pa)
        if not self._is_table(desc, depth):
            return
        child = desc & ADDR_MASK
        read = self.memory.read_u64
        sub = self._levels[depth + 1]
        n = sub.index_mask + 1
        first = read(child)
        if not first & 1:
            if any(read(child + 8 * i) & 1 for i in range(1, n)):
                return
            self.allocator.free(child, self._table_size)
            self.memory.write_u64(pa, 0)
            return
        lv = self._levels[depth]
        if (not lv.leaf_ok or first & 0b11 != sub.leaf_type
                or (first & ADDR_MASK) % lv.size):
            return
        step = sub.size
        for i in range(1, n):
            if read(child + 8 * i) != first + i * step:
                return
        self.memory.write_u64(pa, (first & ~0b11) | lv.leaf_type)
        self.allocator.free(child, self._table_size)

    def _release(self, desc: int, depth: int) -> None:
        """Free the table tree under a descriptor (nothing if it is not a table)."""
        if not self._is_table(desc, depth):
            return
        child = desc & ADDR_MASK
        if depth + 2 < len(self._levels):  # the child's entries may be tables
            read = self.memory.read_u64
            for i in range(self._levels[depth + 1].index_mask + 1):
                self._release(read(child + 8 * i), depth + 1)
        self.allocator.free(child, self._table_size)

    def _leaves(self, table: int, depth: int, base: int) -> Iterator[Mapping]:
        lv = self._levels[depth]
        read = self.memory.read_u64
        for i in range(lv.index_mask + 1):
            desc = read(table + 8 * i)
            if not desc & 1:
                continue
            ia = base + (i << lv.shift)
            if self._is_table(desc, depth):
                yield from self._leaves(desc & ADDR_MASK, depth + 1, ia)
            else:
                yield Mapping(ia, desc & ADDR_MASK & ~(lv.size - 1), lv.size, lv.level,
                              desc & ATTRS_MASK)
