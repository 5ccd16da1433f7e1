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

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ..memory import GuestMemory
from ..vmsa import Access as VmsaAccess
from ..vmsa import FaultKind, VmsaFault
from .faults import Access, DmaFault, Fault, FaultReason, Stage
from .stage2 import PAGE, Stage2
from .translation import TranslationMiss

MAX_CACHED_PAGES = 4096
MAX_PREFETCH = 256
"""Pages besides the missed one that one fill asks for at once (1 MiB of 4 KiB pages)."""
ADDRESS_LIMIT = 1 << 64
PAGE_MASK = ~(PAGE - 1)
_WRITE = int(Access.WRITE)
_RW = int(Access.READ | Access.WRITE)
_BITS = (int(Access.READ), _WRITE)
_VMSA = {bit: VmsaAccess(bit) for bit in _BITS}


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

    # Optional: ``async prefetch(iova, access)``, a fill that may skip asking (when the
    # channel to stage 1 is busy); used for the pages a miss does not need first.
    # Optional: ``invalidated_since(generation) -> list[(iova, end)] | None``, the ranges
    # that went since ``generation`` (None: unknown); else every change drops everything.


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
            if self._cache and not self._drop_invalidated(key):
                self.stats["composed_flushes"] += 1
                self._cache.clear()
            self._cache_key = key
        memory = self.memory
        if memory is not None and memory.generation != self._memory_generation:
            self._memory_generation = memory.generation
            self.stage2.adopt([(r.gpa, r.size) for r in memory.regions])

    def _drop_invalidated(self, key: tuple[int, int]) -> bool:
        """Drops the composed pages of the stage-1 ranges invalidated since the cache's
        key, when only stage 1 moved and it can say which (a guest's INVALIDATE need
        not cost every other page, the rings' among them); False if it cannot."""
        old1, old2 = self._cache_key
        since = getattr(self.stage1, "invalidated_since", None)
        if key[1] != old2 or since is None:
            return False
        ranges = since(old1)
        if ranges is None:
            return False
        cache = self._cache
        for iova, end in ranges:
            first, last = iova & PAGE_MASK, (end - 1) & PAGE_MASK
            if (last - first) // PAGE + 1 > len(cache):
                for page in [p for p in cache if first <= p <= last]:
                    del cache[page]
            else:
                for page in range(first, last + 1, PAGE):
                    cache.pop(page, None)
        self.stats["composed_partial_flushes"] += 1
        return True

    def translate(self, endpoint: int, iova: int, length: int, access: Access
                  ) -> list[tuple[int, int]]:
        """The guest-RAM pieces behind ``[iova, iova+length)``; raises TranslationMiss
        (stage 1 not at hand; its ``length`` the rest of the range, which a fill
        fetches at once) or DmaFault (stage 2 refuses) for the first page that does
        not translate."""
        if endpoint != self.endpoint:
            raise DmaFault(Fault(endpoint, iova, access, FaultReason.UNKNOWN))
        end = iova + length
        if length <= 0 or iova < 0 or end > ADDRESS_LIMIT:
            raise DmaFault(Fault(endpoint, iova, access, FaultReason.F_TRANSLATION, Stage.S1))
        memory = self.memory
        if (self.stage1.generation, self.stage2.generation) != self._cache_key or (
                memory is not None and memory.generation != self._memory_generation):
            self._check_cache()
        bits = int(access)  # plain ints from here: IntFlag operations cost on this path
        cache = self._cache
        page = iova & PAGE_MASK
        if end <= page + PAGE:  # one page: most accesses
            entry = cache.get(page)
            if entry is None or entry[1] & bits != bits:
                entry = self._compose(page, iova, end, access, entry)
            else:
                self.stats["composed_hits"] += 1
            return [(entry[0] + iova - page, length)]
        out: list[tuple[int, int]] = []
        addr = iova
        hits = 0
        try:
            while addr < end:
                page = addr & PAGE_MASK
                entry = cache.get(page)
                if entry is None or entry[1] & bits != bits:
                    entry = self._compose(page, addr, end, access, entry)
                else:
                    hits += 1
                n = min(end, page + PAGE) - addr
                pa = entry[0] + (addr - page)
                if out and out[-1][0] + out[-1][1] == pa:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((pa, n))
                addr += n
        finally:
            self.stats["composed_hits"] += hits
        return out

    def _compose(self, page: int, addr: int, end: int, access: Access,
                 old: tuple[int, int] | None) -> tuple[int, int]:
        self.stats["composed_misses"] += 1
        bits = int(access) & _RW
        pieces = self.stage1.lookup(page, PAGE, bits)
        if pieces is None:
            raise TranslationMiss(self.endpoint, addr, access, end - addr)
        ipa_page = pieces[0][0]
        out_page = -1
        for bit in _BITS:
            if not bits & bit:
                continue
            try:
                walk = self.stage2.walk(ipa_page, _VMSA[bit])
            except VmsaFault as e:
                self.stats["stage2_faults"] += 1
                raise DmaFault(NestedFault(self.endpoint, addr, Access(bit), _REASON[e.kind],
                                           Stage.S2, ipa=ipa_page + (addr - page),
                                           level=e.level)) from None
            out_page = walk.oa
        assert out_page >= 0  # access has READ or WRITE
        granted = bits
        if old is not None and old[0] == out_page:
            granted |= old[1]
        if len(self._cache) >= self.max_cached_pages:
            self._cache.clear()
        entry = (out_page, granted)
        self._cache[page] = entry
        return entry

    async def fill(self, miss: TranslationMiss) -> list[Fault] | None:
        """Fetches the stage-1 translation ``miss`` lacks from QEMU. A refusal is a guest
        stage-1 fault (QEMU's SMMUv3 queued the event for the guest); a frontend that
        cannot be asked or does not answer is one too, for this access, but the guest
        has no record of it.

        The other pages of the miss's ranges that stage 1 lacks (at most
        :data:`MAX_PREFETCH`) are asked for at the same time (their MISSes
        pipelined), so that the retry does not miss page after page; the faults
        found there are returned, each at the address where the retry will miss."""
        self.stats["stage1_misses"] += 1
        extra = self._prefetchable(miss)
        if not extra:
            await self._fill(miss.iova, miss.access, self.stage1.fill)
            return None
        self.stats["stage1_prefetches"] += len(extra)
        prefetch = getattr(self.stage1, "prefetch", self.stage1.fill)
        results = await asyncio.gather(
            self._fill(miss.iova, miss.access, self.stage1.fill),
            *(self._fill(addr, Access(bits), prefetch) for addr, bits in extra),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, DmaFault):
                raise result
        if isinstance(results[0], DmaFault):
            raise results[0]  # the access the miss is for
        # Only refusals are kept for the retry: a page that could not be asked ahead (a
        # busy or broken channel) is asked again when its access needs it.
        return [r.fault for r in results[1:] if isinstance(r, DmaFault)
                and isinstance(r.fault, NestedFault) and r.fault.guest_notified]

    async def _fill(self, iova: int, access: Access,
                    fetch: Callable[[int, Access | int], Awaitable[None]]) -> None:
        try:
            await fetch(iova, access)
        except Stage1Error as e:
            refused = isinstance(e, Stage1Refused)
            self.stats["stage1_faults" if refused else "stage1_unavailable"] += 1
            raise DmaFault(NestedFault(self.endpoint, iova, access,
                                       FaultReason.F_TRANSLATION, Stage.S1,
                                       guest_notified=refused, detail=str(e))) from None

    def _prefetchable(self, miss: TranslationMiss) -> list[tuple[int, int]]:
        """``(address, access bits)`` of the pages besides the miss's own that its ranges
        need and stage 1 lacks: one per page (a write, if any range writes it, which
        also serves a read when the guest's tables grant both)."""
        first = miss.iova & PAGE_MASK
        lookup = self.stage1.lookup
        want: dict[int, tuple[int, int]] = {}
        budget = MAX_PREFETCH
        for start, length, access in ((miss.iova, miss.length, miss.access), *miss.also):
            bits = int(access) & _RW
            if not bits or length <= 0 or start < 0:
                continue
            addr, end = start, min(start + length, ADDRESS_LIMIT)
            while addr < end and budget:
                page = addr & PAGE_MASK
                if page != first and lookup(page, PAGE, bits) is None:
                    old = want.get(page)
                    if old is None:
                        want[page] = (addr, bits)
                        budget -= 1
                    elif bits & _WRITE and not old[1] & _WRITE:
                        want[page] = (addr, bits)
                addr = page + PAGE
        return list(want.values())
