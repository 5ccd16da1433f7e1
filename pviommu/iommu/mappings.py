"""Non-overlapping IOVA mappings of one domain, looked up in O(log n).

Mappings are kept sorted by start address in two parallel lists; lookups and
range queries bisect, so their cost grows with log(number of mappings).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

MAP_F_READ = 1
MAP_F_WRITE = 2
MAP_F_MMIO = 4


@dataclass(frozen=True)
class Mapping:
    """``[virt_start, virt_end]`` (inclusive) -> ``phys_start``, with MAP flags."""

    virt_start: int
    virt_end: int
    phys_start: int
    flags: int

    def translate(self, iova: int) -> int:
        """The physical address of ``iova`` (which must lie inside the mapping)."""
        return iova - self.virt_start + self.phys_start

    @property
    def size(self) -> int:
        """Number of bytes mapped."""
        return self.virt_end - self.virt_start + 1


class MappingTree:
    """The mappings of one domain."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[Mapping] = []

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[Mapping]:
        return iter(list(self._maps))

    def find(self, iova: int) -> Mapping | None:
        """The mapping containing ``iova``."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and self._maps[i].virt_end >= iova:
            return self._maps[i]
        return None

    def _span(self, start: int, end: int) -> tuple[int, int]:
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._maps[lo].virt_end < start:
            lo += 1
        hi = bisect.bisect_right(self._starts, end)
        return lo, hi

    def overlapping(self, start: int, end: int) -> list[Mapping]:
        """Every mapping that shares at least one address with ``[start, end]``."""
        lo, hi = self._span(start, end)
        return self._maps[lo:hi]

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any mapping shares an address with ``[start, end]``."""
        lo, hi = self._span(start, end)
        return hi > lo

    def slot(self, start: int, end: int) -> int | None:
        """Where a mapping of ``[start, end]`` goes (for :meth:`insert`), or None if it
        would overlap one."""
        lo, hi = self._span(start, end)
        return lo if hi == lo else None

    def insert(self, slot: int, mapping: Mapping) -> None:
        """Inserts ``mapping`` at ``slot``, what :meth:`slot` answered for its range with
        nothing added or removed since."""
        self._starts.insert(slot, mapping.virt_start)
        self._maps.insert(slot, mapping)

    def add(self, mapping: Mapping) -> None:
        """Inserts ``mapping``; ValueError if it overlaps another."""
        slot = self.slot(mapping.virt_start, mapping.virt_end)
        if slot is None:
            raise ValueError(f"mapping at {mapping.virt_start:#x} overlaps an existing one")
        self.insert(slot, mapping)

    def remove_range(self, start: int, end: int) -> list[Mapping] | None:
        """Removes every mapping inside ``[start, end]``.

        Returns the removed mappings, or None (and removes nothing) if the range
        would split a mapping.
        """
        lo, hi = self._span(start, end)
        touched = self._maps[lo:hi]
        if touched and (touched[0].virt_start < start or touched[-1].virt_end > end):
            return None  # only the first and the last can stick out: none overlap
        del self._starts[lo:hi]
        del self._maps[lo:hi]
        return touched

    def clear(self) -> None:
        """Removes every mapping."""
        self._starts.clear()
        self._maps.clear()
