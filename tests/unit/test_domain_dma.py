"""An endpoint's DMA space: translation, permissions, and the one fault path."""

import os

import pytest

from pviommu.backend import Backend, BackendConfig
from pviommu.dma import Access, DmaFault
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import ATTACH_F_BYPASS, Status
from pviommu.memory import GuestMemory, MemoryAccessError, RegionSpec

GPA = 0x40000000
SIZE = 1 << 20
EP = 0x10


@pytest.fixture
def memory():
    fd = os.memfd_create("guest")
    os.ftruncate(fd, SIZE)
    mem = GuestMemory()
    mem.set_regions([RegionSpec(GPA, SIZE, 0x7F0000000000, 0)], [fd])
    yield mem
    mem.clear()


@pytest.fixture
def backend(tmp_path):
    b = Backend(BackendConfig(viommu_socket=tmp_path / "v.sock", endpoints=[EP, 0x18]))
    faults = []
    b.device.fault_listeners.append(lambda f, delivered: faults.append((f, delivered)))
    return b, faults


def test_reads_and_writes_go_through_the_mappings(backend, memory):
    b, faults = backend
    iommu = b.iommu
    assert iommu.attach(1, EP, 0) == Status.OK
    # two IOVA pages that are not contiguous in guest memory
    assert iommu.map(1, 0x10000, 0x10FFF, GPA + 0x5000, MAP_F_READ | MAP_F_WRITE) == Status.OK
    assert iommu.map(1, 0x11000, 0x11FFF, GPA + 0x1000, MAP_F_READ | MAP_F_WRITE) == Status.OK
    dma = b.endpoint_dma(EP, memory)
    data = bytes(range(256)) * 16
    dma.write(0x10800, data)
    assert memory.read(GPA + 0x5800, 0x800) == data[:0x800]
    assert memory.read(GPA + 0x1000, 0x800) == data[0x800:]
    assert dma.read(0x10800, len(data)) == data
    assert faults == []


def test_a_write_through_a_read_only_mapping_faults_and_writes_nothing(backend, memory):
    b, faults = backend
    b.iommu.attach(1, EP, 0)
    b.iommu.map(1, 0x10000, 0x10FFF, GPA, MAP_F_WRITE)
    b.iommu.map(1, 0x11000, 0x11FFF, GPA + 0x1000, MAP_F_READ)
    dma = b.endpoint_dma(EP, memory)
    with pytest.raises(DmaFault) as info:
        dma.write(0x10F00, b"\xff" * 0x200)  # the second half lands on the read-only page
    assert info.value.address == 0x11000 and info.value.reason == "MAPPING"
    # the page the write could reach was not touched either
    assert memory.read(GPA, 0x2000) == bytes(0x2000)
    with pytest.raises(DmaFault):
        dma.read(0x10000, 4)  # a read through a write-only mapping
    assert [(f.endpoint, f.address, f.access, f.reason.name, delivered)
            for f, delivered in faults] == [
        (EP, 0x11000, Access.WRITE, "MAPPING", False),
        (EP, 0x10000, Access.READ, "MAPPING", False)]
    # no driver posted event buffers here: both faults are counted as dropped
    assert b.device.faults_dropped == 2


def test_unattached_and_bypass_endpoints(backend, memory):
    b, faults = backend
    dma = b.endpoint_dma(EP, memory)
    with pytest.raises(DmaFault) as info:
        dma.read(GPA, 4)
    assert info.value.reason == "DOMAIN"
    assert faults[0][0].reason.name == "DOMAIN"
    b.iommu.negotiated = b.iommu.negotiated.__class__(bypass_config=True)
    assert b.iommu.attach(2, EP, ATTACH_F_BYPASS) == Status.OK
    dma.write(GPA + 8, b"identity")
    assert memory.read(GPA + 8, 8) == b"identity"
    # a mapping to an address outside guest memory is not an IOMMU fault
    assert b.iommu.detach(2, EP) == Status.OK
    b.iommu.attach(3, EP, 0)
    b.iommu.map(3, 0, 0xFFF, 0x1000, MAP_F_READ)
    with pytest.raises(MemoryAccessError):
        dma.read(0, 4)
    assert len(faults) == 1
