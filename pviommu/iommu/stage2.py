"""Stage 2 owned by the backend: one guest's IPA -> guest RAM tables, like a hypervisor's.

In the nested (vSMMU) mode the guest's stage 1 (in QEMU's SMMUv3) outputs
intermediate physical addresses; this stage 2 maps them to the guest RAM the
backend really accesses. The tables are real VMSAv8-64 stage-2 descriptors
(:mod:`pviommu.vmsa`) in a buffer of the backend's own (a hypervisor's memory,
never guest RAM), 4 KiB granule, a 40-bit IPA space by default (as KVM's
default VTCR) and 48-bit output.

The guest RAM regions of the memory tables QEMU hands over are adopted once:
identity-mapped (IPA == GPA), read-write. After that stage 2 belongs to the
host (QMP): a region already known is never mapped again behind the host's
back by another endpoint's memory table. ``generation`` grows on every
change that may take a translation away (unmap, protect, a map over a
mapping), so composed translations and ring views cached before are dropped.

Whoever must keep stage 2 across a backend restart sets :attr:`Stage2.on_change`
(called with each change, a :class:`Stage2Change`, the adoption of RAM included)
and rebuilds it in a fresh one with :meth:`Stage2.restore` (a snapshot of the
ranges) and :meth:`Stage2.replay` (the changes since, in order: the same tables
and generation as before, since the builder is deterministic);
:mod:`pviommu.iommu.stage2_store` does both.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ..vmsa import Access as VmsaAccess
from ..vmsa import (
    BufferMemory,
    Builder,
    Granule,
    Perm,
    PoolAllocator,
    TablePoolExhausted,
    VmsaConfig,
    Walk,
    Walker,
)
from ..vmsa.descriptors import s2_attrs, s2_perm_bits, s2_permissions

log = logging.getLogger(__name__)

PAGE = 0x1000
DEFAULT_IAS = 40
DEFAULT_OAS = 48
DEFAULT_TABLE_MEMORY = 8 << 20
TABLE_MEMORY_BASE = 0x8000_0000_0000  # where the tables sit in the backend's own address map


class Stage2Error(ValueError):
    """A stage-2 change that cannot be made (bad range, no room for tables)."""


@dataclass(frozen=True)
class Stage2Range:
    """IPA ``[ipa, ipa+size)`` -> ``[pa, pa+size)`` with ``perm``; adjacent leaves with
    the same permissions and contiguous output merged."""

    ipa: int
    pa: int
    size: int
    perm: Perm

    @property
    def end(self) -> int:
        """The last IPA of the range (inclusive, as QMP ranges are)."""
        return self.ipa + self.size - 1


class Stage2Change(NamedTuple):
    """One change made to stage 2, as it is replayed: ``op`` is "adopt" (a RAM region
    ``ipa``+``size``), "map", "unmap" or "protect"; ``perm`` is an int of
    :class:`~pviommu.vmsa.Perm`."""

    op: str
    ipa: int
    size: int
    pa: int = 0
    perm: int = 0


class Stage2:
    """One guest's stage-2 translation: builder, walker, RAM adoption, generation."""

    def __init__(self, ias: int = DEFAULT_IAS, oas: int = DEFAULT_OAS,
                 table_memory: int = DEFAULT_TABLE_MEMORY) -> None:
        self.config = VmsaConfig.stage2(Granule.G4K, ias, oas)
        self.memory = BufferMemory(table_memory, TABLE_MEMORY_BASE)
        self.allocator = PoolAllocator.over(self.memory)
        self.builder = Builder(self.config, self.memory, self.allocator)
        self.walker: Walker = self.builder.walker()
        self.generation = 0
        self.ram: list[tuple[int, int]] = []  # adopted guest RAM regions (gpa, size)
        self._ranges: tuple[tuple[int, int], tuple[Stage2Range, ...]] | None = None
        self.on_change: Callable[[Stage2Change], None] | None = None
        """Called after every change (a failed one included: it may have split or
        dropped entries), e.g. to persist it."""

    @property
    def ias(self) -> int:
        """The IPA size in bits."""
        return self.config.ias

    # -- the guest RAM QEMU hands over -----------------------------------------------------

    def adopt(self, regions: list[tuple[int, int]]) -> int:
        """Identity-maps, read-write, every region ``(gpa, size)`` not adopted before;
        returns how many were. A region beyond the IPA size is left out (logged)."""
        added = 0
        for gpa, size in regions:
            lo, hi = gpa & ~(PAGE - 1), -(-(gpa + size) // PAGE) * PAGE
            if any(lo < g + n and g < hi for g, n in self.ram):
                continue
            if hi > 1 << self.ias:
                log.warning("stage 2: guest RAM %#x+%#x is beyond the %d-bit IPA space; "
                            "not mapped", gpa, size, self.ias)
                continue
            self.builder.map(lo, lo, hi - lo, s2_attrs(Perm.R | Perm.W))
            self.ram.append((lo, hi - lo))
            added += 1
            log.info("stage 2: guest RAM IPA %#x+%#x mapped to itself, RW", lo, hi - lo)
            if self.on_change is not None:
                self.on_change(Stage2Change("adopt", lo, hi - lo))
        return added

    def restore(self, ram: list[tuple[int, int]], ranges: list[Stage2Range],
                generation: int) -> None:
        """Makes this (fresh) stage 2 the one saved: the RAM regions adopted, the ranges
        mapped, the generation. The same RAM handed over again is then not remapped."""
        if self.ram or self.generation:
            raise Stage2Error("stage 2 can only be restored into a fresh one")
        for r in ranges:
            self._check(r.ipa, r.size, r.pa)
            self._edit(functools.partial(self.builder.map, r.ipa, r.pa, r.size,
                                         s2_attrs(r.perm)), None)
        self.ram = [(gpa, size) for gpa, size in ram]
        self.generation = generation

    def replay(self, change: Stage2Change) -> None:
        """Makes ``change`` again, without telling :attr:`on_change`; one that failed
        when it was made fails the same way again, and is passed over."""
        notify, self.on_change = self.on_change, None
        try:
            if change.op == "adopt":
                self.adopt([(change.ipa, change.size)])
            elif change.op == "map":
                self.map(change.ipa, change.pa, change.size, Perm(change.perm))
            elif change.op == "unmap":
                self.unmap(change.ipa, change.size)
            elif change.op == "protect":
                self.protect(change.ipa, change.size, Perm(change.perm))
            else:
                raise Stage2Error(f"unknown stage-2 change {change.op!r}")
        except Stage2Error as e:
            if change.op not in ("map", "unmap", "protect"):
                raise
            log.debug("stage 2: replayed %s failed again: %s", change, e)
        finally:
            self.on_change = notify

    # -- what the host (QMP) does ----------------------------------------------------------

    def _check(self, ipa: int, size: int, pa: int | None = None) -> None:
        if size <= 0 or ipa % PAGE or size % PAGE:
            raise Stage2Error(f"IPA range {ipa:#x}+{size:#x} is empty or not aligned to "
                              f"{PAGE:#x}")
        if ipa + size > 1 << self.ias:
            raise Stage2Error(f"IPA range {ipa:#x}+{size:#x} is beyond the {self.ias}-bit "
                              "IPA space")
        if pa is not None and (pa % PAGE or pa + size > 1 << self.config.oas):
            raise Stage2Error(f"output range {pa:#x}+{size:#x} is not aligned to {PAGE:#x} "
                              f"or beyond the {self.config.oas}-bit output size")

    def map(self, ipa: int, pa: int, size: int, perm: Perm) -> None:
        """Maps IPA ``[ipa, ipa+size)`` to ``[pa, pa+size)`` with ``perm`` (replacing what
        was there)."""
        self._check(ipa, size, pa)
        self._edit(lambda: self.builder.map(ipa, pa, size, s2_attrs(perm)),
                   Stage2Change("map", ipa, size, pa, int(perm)))

    def unmap(self, ipa: int, size: int) -> None:
        """Unmaps IPA ``[ipa, ipa+size)``; holes stay holes."""
        self._check(ipa, size)
        self._edit(lambda: self.builder.unmap(ipa, size), Stage2Change("unmap", ipa, size))

    def protect(self, ipa: int, size: int, perm: Perm) -> None:
        """Sets the permissions of everything mapped in ``[ipa, ipa+size)``."""
        self._check(ipa, size)
        self._edit(lambda: self.builder.protect(ipa, size, s2_perm_bits(perm)),
                   Stage2Change("protect", ipa, size, 0, int(perm)))

    def _edit(self, change: Callable[[], None], record: Stage2Change | None) -> None:
        try:
            change()
        except TablePoolExhausted as e:
            raise Stage2Error(f"no room left for stage-2 tables: {e}") from None
        finally:
            # Even a change that failed half-way may have split or dropped entries.
            self.generation += 1
            if record is not None and self.on_change is not None:
                self.on_change(record)

    # -- reading it back -------------------------------------------------------------------

    def walk(self, ipa: int, access: VmsaAccess | None) -> Walk:
        """The walk of ``ipa`` for ``access``; raises :class:`~pviommu.vmsa.VmsaFault`."""
        return self.walker.walk(ipa, access)

    def ranges(self, start: int = 0, end: int = (1 << 64) - 1) -> list[Stage2Range]:
        """The mapped ranges overlapping IPA ``[start, end]``, merged.

        The merged list is walked once per change of stage 2 (its generation, or
        the RAM adopted) and kept: a QMP client may ask for it a hundred times a
        second while the guest does I/O.
        """
        key = (self.generation, len(self.ram))
        cached = self._ranges
        if cached is None or cached[0] != key:
            out: list[Stage2Range] = []
            for m in self.builder.mappings():
                perm = s2_permissions(m.attrs)
                last = out[-1] if out else None
                if (last is not None and last.ipa + last.size == m.ia
                        and last.pa + last.size == m.oa and last.perm == perm):
                    out[-1] = Stage2Range(last.ipa, last.pa, last.size + m.size, perm)
                else:
                    out.append(Stage2Range(m.ia, m.oa, m.size, perm))
            cached = self._ranges = (key, tuple(out))
        return [r for r in cached[1] if r.ipa <= end and r.ipa + r.size > start]

    @property
    def tables_bytes(self) -> int:
        """Bytes of table memory in use."""
        return sum(self.allocator.in_use.values())
