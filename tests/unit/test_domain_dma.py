"""An endpoint's DMA space: translation, permissions, and the one fault path."""


import pytest

from pviommu.backend import Backend, BackendConfig
from pviommu.dma import Access, DmaFault, load, local_views, store
from pviommu.events import FaultRecorded, MappingRevoked
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import ATTACH_F_BYPASS, Status
from pviommu.iommu.revocation import ArmedRevocation
from pviommu.iommu.translation import Revoked
from pviommu.memory import GuestMemory, MemoryAccessError, RegionSpec
from tests.fakes.dma import FakeRemote
from tests.fakes.memfd import sealed_memfd
from tests.fakes.virtio_driver import FakeDriver

GPA = 0x40000000
SIZE = 1 << 20
EP = 0x10


@pytest.fixture
def memory():
    fd = sealed_memfd(SIZE, "guest")
    mem = GuestMemory()
    mem.set_regions([RegionSpec(GPA, SIZE, 0x7F0000000000, 0)], [fd])
    yield mem
    mem.clear()


@pytest.fixture
def backend(tmp_path):
    b = Backend(BackendConfig(viommu_socket=tmp_path / "v.sock", endpoints=[EP, 0x18]))
    faults = []
    b.events.listen(lambda e: faults.append((e.fault, e.delivered)), FaultRecorded)
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


REMOTE = GPA + SIZE  # a remote region right after the memfd one


async def test_resolve_translates_everything_first_and_pieces_reach_local_and_remote_memory(
        backend, memory):
    b, faults = backend
    remote = FakeRemote(REMOTE, 0x2000)
    memory.add_region(RegionSpec(REMOTE, 0x2000, 0, 0), None)
    memory.remote = remote
    b.iommu.attach(1, EP, 0)
    b.iommu.map(1, 0x10000, 0x10FFF, GPA + 0x3000, MAP_F_READ | MAP_F_WRITE)
    b.iommu.map(1, 0x11000, 0x11FFF, REMOTE, MAP_F_READ | MAP_F_WRITE)
    dma = b.endpoint_dma(EP, memory)
    pieces = dma.resolve(0x10F00, 0x200, Access.WRITE)
    assert local_views(pieces) is None
    await store(pieces, b"L" * 0x100 + b"R" * 0x100)
    assert memory.read(GPA + 0x3F00, 0x100) == b"L" * 0x100
    assert remote.mem[:0x100] == b"R" * 0x100
    assert await load(dma.resolve(0x10F00, 0x200, Access.READ)) == b"L" * 0x100 + b"R" * 0x100
    assert remote.calls == [("write", REMOTE, 0x100), ("read", REMOTE, 0x100)]
    views = local_views(dma.resolve(0x10000, 0x10, Access.READ))
    assert views is not None and bytes(views[0]) == bytes(0x10)
    # the second page is missing: nothing resolves, nothing crossed to the frontend
    with pytest.raises(DmaFault):
        dma.resolve(0x10F00, 0x2000, Access.READ)
    assert len(remote.calls) == 2 and len(faults) == 1


def test_an_armed_revocation_takes_the_mapping_under_the_next_big_dma(backend, memory):
    b, faults = backend
    events = []
    b.events.listen(events.append, MappingRevoked)
    b.iommu.attach(1, EP, 0)
    b.iommu.map(1, 0x10000, 0x10FFF, GPA, MAP_F_READ | MAP_F_WRITE)
    b.iommu.map(1, 0x20000, 0x20FFF, GPA + 0x1000, MAP_F_READ | MAP_F_WRITE)
    b.revocations.arm(ArmedRevocation(EP, min_length=512, access=Access.WRITE))
    dma = b.endpoint_dma(EP, memory)
    dma.write(0x10000, b"small")            # too small: not the one
    dma.read(0x20000, 0x1000)               # a read: not the one
    with pytest.raises(DmaFault) as info:
        dma.write(0x20010, bytes(0x800))
    assert info.value.reason == "MAPPING" and info.value.address == 0x20010
    assert [m.virt_start for m in b.iommu.domains[1].mappings] == [0x10000]
    assert b.iommu.mapping_count == 1 and not b.revocations.armed
    assert events == [MappingRevoked(Revoked(EP, 1, 0x20000, 0x20FFF, GPA + 0x1000))]
    assert len(faults) == 1
    # the guest's own UNMAP of the revoked range later finds nothing and succeeds
    assert b.iommu.unmap(1, 0x20000, 0x20FFF) == Status.OK
    assert b.iommu.revoke(EP, 0x30000) is None


def test_cached_ring_views_die_with_the_mapping(backend, memory):
    """A queue keeps its rings' views only while no UNMAP/DETACH could have
    removed their translation (an IOTLB); after one, every access translates again."""
    b, faults = backend
    b.iommu.attach(1, EP, 0)
    span = 0x4000
    assert b.iommu.map(1, GPA, GPA + span - 1, GPA, MAP_F_READ | MAP_F_WRITE) == Status.OK
    dma = b.endpoint_dma(EP, memory)
    driver = FakeDriver(memory, GPA, queue_size=8, span=span)
    queue = driver.queue(dma)
    head = driver.add([b"x"], [1])
    driver.publish()
    assert queue.pop().head == head
    assert queue._rings is not None  # cached
    queue.push(head, 1)
    assert driver.used() == [(head, 1)]
    # an unrelated MAP keeps the cache; the UNMAP of the rings drops it
    assert b.iommu.map(1, 0x100000, 0x100FFF, GPA + 0x8000, MAP_F_READ) == Status.OK
    assert queue._views() is not None
    assert b.iommu.unmap(1, GPA, GPA + span - 1) == Status.OK
    driver.add([b"y"], [1])
    driver.publish()
    with pytest.raises(DmaFault):
        queue.pop()
    assert faults and faults[-1][0].reason.name == "MAPPING"


def test_turning_bypass_off_drops_cached_ring_views(backend, memory):
    b, faults = backend
    b.iommu.bypass = True  # an unattached endpoint's DMA is identity
    dma = b.endpoint_dma(EP, memory)
    driver = FakeDriver(memory, GPA, queue_size=8, span=0x4000)
    queue = driver.queue(dma)
    driver.add([b"x"], [1])
    driver.publish()
    assert queue.pop() is not None and queue._rings is not None
    b.iommu.bypass = False
    driver.add([b"y"], [1])
    driver.publish()
    with pytest.raises(DmaFault):
        queue.pop()
    assert faults[-1][0].reason.name == "DOMAIN"


def test_caching_ring_views_does_not_trigger_an_armed_revocation(backend, memory):
    b, faults = backend
    b.iommu.attach(1, EP, 0)
    b.iommu.map(1, GPA, GPA + 0x3FFF, GPA, MAP_F_READ | MAP_F_WRITE)
    b.revocations.arm(ArmedRevocation(EP, min_length=512))
    dma = b.endpoint_dma(EP, memory)
    assert dma.try_view(GPA, 0x1000, Access.READ) is not None
    assert EP in b.revocations.armed and b.iommu.mapping_count == 1 and not faults
