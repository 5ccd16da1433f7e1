"""The vSMMU mode's host side: one stage 2 per guest, its event queue, and the fault path.

:class:`Vsmmu` is what the backend holds for its vSMMU endpoints: the guest's
:class:`~pviommu.iommu.stage2.Stage2` (shared by every endpoint: one guest, one
VM's stage 2), the host-side :class:`~pviommu.iommu.smmu_events.SmmuEventQueue`,
and, per endpoint, the :class:`~pviommu.iommu.nested.NestedTranslator` and the
DMA space over it. Every fault is published as
:class:`~pviommu.events.FaultRecorded` (stage 1: the guest got its event through
QEMU's SMMUv3; stage 2: it got none); a stage-2 fault also becomes an SMMUv3
event record in the host's queue.

It is also :class:`~pviommu.iommu.translation.Revocable`: the host can take the
IPA page under an endpoint's DMA out of stage 2, now or armed for the next big
DMA (:attr:`Vsmmu.revocations`), e.g. the data buffer of a disk read in flight.
"""

from __future__ import annotations

import logging
from collections import Counter

from ..events import EventBus, FaultRecorded
from ..memory import GuestMemory
from ..vmsa import VmsaFault
from .dma_space import TranslatedDma
from .faults import Access, Fault, Stage
from .nested import NestedFault, NestedTranslator, Stage1Source
from .revocation import Revocations
from .smmu_events import DEFAULT_QUEUE_DEPTH, SmmuEvent, SmmuEventQueue
from .stage2 import PAGE, Stage2
from .translation import Revoked

log = logging.getLogger(__name__)


class Vsmmu:
    """Stage 2, event queue and fault reporting of one guest's vSMMU endpoints."""

    def __init__(self, events: EventBus, stage2: Stage2 | None = None,
                 queue_depth: int = DEFAULT_QUEUE_DEPTH) -> None:
        self.events = events
        self.stage2 = stage2 if stage2 is not None else Stage2()
        self.queue = SmmuEventQueue(events, queue_depth)
        self.faults: Counter[str] = Counter()
        self.translators: dict[int, NestedTranslator] = {}  # the latest per endpoint
        self.revocations = Revocations(self, events)

    def translator(self, stage1: Stage1Source, endpoint: int, memory: GuestMemory | None,
                   stats: Counter[str] | None = None) -> NestedTranslator:
        """The nested translator of ``endpoint`` over its ``stage1``."""
        translator = NestedTranslator(stage1, self.stage2, endpoint, memory, stats)
        self.translators[endpoint] = translator
        return translator

    def dma(self, stage1: Stage1Source, endpoint: int, memory: GuestMemory,
            stats: Counter[str] | None = None) -> TranslatedDma:
        """The DMA space of ``endpoint``: every access through S1 then S2, faults reported."""
        return TranslatedDma(self.translator(stage1, endpoint, memory, stats), endpoint,
                             memory, self.report, self.revocations)

    def revoke(self, endpoint: int, iova: int) -> Revoked | None:
        """Unmaps from stage 2 the IPA page that ``iova`` translates to for ``endpoint``
        (its stage-1 translation must be at hand); None if it has none."""
        translator = self.translators.get(endpoint)
        if translator is None:
            return None
        page = iova & ~(PAGE - 1)
        for access in (Access.READ, Access.WRITE):
            pieces = translator.stage1.lookup(page, PAGE, access)
            if pieces is not None:
                break
        else:
            return None
        ipa = pieces[0][0]
        try:
            self.stage2.walk(ipa, None)
        except VmsaFault:  # nothing mapped there to take away
            return None
        self.stage2.unmap(ipa, PAGE)
        log.info("vSMMU: stage 2 unmapped IPA %#x under endpoint %#x's IOVA %#x",
                 ipa, endpoint, page)
        return Revoked(endpoint, 0, page, page + PAGE - 1, ipa)

    def report(self, fault: Fault) -> None:
        """Where the DMA spaces report a refused access (once per access the device met)."""
        stage = fault.stage
        self.faults[f"stage{int(stage)}" if stage is not None else "other"] += 1
        if stage is Stage.S2 and isinstance(fault, NestedFault) and fault.ipa is not None:
            event = SmmuEvent.stage2_fault(fault.reason, fault.endpoint, fault.address,
                                           fault.ipa, fault.access)
            log.warning("vSMMU: %s (IPA %#x, level %s)", fault, fault.ipa, fault.level)
            self.events.publish(FaultRecorded(fault, False))
            self.queue.record(event, fault.level)
            return
        notified = isinstance(fault, NestedFault) and fault.guest_notified
        if isinstance(fault, NestedFault) and fault.detail and not notified:
            log.warning("vSMMU: %s: %s", fault, fault.detail)
        else:
            log.info("vSMMU: %s", fault)
        self.events.publish(FaultRecorded(fault, notified))
