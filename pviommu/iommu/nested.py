"""Nested translation for one vSMMU endpoint: the guest's stage 1, then the backend's stage 2.

Stage 1 is the guest's, held by QEMU's SMMUv3 and reached through the
endpoint's device IOTLB (:class:`~pviommu.transport.vhost_user.iotlb.DeviceIotlb`):
a page it lacks raises :class:`~pviommu.iommu.translation.TranslationMiss`, and
:meth:`NestedTranslator.fill` asks QEMU (IOTLB MISS). Its output is an IPA.
Stage 2 (:class:`~pviommu.iommu.stage2.Stage2`) is the backend's own and is
walked for every IPA not cached.

The composed (S1+S2) translations are cached per page, with the access they
were composed for, as an SMMU's TLB caches nested translations. The cache is
dropped whenever either stage's generation moves: a guest invalidation from
QEMU, a device stop or a new memory table (the IOTLB's), or a stage-2 change
over QMP (stage 2's). The translator's ``generation`` is the sum of both, so
ring views cached over it are dropped too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from ..memory import GuestMemory
from ..vmsa import Access as VmsaAccess
from ..vmsa import FaultKind, VmsaFault
from .faults import Access, DmaFault, Fault, FaultReason, Stage
from .stage2 import PAGE, Stage2
from .translation import TranslationMiss

MAX_CACHED_PAGES = 4096


class Stage1Error(Exception):
    """A stage-1 translation could not be had (:meth:`Stage1Source.fill`)."""


class Stage1Refused(Stage1Error):
    """The guest's stage-1 tables refuse the access; whoever holds them (QEMU's SMMUv3)
    has queued the fault event for the guest."""


class Stage1Unavailable(Stage1Error):
    """Stage 1 cannot be asked (no channel to it, no answer in time): the guest has no
    record of this fault."""


class Stage1Source(Protocol):
    """Where stage-1 translations come from: the endpoint's device IOTLB (adapted by the
    wiring, which knows the transport) or a test's fake."""

    @property
    def generation(self) -> int:
        """Moves whenever a stage-1 translation given out may have gone."""
        ...

    def lookup(self, iova: int, length: int, access: Access | int
               ) -> list[tuple[int, int]] | None: ...

    async def fill(self, iova: int, access: Access | int) -> None:
        """Fetches the translation of ``iova``; raises :class:`Stage1Refused` when the
        guest's tables refuse it, :class:`Stage1Unavailable` when it cannot be had."""
        ...


@dataclass(frozen=True)
class NestedFault(Fault):
    """A fault of the nested path. Stage 2: ``ipa`` is the IPA it refused and
    ``level`` the table level of the fault. Stage 1: ``guest_notified`` says that
    QEMU's SMMUv3 queued the event for the guest (a MISS it acked with failure)."""

    ipa: int | None = None
    level: int | None = None
    guest_notified: bool = False
    detail: str = ""


_REASON = {FaultKind.F_TRANSLATION: FaultReason.F_TRANSLATION,
           FaultKind.F_ADDR_SIZE: FaultReason.F_ADDR_SIZE,
           FaultKind.F_ACCESS: FaultReason.F_ACCESS,
           FaultKind.F_PERMISSION: FaultReason.F_PERMISSION,
           # An unreadable stage-2 descriptor cannot happen in the backend's own buffer;
           # were it to, it is no translation.
           FaultKind.F_WALK_EABT: FaultReason.F_TRANSLATION}


