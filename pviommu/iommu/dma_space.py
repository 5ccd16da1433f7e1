"""The DMA space of an endpoint behind an IOMMU, whatever its translation mode.

Every access is translated by the endpoint's :class:`~pviommu.iommu.translation.Translator`
before guest memory is touched; a failed translation is reported (``report``:
to the guest's event queue, QMP...) and raised, so that the device completes
its request with its own error status. Nothing the translation refuses is read
or written: all pieces of an access are translated first, then copied. An
armed revocation (``revocations``) sees every DMA before it is translated.

A translator may miss (its translations are fetched asynchronously): the
:class:`~pviommu.iommu.translation.TranslationMiss` goes up to the code that
can wait, which awaits :meth:`TranslatedDma.fill` and retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections.abc import Callable, Iterable

from ..dma import DMA_ERRORS
from ..memory import GuestMemory, Piece
from .faults import Access, DmaFault, Fault
from .revocation import Revocations
from .translation import TranslationMiss, Translator

FaultReport = Callable[[Fault], object]
_PAGE_MASK = ~0xFFF  # the smallest granule: faults found ahead are kept by page
_WRITE = int(Access.WRITE)


class TranslatedDma:
    """What endpoint ``endpoint`` sees: I/O virtual addresses, translated by ``translator``."""

    def __init__(self, translator: Translator, endpoint: int, memory: GuestMemory,
                 report: FaultReport | None = None,
                 revocations: Revocations | None = None) -> None:
        self.translator = translator
        self.endpoint = endpoint
        self.memory = memory
        self.report = report
        self.revocations = revocations
        # Fills that found nothing to fetch, per task: that task's retry of the same
        # access raises the fault (once) instead of missing again.
        self._failed_fills: weakref.WeakKeyDictionary[
            asyncio.Task[object], dict[tuple[int, Access], tuple[int, Fault]]
        ] = weakref.WeakKeyDictionary()

    def _translate(self, addr: int, length: int, access: Access) -> list[tuple[int, int]]:
        if self.revocations is not None:
            self.revocations.before_dma(self.endpoint, addr, length, access)
        try:
            try:
                return self.translator.translate(self.endpoint, addr, length, access)
            except TranslationMiss as miss:
                fault = self._failed_fill(miss)
                if fault is None:
                    raise
                raise DmaFault(fault) from None
        except DmaFault as fault:
            if self.report is not None:
                self.report(fault.fault)
            raise

    def _failed_fill(self, miss: TranslationMiss) -> Fault | None:
        """The fault a fill of this task found for ``miss``'s access, if still current."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop: no fill ever ran
            return None
        failed = self._failed_fills.get(task) if task is not None else None
        if not failed:
            return None
        found = failed.pop((miss.iova, miss.access), None)
        if found is None:  # found while fetching a page ahead of its access
            found = failed.pop((miss.iova & _PAGE_MASK, miss.access), None)
            if found is not None:
                found = (found[0], dataclasses.replace(found[1], address=miss.iova))
        if found is None or found[0] != self.translator.generation:
            return None  # invalidated since: ask again
        return found[1]

    async def fill(self, miss: TranslationMiss) -> None:
        """Fetches the translation ``miss`` lacks (and what else of its ranges the
        translator fetches at once). When there is none (a guest stage-1 fault, say),
        the calling task's retry of that access raises the fault, and it is reported
        then, where the device meets it; so are the faults found ahead."""
        try:
            ahead = await self.translator.fill(miss)
        except DmaFault as e:
            self._remember((miss.iova, miss.access), e.fault)
            return
        for found in ahead or ():
            self._remember((found.address & _PAGE_MASK, found.access), found)

    def _remember(self, key: tuple[int, Access], fault: Fault) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._failed_fills.setdefault(task, {})[key] = (self.translator.generation, fault)

    def widen(self, miss: TranslationMiss, ranges: Iterable[tuple[int, int, Access]]
              ) -> TranslationMiss:
        """``miss`` with whatever else of ``ranges`` (all the buffers of the request
        that met it) misses too, so that one fill fetches what the request needs.
        Faults are not reported here: the request's own access meets them."""
        also = []
        translate = self.translator.translate
        for addr, length, access in ranges:
            if length <= 0:
                continue
            try:
                translate(self.endpoint, addr, length, access)
            except TranslationMiss as m:
                if m.iova != miss.iova or m.access != miss.access:
                    also.append((m.iova, m.length, m.access))
            except DmaFault:
                pass
        return miss.widened(also) if also else miss

    @property
    def generation(self) -> int:
        """Changes whenever a translation given out before may no longer hold (both
        counters only grow, so their sum changes whenever either does)."""
        return self.memory.generation + self.translator.generation

    def try_view(self, addr: int, length: int, access: Access) -> memoryview | None:
        """One local view of the translated range, or None; faults are not reported,
        misses not filled, and the lookup is no DMA (an armed revocation waits for a
        real one)."""
        try:
            pieces = self.translator.translate(self.endpoint, addr, length, access)
            if len(pieces) != 1:
                return None
            piece = self.memory.piece(pieces[0][0], length, bool(access & Access.WRITE))
        except (*DMA_ERRORS, TranslationMiss):
            return None
        return piece if isinstance(piece, memoryview) else None

    def resolve(self, addr: int, length: int, access: Access) -> list[Piece]:
        """The guest memory behind ``[addr, addr+length)``, every piece translated first."""
        write = bool(int(access) & _WRITE)  # int first: IntFlag's & is a Python call
        return [self.memory.piece(gpa, n, write)
                for gpa, n in self._translate(addr, length, access)]

    def read(self, addr: int, length: int) -> bytes:
        """Copies ``length`` bytes from I/O virtual address ``addr``."""
        pieces = self._translate(addr, length, Access.READ)
        views = [self.memory.view(gpa, n, write=False) for gpa, n in pieces]
        return b"".join(views)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to I/O virtual address ``addr``."""
        pieces = self._translate(addr, len(data), Access.WRITE)
        views = [self.memory.view(gpa, n) for gpa, n in pieces]
        src = memoryview(data)
        pos = 0
        for view in views:
            view[:] = src[pos:pos + len(view)]
            pos += len(view)


DomainDma = TranslatedDma
"""The name PV-mode callers know it by (an endpoint's DMA space in its domain)."""
