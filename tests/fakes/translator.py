"""A translation mode of the test's own: page-granular, and optionally missing.

:class:`PageTranslator` implements the Translator and Revocable protocols over
4 KiB pages, like a device IOTLB in front of tables the test writes. With
``miss_first`` every page an endpoint touches misses once (TranslationMiss)
until :meth:`PageTranslator.fill` has fetched it, as the vSMMU's IOTLB does
through QEMU; a page with no mapping fails its fill with a stage-1 fault.
"""

from __future__ import annotations

import asyncio

from pviommu.iommu.faults import Access, DmaFault, Fault, FaultReason, Stage
from pviommu.iommu.translation import Revoked, TranslationMiss

PAGE = 0x1000


class PageTranslator:
    """Pages ``(endpoint, iova page) -> (gpa page, allowed access)``.

    ``fills`` records every fill as ``(endpoint, page, access)``; ``gate``, when
    set, holds each fill until the event is set (a slow frontend).
    """

    def __init__(self, miss_first: bool = False) -> None:
        self.miss_first = miss_first
        self.pages: dict[tuple[int, int], tuple[int, Access]] = {}
        # What was fetched, with the access it was fetched for (as an IOTLB keeps the
        # access it asked for): another access to the page misses again.
        self.present: dict[tuple[int, int], Access] = {}
        self.generation = 0
        self.fills: list[tuple[int, int, Access]] = []
        self.misses = 0
        self.gate: asyncio.Event | None = None

    def map(self, endpoint: int, iova: int, gpa: int, size: int,
            access: Access = Access.READ | Access.WRITE) -> None:
        """Maps ``size`` bytes (whole pages) at ``iova`` to ``gpa``."""
        for off in range(0, size, PAGE):
            self.pages[(endpoint, iova + off)] = (gpa + off, access)

    def invalidate(self, endpoint: int | None = None) -> None:
        """Forgets every fetched page (of ``endpoint``, or all): they miss again."""
        self.present = {p: a for p, a in self.present.items()
                        if endpoint is not None and p[0] != endpoint}
        self.generation += 1

    def translate(self, endpoint: int, iova: int, length: int, access: Access
                  ) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        addr, end = iova, iova + length
        while addr < end:
            page = addr & ~(PAGE - 1)
            fetched = self.present.get((endpoint, page), Access(0))
            if self.miss_first and access & ~fetched:
                self.misses += 1
                raise TranslationMiss(endpoint, addr, access)
            entry = self.pages.get((endpoint, page))
            if entry is None:
                raise DmaFault(Fault(endpoint, addr, access, FaultReason.F_TRANSLATION,
                                     Stage.S1))
            if entry[1] & access != access:
                raise DmaFault(Fault(endpoint, addr, access, FaultReason.F_PERMISSION,
                                     Stage.S1))
            n = min(end, page + PAGE) - addr
            gpa = entry[0] + addr - page
            if out and out[-1][0] + out[-1][1] == gpa:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((gpa, n))
            addr += n
        return out

    async def fill(self, miss: TranslationMiss) -> None:
        page = miss.iova & ~(PAGE - 1)
        self.fills.append((miss.endpoint, page, miss.access))
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)  # a round trip: others run meanwhile
        if (miss.endpoint, page) not in self.pages:
            raise DmaFault(Fault(miss.endpoint, miss.iova, miss.access,
                                 FaultReason.F_TRANSLATION, Stage.S1))
        key = (miss.endpoint, page)
        self.present[key] = self.present.get(key, Access(0)) | miss.access

    def revoke(self, endpoint: int, iova: int) -> Revoked | None:
        page = iova & ~(PAGE - 1)
        entry = self.pages.pop((endpoint, page), None)
        if entry is None:
            return None
        self.present.pop((endpoint, page), None)
        self.generation += 1
        return Revoked(endpoint, 0, page, page + PAGE - 1, entry[0])