class NestedTranslator:
    """The Translator of endpoint ``endpoint`` (its StreamID): ``stage1`` then ``stage2``.

    ``memory`` is the endpoint's view of guest RAM: its regions (the memory table)
    are adopted into stage 2 the first time they are seen. ``stats`` counts
    composed hits and misses, stage-1 misses and faults by stage.
    """

    def __init__(self, stage1: Stage1Source, stage2: Stage2, endpoint: int,
                 memory: GuestMemory | None = None, stats: Counter[str] | None = None,
                 max_cached_pages: int = MAX_CACHED_PAGES) -> None:
        self.stage1 = stage1
        self.stage2 = stage2
        self.endpoint = endpoint
        self.memory = memory
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.max_cached_pages = max_cached_pages
        # iova page -> (output page, accesses it was composed for)
        self._cache: dict[int, tuple[int, int]] = {}
        self._cache_key = (-1, -1)
        self._memory_generation = -1

    @property
    def generation(self) -> int:
        """Moves whenever either stage may have taken a translation away."""
        return self.stage1.generation + self.stage2.generation

    def cached(self) -> dict[int, tuple[int, int]]:
        """The composed translations at hand: iova page -> (output page, access bits)."""
        self._check_cache()
        return dict(self._cache)

    def _check_cache(self) -> None:
        key = (self.stage1.generation, self.stage2.generation)
        if key != self._cache_key:
            if self._cache:
                self.stats["composed_flushes"] += 1
            self._cache.clear()
            self._cache_key = key
        memory = self.memory
        if memory is not None and memory.generation != self._memory_generation:
            self._memory_generation = memory.generation
            self.stage2.adopt([(r.gpa, r.size) for r in memory.regions])

    def translate(self, endpoint: int, iova: int, length: int, access: Access
                  ) -> list[tuple[int, int]]:
        """The guest-RAM pieces behind ``[iova, iova+length)``; raises TranslationMiss
        (stage 1 not at hand) or DmaFault (stage 2 refuses) for the first page that
        does not translate."""
        if endpoint != self.endpoint:
            raise DmaFault(Fault(endpoint, iova, access, FaultReason.UNKNOWN))
        if length <= 0 or iova < 0 or iova + length > 1 << 64:
            raise DmaFault(Fault(endpoint, iova, access, FaultReason.F_TRANSLATION, Stage.S1))
        self._check_cache()
        bits = int(access)
        cache = self._cache
        out: list[tuple[int, int]] = []
        addr, end = iova, iova + length
        while addr < end:
            page = addr & ~(PAGE - 1)
            entry = cache.get(page)
            if entry is None or entry[1] & bits != bits:
                entry = self._compose(page, addr, access, entry)
            else:
                self.stats["composed_hits"] += 1
            n = min(end, page + PAGE) - addr
            pa = entry[0] + (addr - page)
            if out and out[-1][0] + out[-1][1] == pa:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((pa, n))
            addr += n
        return out

    def _compose(self, page: int, addr: int, access: Access, old: tuple[int, int] | None
                 ) -> tuple[int, int]:
        self.stats["composed_misses"] += 1
        pieces = self.stage1.lookup(page, PAGE, access)
        if pieces is None:
            raise TranslationMiss(self.endpoint, addr, access)
        ipa_page = pieces[0][0]
        ipa = ipa_page + (addr - page)
        out_page = None
        for bit in (Access.READ, Access.WRITE):
            if not access & bit:
                continue
            try:
                walk = self.stage2.walk(ipa_page, VmsaAccess(int(bit)))
            except VmsaFault as e:
                self.stats["stage2_faults"] += 1
                raise DmaFault(NestedFault(self.endpoint, addr, bit, _REASON[e.kind],
                                           Stage.S2, ipa=ipa, level=e.level)) from None
            out_page = walk.oa
        assert out_page is not None  # access has READ or WRITE
        granted = int(access) & (Access.READ | Access.WRITE)
        if old is not None and old[0] == out_page:
            granted |= old[1]
        if len(self._cache) >= self.max_cached_pages:
            self._cache.clear()
        entry = (out_page, granted)
        self._cache[page] = entry
        return entry

    async def fill(self, miss: TranslationMiss) -> None:
        """Fetches the stage-1 translation ``miss`` lacks from QEMU. A refusal is a guest
        stage-1 fault (QEMU's SMMUv3 queued the event for the guest); a frontend that
        cannot be asked or does not answer is one too, for this access, but the guest
        has no record of it."""
        self.stats["stage1_misses"] += 1
        access = miss.access
        try:
            await self.stage1.fill(miss.iova, access)
        except Stage1Error as e:
            refused = isinstance(e, Stage1Refused)
            self.stats["stage1_faults" if refused else "stage1_unavailable"] += 1
            raise DmaFault(NestedFault(self.endpoint, miss.iova, access,
                                       FaultReason.F_TRANSLATION, Stage.S1,
                                       guest_notified=refused, detail=str(e))) from None
