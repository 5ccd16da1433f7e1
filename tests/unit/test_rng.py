"""virtio-rng device model: buffers filled through a real SplitQueue, with guest-physical
DMA and with an endpoint's DMA space behind the PV-IOMMU."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

import pytest

from pviommu.devices.rng import MAX_FILL, VirtioRng
from pviommu.dma import Access, DmaFault, PhysicalDma
from pviommu.iommu.dma_space import DomainDma
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import IommuConfig, PvIommu, Status
from pviommu.memory import RegionSpec
from pviommu.virtio.features import F_ACCESS_PLATFORM, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from pviommu.virtio.queue import DESC_F_NEXT, DESC_F_WRITE
from tests.fakes.dma import FakeRemote, RingsPhysical
from tests.fakes.virtio_driver import FakeDriver, RecordingTransport, memfd_memory

GPA = 0x40000000
MEM_SIZE = 1 << 21
RING_SPAN = 0x40000
DATA_GPA = GPA + 0x100000
IOVA = 0x10000000
REMOTE_GPA = GPA + MEM_SIZE
REMOTE_SIZE = 0x10000
EP = 0x10
RW = MAP_F_READ | MAP_F_WRITE
POISON = 0xA5


class CountingSource:
    """A predictable entropy source: 0, 1, 2, ... (mod 256) across calls."""

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.asked: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.asked.append(n)
        return bytes(next(self.counter) & 0xFF for _ in range(n))


@pytest.fixture
def memory():
    mem, fd = memfd_memory(MEM_SIZE, GPA)
    mem.add_region(RegionSpec(REMOTE_GPA, REMOTE_SIZE, 0, 0), None)
    mem.remote = FakeRemote(REMOTE_GPA, REMOTE_SIZE, fill=POISON, readable=False)
    yield mem
    mem.clear()
    os.close(fd)


@pytest.fixture
def faults() -> list[DmaFault]:
    return []


@pytest.fixture
def iommu() -> PvIommu:
    iommu = PvIommu(IommuConfig(), endpoints=[EP])
    assert iommu.attach(1, EP, 0) == Status.OK
    return iommu


@pytest.fixture(params=["physical", "domain"])
def dma(request, memory, iommu, faults):
    if request.param == "physical":
        return PhysicalDma(memory)
    assert iommu.map(1, GPA, GPA + MEM_SIZE - 1, GPA, RW) == Status.OK
    assert iommu.map(1, REMOTE_GPA, REMOTE_GPA + REMOTE_SIZE - 1, REMOTE_GPA, RW) == Status.OK
    return DomainDma(iommu, EP, memory, faults.append)


class Rig:
    """A VirtioRng with its queue driven by a FakeDriver."""

    def __init__(self, dev: VirtioRng, memory, dma) -> None:
        self.dev = dev
        self.memory = memory
        self.driver = FakeDriver(memory, GPA, 16, span=RING_SPAN)
        self.transport = RecordingTransport()
        dev.transport = self.transport
        dev.set_driver_features(dev.offered_features())
        dev.start_queue(0, self.driver.queue(dma, indirect=True))
        self.next_desc = 0

    def buf(self, size: int) -> int:
        addr = self.driver.alloc(max(size, 1))
        self.memory.write(addr, bytes([POISON]) * max(size, 1))
        return addr

    def post(self, segs: list[tuple[int, int, bool]]) -> int:
        idx = [(self.next_desc + i) % self.driver.size for i in range(len(segs))]
        self.next_desc = (self.next_desc + len(segs)) % self.driver.size
        for i, (a, n, w) in enumerate(segs):
            last = i == len(segs) - 1
            self.driver.write_desc(idx[i], a, n, (DESC_F_WRITE if w else 0)
                                   | (0 if last else DESC_F_NEXT), 0 if last else idx[i + 1])
        self.driver.make_available(idx[0])
        return idx[0]

    async def run(self) -> list[tuple[int, int]]:
        self.driver.publish()
        self.dev.kick(0)
        await asyncio.wait_for(self.dev.wait_idle(), 5)
        return self.driver.used()


@pytest.fixture
def source() -> CountingSource:
    return CountingSource()


@pytest.fixture
def rig(memory, dma, source):
    return Rig(VirtioRng(source=source), memory, dma)


def test_features_and_config():
    dev = VirtioRng()
    base = (1 << F_VERSION_1) | (1 << F_INDIRECT_DESC) | (1 << F_EVENT_IDX)
    assert dev.offered_features() == base | (1 << F_ACCESS_PLATFORM)
    assert VirtioRng(access_platform=False).offered_features() == base
    assert dev.device_id == 4 and dev.num_queues == 1 and dev.queue_max_size == 64
    assert dev.config_bytes() == b""
    with pytest.raises(ValueError):
        dev.read_config(0, 1)


async def test_fills_every_writable_buffer(rig, source):
    a, b = rig.buf(10), rig.buf(54)
    head = rig.post([(a, 10, True), (b, 54, True)])
    assert await rig.run() == [(head, 64)]
    assert rig.memory.read(a, 10) + rig.memory.read(b, 54) == bytes(range(64))
    assert source.asked == [64]
    assert rig.transport.notified == [0]
    assert rig.dev.stats["requests"] == 1 and rig.dev.stats["bytes"] == 64


async def test_readable_descriptors_are_skipped_and_never_written(rig):
    r = rig.buf(16)
    w = rig.buf(8)
    head = rig.post([(r, 16, False), (w, 8, True)])
    assert await rig.run() == [(head, 8)]
    assert rig.memory.read(r, 16) == bytes([POISON]) * 16
    assert rig.memory.read(w, 8) == bytes(range(8))


async def test_a_chain_without_writable_bytes_is_completed_with_zero(rig, caplog):
    r = rig.buf(16)
    with caplog.at_level(logging.ERROR):
        head = rig.post([(r, 16, False)])
        empty = rig.post([(rig.buf(0), 0, True)])
        assert await rig.run() == [(head, 0), (empty, 0)]
    assert "no writable bytes" in caplog.text
    assert rig.memory.read(r, 16) == bytes([POISON]) * 16
    assert rig.dev.stats["empty"] == 2 and not rig.dev.needs_reset


async def test_at_most_max_fill_bytes_per_chain(rig):
    w = rig.buf(MAX_FILL + 100)
    head = rig.post([(w, MAX_FILL + 100, True)])
    assert await rig.run() == [(head, MAX_FILL)]
    assert rig.memory.read(w + MAX_FILL, 100) == bytes([POISON]) * 100


async def test_a_short_source_fills_a_prefix(memory, dma):
    rig = Rig(VirtioRng(source=lambda n: b"xyz"), memory, dma)
    w = rig.buf(8)
    head = rig.post([(w, 8, True)])
    assert await rig.run() == [(head, 3)]
    assert rig.memory.read(w, 8) == b"xyz" + bytes([POISON]) * 5


async def test_an_empty_source_completes_with_zero(memory, dma, caplog):
    rig = Rig(VirtioRng(source=lambda n: b""), memory, dma)
    w = rig.buf(8)
    with caplog.at_level(logging.ERROR):
        head = rig.post([(w, 8, True)])
        assert await rig.run() == [(head, 0)]
    assert "gave nothing" in caplog.text


async def test_fills_remote_memory(rig, memory):
    local = rig.buf(8)
    head = rig.post([(local, 8, True), (REMOTE_GPA + 4, 24, True)])
    assert await rig.run() == [(head, 32)]
    assert rig.memory.read(local, 8) == bytes(range(8))
    assert bytes(memory.remote.mem[4:28]) == bytes(range(8, 32))
    assert memory.remote.writes == [(REMOTE_GPA + 4, 24)]


async def test_reset_while_awaiting_remote_dma_leaves_the_ring_alone(rig, memory):
    memory.remote.gate = asyncio.Event()
    rig.post([(REMOTE_GPA, 64, True)])
    rig.driver.publish()
    rig.dev.kick(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert memory.remote.writes  # waiting for the frontend
    rig.dev.reset()
    memory.remote.gate.set()
    await asyncio.wait_for(rig.dev.wait_idle(), 5)
    assert rig.driver.used_idx() == 0 and rig.transport.notified == []
    assert bytes(memory.remote.mem[:64]) == bytes([POISON]) * 64


async def test_an_address_outside_guest_memory_completes_with_zero(memory, source):
    rig = Rig(VirtioRng(source=source), memory, PhysicalDma(memory))
    w = rig.buf(8)
    head = rig.post([(w, 8, True), (REMOTE_GPA + REMOTE_SIZE, 8, True)])
    assert await rig.run() == [(head, 0)]
    assert rig.memory.read(w, 8) == bytes([POISON]) * 8
    assert rig.dev.stats["memory_errors"] == 1


# -- translation through the PV-IOMMU ------------------------------------------------------


@pytest.fixture
def ep(memory, iommu, faults, source):
    assert iommu.map(1, GPA, GPA + RING_SPAN - 1, GPA, RW) == Status.OK
    memory.write(DATA_GPA, bytes([POISON]) * 0x2000)
    return Rig(VirtioRng(source=source), memory, DomainDma(iommu, EP, memory, faults.append))


async def test_fills_through_mappings(ep, iommu, faults):
    assert iommu.map(1, IOVA, IOVA + 0xFFF, DATA_GPA + 0x1000, MAP_F_WRITE) == Status.OK
    head = ep.post([(IOVA + 8, 16, True)])
    assert await ep.run() == [(head, 16)]
    assert ep.memory.read(DATA_GPA + 0x1008, 16) == bytes(range(16))
    assert faults == []


async def test_a_read_only_mapping_faults_and_nothing_is_written(ep, iommu, faults):
    assert iommu.map(1, IOVA, IOVA + 0xFFF, DATA_GPA, MAP_F_WRITE) == Status.OK
    assert iommu.map(1, IOVA + 0x1000, IOVA + 0x1FFF, DATA_GPA + 0x1000, MAP_F_READ) \
        == Status.OK
    head = ep.post([(IOVA, 32, True), (IOVA + 0x1000, 32, True)])
    assert await ep.run() == [(head, 0)]
    assert [(f.address, f.access, f.reason) for f in faults] == [
        (IOVA + 0x1000, Access.WRITE, "MAPPING")]
    assert ep.memory.read(DATA_GPA, 0x2000) == bytes([POISON]) * 0x2000
    assert ep.dev.stats["faults"] == 1 and ep.dev.stats["bytes"] == 0
    assert ep.transport.notified == [0] and not ep.dev.needs_reset


async def test_an_unattached_endpoint_faults_with_domain(memory, faults, source):
    iommu = PvIommu(IommuConfig(), endpoints=[EP])
    rig = Rig(VirtioRng(source=source), memory,
              RingsPhysical(memory, DomainDma(iommu, EP, memory, faults.append)))
    w = rig.buf(8)
    head = rig.post([(w, 8, True)])
    assert await rig.run() == [(head, 0)]
    assert [(f.reason, f.access) for f in faults] == [("DOMAIN", Access.WRITE)]
    assert rig.memory.read(w, 8) == bytes([POISON]) * 8
