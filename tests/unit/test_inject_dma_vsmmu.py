"""``inject-dma`` on a vSMMU endpoint's DMA space (a fake of the guest's stage 1 in
QEMU, the backend's real stage 2): an IOVA the guest never mapped is a stage-1 fault,
one whose IPA stage 2 refuses is a stage-2 fault with its SMMUv3 record, and a
translated one reads the guest's bytes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pviommu.events import EventBus
from pviommu.iommu.smmu_events import SmmuEventRecorded
from pviommu.iommu.vsmmu import Vsmmu
from pviommu.memory import GuestMemory
from pviommu.qmp.dma import DmaCommands
from pviommu.qmp.server import QmpServer
from tests.fakes.stage1 import FakeStage1
from tests.fakes.virtio_driver import DEFAULT_GPA, memfd_memory

EP = 0x10
IOVA = 0x8000_0000
PAGE = 0x1000
MEM = 1 << 22


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem, fd = memfd_memory(MEM)
    os.close(fd)
    yield mem
    mem.clear()


@pytest.fixture
def setup(memory: GuestMemory) -> tuple[DmaCommands, Vsmmu, FakeStage1, list[object]]:
    bus = EventBus()
    records: list[object] = []
    bus.listen(records.append, SmmuEventRecorded)
    vsmmu = Vsmmu(bus)
    stage1 = FakeStage1()
    space = vsmmu.dma(stage1, EP, memory)
    commands = DmaCommands(QmpServer({}), lambda ep: space if ep == EP else None)
    return commands, vsmmu, stage1, records


async def test_a_translated_rogue_read_returns_the_guest_bytes(setup, memory) -> None:
    commands, _, stage1, records = setup
    stage1.map(IOVA, DEFAULT_GPA + PAGE)
    memory.write(DEFAULT_GPA + PAGE, b"\x01\x02\x03\x04")
    result = await commands.inject_dma({"endpoint": EP, "address": IOVA})
    assert result == {"translated": True, "fault": None, "data": "01020304"}
    assert records == []


async def test_an_iova_the_guest_never_mapped_is_a_stage1_fault(setup) -> None:
    commands, _, stage1, records = setup
    result = await commands.inject_dma({"endpoint": EP, "address": 0xDEAD000})
    assert result["translated"] is False
    assert result["fault"] == {"endpoint": EP, "address": 0xDEAD000, "access": "read",
                               "reason": "f_translation", "stage": 1}
    assert stage1.fills == [(0xDEAD000, 1)]  # QEMU was asked (IOTLB MISS), and refused
    assert records == []  # the guest's own SMMUv3 reports it, not the host's queue


async def test_an_ipa_stage2_refuses_is_a_stage2_fault_with_its_record(setup) -> None:
    commands, vsmmu, stage1, records = setup
    ipa = DEFAULT_GPA + 2 * PAGE
    stage1.map(IOVA, ipa)
    await commands.inject_dma({"endpoint": EP, "address": IOVA})  # stage 2 adopts the RAM
    vsmmu.stage2.unmap(ipa, PAGE)
    result = await commands.inject_dma({"endpoint": EP, "address": IOVA + 8,
                                        "access": "write"})
    assert result["translated"] is False
    assert result["fault"] == {"endpoint": EP, "address": IOVA + 8, "access": "write",
                               "reason": "f_translation", "stage": 2}
    [recorded] = records
    event = recorded.event  # type: ignore[attr-defined]
    assert (event.stream_id, event.s2, event.input_address, event.ipa) == (
        EP, True, IOVA + 8, ipa + 8)
    assert not event.rnw  # a write
