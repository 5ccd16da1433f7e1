"""Translations fetched asynchronously: a miss is filled and the step runs again.

A page translator that misses on the first access of each kind to each page
(as the vSMMU's device IOTLB does) drives a real virtio-rng through a real
split queue: the available ring, the descriptor table, the data buffer and
the used ring each miss once, and nothing moves before its fill is done.
"""

import asyncio
import os

import pytest

from pviommu.devices.rng import VirtioRng
from pviommu.iommu.dma_space import TranslatedDma
from pviommu.iommu.faults import Access, FaultReason, Stage
from tests.fakes.translator import PAGE, PageTranslator
from tests.fakes.virtio_driver import FakeDriver, RecordingTransport, memfd_memory

GPA = 0x40000000
EP = 0x18
QSIZE = 256  # the descriptor table fills page 0; the avail and used rings are on page 1,
# buffers on the pages after


@pytest.fixture
def memory():
    mem, fd = memfd_memory(1 << 20, GPA)
    yield mem
    mem.clear()
    os.close(fd)


class Rig:
    def __init__(self, memory, mapped: int = 0x10000) -> None:
        self.translator = PageTranslator(miss_first=True)
        self.translator.map(EP, GPA, GPA, mapped)
        self.faults = []
        self.dma = TranslatedDma(self.translator, EP, memory, self.faults.append)
        self.driver = FakeDriver(memory, GPA, QSIZE, span=0x10000)
        self.driver.alloc(1, align=PAGE)  # buffers from page 2 on, apart from the rings
        self.dev = VirtioRng(source=lambda n: b"\xaa" * n)
        self.dev.transport = self.transport = RecordingTransport()
        self.dev.set_driver_features(self.dev.offered_features())
        self.queue = self.driver.queue(self.dma)
        self.dev.start_queue(0, self.queue)


async def _until(predicate) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def test_rings_descriptors_buffer_and_used_ring_each_miss_once(memory):
    rig = Rig(memory)
    t = rig.translator
    t.gate = asyncio.Event()
    head = rig.driver.add([], [64])
    buf = rig.driver._posted[head].writable[0][0]
    rig.driver.publish()
    rig.dev.kick(0)
    expected = [(EP, GPA + PAGE, Access.READ),    # the available ring
                (EP, GPA, Access.READ),           # the descriptor table
                (EP, buf & ~(PAGE - 1), Access.WRITE),  # the data buffer
                (EP, GPA + PAGE, Access.WRITE)]   # the used ring
    for n in range(1, 5):
        await _until(lambda n=n: len(t.fills) == n)
        assert t.fills == expected[:n]
        # while a fill is outstanding nothing that needs it moved: no data before the
        # buffer's fill, no used entry before the used ring's
        assert memory.read(buf, 64) == (bytes(64) if n <= 3 else b"\xaa" * 64)
        assert rig.driver.used_idx() == 0
        assert rig.queue.next_avail == (0 if n <= 2 else 1)
        t.gate.set()
        t.gate = asyncio.Event()
        await _until(lambda n=n: len(t.fills) > n or rig.driver.used_idx() == 1)
    t.gate.set()
    await asyncio.wait_for(rig.dev.wait_idle(), 5)
    assert rig.driver.used() == [(head, 64)]
    assert memory.read(buf, 64) == b"\xaa" * 64
    assert rig.transport.notified == [0] and not rig.dev.needs_reset and rig.faults == []
    # everything is at hand now: the next request misses nothing
    fills = len(t.fills)
    rig.driver.add([], [16])
    rig.driver.publish()
    rig.dev.kick(0)
    await asyncio.wait_for(rig.dev.wait_idle(), 5)
    assert len(t.fills) == fills and rig.driver.used()[0][1] == 16


async def test_a_fill_that_faults_is_the_device_s_fault_and_moves_nothing(memory):
    rig = Rig(memory)
    head = rig.driver.add([], [64])
    buf = rig.driver._posted[head].writable[0][0]
    rig.translator.pages.pop((EP, buf & ~(PAGE - 1)))  # the guest never mapped the buffer
    rig.driver.publish()
    rig.dev.kick(0)
    await asyncio.wait_for(rig.dev.wait_idle(), 5)
    assert rig.driver.used() == [(head, 0)]  # completed, with the device's own error
    assert memory.read(buf, 64) == bytes(64)
    [fault] = rig.faults
    assert (fault.reason, fault.stage, fault.access) == (
        FaultReason.F_TRANSLATION, Stage.S1, Access.WRITE)
    assert rig.dev.stats["faults"] == 1 and not rig.dev.needs_reset


async def test_a_ring_whose_fill_faults_breaks_the_device(memory):
    rig = Rig(memory)
    rig.translator.pages.pop((EP, GPA))  # the descriptor table is not mapped
    rig.driver.add([], [64])
    rig.driver.publish()
    rig.dev.kick(0)
    await asyncio.wait_for(rig.dev.wait_idle(), 5)
    assert rig.dev.needs_reset and "F_TRANSLATION" in rig.dev.broken_reason
    assert rig.queue.next_avail == 0 and rig.driver.used_idx() == 0


async def test_an_invalidation_between_fill_and_retry_asks_again(memory):
    rig = Rig(memory)
    t = rig.translator
    real_fill = t.fill

    async def fill_then_invalidate(miss):
        await real_fill(miss)
        if len(t.fills) == 1:
            t.invalidate()  # the guest unmapped meanwhile: the retry misses again
    t.fill = fill_then_invalidate
    head = rig.driver.add([], [8])
    rig.driver.publish()
    rig.dev.kick(0)
    await asyncio.wait_for(rig.dev.wait_idle(), 5)
    assert rig.driver.used() == [(head, 8)]
    assert t.fills[:2] == [(EP, GPA + PAGE, Access.READ)] * 2


async def test_a_translation_that_never_settles_gives_up(memory):
    rig = Rig(memory)
    rig.translator.present = {}

    async def useless_fill(miss):
        rig.translator.fills.append(miss)
    rig.translator.fill = useless_fill
    rig.driver.add([], [8])
    rig.driver.publish()
    rig.dev.kick(0)
    await asyncio.wait_for(rig.dev.wait_idle(), 5)
    assert rig.dev.needs_reset and "again after" in rig.dev.broken_reason
