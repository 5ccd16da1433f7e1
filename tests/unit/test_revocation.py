"""Revocation over any translator: now or armed, announced as a typed event."""

import os

import pytest

from pviommu.events import EventBus, FaultRecorded, MappingRevoked
from pviommu.iommu.dma_space import TranslatedDma
from pviommu.iommu.faults import Access, DmaFault, FaultReason, Stage
from pviommu.iommu.revocation import ArmedRevocation, Revocations
from pviommu.iommu.translation import Revoked
from tests.fakes.translator import PageTranslator
from tests.fakes.virtio_driver import memfd_memory

GPA = 0x40000000
EP = 0x10


@pytest.fixture
def memory():
    mem, fd = memfd_memory(1 << 20, GPA)
    yield mem
    mem.clear()
    os.close(fd)


def test_a_revocation_of_another_mode_goes_through_the_same_machinery(memory):
    translator = PageTranslator()
    translator.map(EP, 0x10000, GPA, 0x2000)
    bus = EventBus()
    events = []
    bus.listen(events.append)
    revocations = Revocations(translator, bus)
    dma = TranslatedDma(translator, EP, memory, lambda f: bus.publish(FaultRecorded(f, True)),
                        revocations)
    revocations.arm(ArmedRevocation(EP, min_length=0x100, access=Access.WRITE))
    assert dma.try_view(0x11000, 0x800, Access.WRITE) is not None  # a lookup: not a DMA
    dma.write(0x10000, b"small")
    dma.read(0x11000, 0x800)
    before = translator.generation
    with pytest.raises(DmaFault) as info:
        dma.write(0x11000, bytes(0x800))
    assert (info.value.reason, info.value.stage) == (FaultReason.F_TRANSLATION, Stage.S1)
    assert translator.generation != before and not revocations.armed
    revoked = Revoked(EP, 0, 0x11000, 0x11FFF, GPA + 0x1000)
    assert events[0] == MappingRevoked(revoked)
    assert isinstance(events[1], FaultRecorded) and events[1].fault.address == 0x11000
    assert memory.read(GPA + 0x1000, 0x800) == bytes(0x800)
    # now: the mapping at an address, or None
    assert revocations.revoke(EP, 0x10010) == Revoked(EP, 0, 0x10000, 0x10FFF, GPA)
    assert revocations.revoke(EP, 0x10010) is None
    assert len([e for e in events if isinstance(e, MappingRevoked)]) == 2


def test_an_armed_revocation_that_finds_no_mapping_stays_armed(memory):
    translator = PageTranslator()
    revocations = Revocations(translator, EventBus())
    dma = TranslatedDma(translator, EP, memory, revocations=revocations)
    revocations.arm(ArmedRevocation(EP, min_length=1))
    with pytest.raises(DmaFault):
        dma.read(0x5000, 16)
    assert EP in revocations.armed
