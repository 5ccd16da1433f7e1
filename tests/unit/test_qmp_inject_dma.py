"""QMP ``inject-dma``: a rogue DMA by an endpoint device, through the real backend."""

import asyncio
import os

import pytest
from qemu.qmp import EventListener, QMPClient
from qemu.qmp.qmp_client import ExecuteError

from pviommu.backend import Backend, BackendConfig
from pviommu.dma import Access, PhysicalDma
from pviommu.endpoints import EndpointSpec
from pviommu.iommu.dma_space import TranslatedDma
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import Status
from pviommu.memory import RegionSpec
from pviommu.qmp.dma import MAX_REFILLS, PATTERN
from pviommu.qmp.viommu import EVENT_FAULT
from tests.fakes.memfd import sealed_memfd
from tests.fakes.translator import PageTranslator
from tests.fakes.virtio_driver import FakeDriver, RecordingTransport, memfd_memory

GPA = 0x40000000
SIZE = 1 << 20
BLK, RNG = 0x10, 0x18
EVENT_QUEUE = 1
FAULT_SIZE = 24


@pytest.fixture
async def backend(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    config = BackendConfig(viommu_socket=tmp_path / "viommu.sock",
                           qmp_socket=tmp_path / "qmp.sock", endpoints=[0x20],
                           devices=[EndpointSpec("blk", tmp_path / "blk.sock", BLK, image=image),
                                    EndpointSpec("rng", tmp_path / "rng.sock", RNG)])
    async with Backend(config) as b:
        client = QMPClient("test")
        events = EventListener(EVENT_FAULT)
        client.register_listener(events)
        await client.connect(str(config.qmp_socket))
        yield b, client, events
        await client.disconnect()


@pytest.fixture
def event_queue(backend):
    """The PV-IOMMU's event queue, driven by a fake guest driver in memory of its own."""
    b = backend[0]
    memory, fd = memfd_memory(1 << 18, GPA)
    b.device.transport = RecordingTransport()
    b.device.set_driver_features(b.device.offered_features())
    driver = FakeDriver(memory, GPA, 8, span=0x10000)
    b.device.start_queue(EVENT_QUEUE, driver.queue(PhysicalDma(memory)))
    yield driver
    memory.clear()
    os.close(fd)


def _memory(b, endpoint):
    memory = b.endpoints[endpoint].memory
    memory.add_region(RegionSpec(GPA, SIZE, 0, 0), sealed_memfd(SIZE, "guest"))
    return memory


def _post(driver):
    head = driver.add([], [FAULT_SIZE])
    driver.publish()
    return head


def _record(reason, access, endpoint, address):
    """A virtio_iommu_fault record: reason, flags = access | ADDRESS, endpoint, address."""
    return (bytes([reason, 0, 0, 0, access, 1, 0, 0]) + endpoint.to_bytes(4, "little")
            + bytes(4) + address.to_bytes(8, "little"))


async def _fault_event(events):
    return (await asyncio.wait_for(events.get(), 5))["data"]


async def test_an_unattached_endpoint_gets_a_domain_fault_in_the_event_queue(backend,
                                                                             event_queue):
    b, client, events = backend
    head = _post(event_queue)
    result = await client.execute("inject-dma", {"endpoint": BLK, "address": 0xDEAD000})
    assert result == {"translated": False, "fault": {
        "endpoint": BLK, "address": 0xDEAD000, "access": "read", "reason": "domain"}}
    assert event_queue.used() == [(head, FAULT_SIZE)]
    assert event_queue.read_writable(head) == _record(1, 1, BLK, 0xDEAD000)
    assert b.device.transport.notified == [EVENT_QUEUE]
    assert await _fault_event(events) == {"endpoint": BLK, "address": 0xDEAD000,
                                          "access": "read", "reason": "domain",
                                          "delivered": True}
    assert b.device.faults_reported == 1


async def test_an_unmapped_address_gets_a_mapping_fault(backend, event_queue):
    b, client, events = backend
    _memory(b, RNG)
    assert b.iommu.attach(1, RNG, 0) == Status.OK
    assert b.iommu.map(1, 0x10000, 0x10FFF, GPA, MAP_F_READ | MAP_F_WRITE) == Status.OK
    head = _post(event_queue)
    # the access straddles the end of the mapping: the first byte outside faults
    result = await client.execute("inject-dma", {"endpoint": RNG, "address": 0x10FFE,
                                                 "access": "write", "size": 8})
    assert result["translated"] is False
    assert result["fault"] == {"endpoint": RNG, "address": 0x11000, "access": "write",
                               "reason": "mapping"}
    assert event_queue.read_writable(head) == _record(2, 2, RNG, 0x11000)
    assert (await _fault_event(events))["reason"] == "mapping"
    # nothing was written, not even the bytes that translated
    assert b.endpoints[RNG].memory.read(GPA + 0xFFE, 2) == b"\0\0"


async def test_a_mapped_address_is_read_through_its_translation(backend, event_queue):
    b, client, _ = backend
    memory = _memory(b, BLK)
    memory.write(GPA + 0x3000, bytes(range(64)))
    b.iommu.attach(1, BLK, 0)
    b.iommu.map(1, 0x20000, 0x20FFF, GPA + 0x3000, MAP_F_READ)
    result = await client.execute("inject-dma", {"endpoint": BLK, "address": 0x20010,
                                                 "size": 16})
    assert result == {"translated": True, "fault": None, "data": bytes(range(16, 32)).hex()}
    assert await client.execute("inject-dma", {"endpoint": BLK, "address": 0x20000}) == {
        "translated": True, "fault": None, "data": "00010203"}
    assert event_queue.used() == [] and b.device.faults_reported == 0


async def test_a_write_stores_the_pattern_only_where_it_may(backend, event_queue):
    b, client, events = backend
    memory = _memory(b, BLK)
    b.iommu.attach(1, BLK, 0)
    b.iommu.map(1, 0x20000, 0x20FFF, GPA + 0x3000, MAP_F_READ)
    b.iommu.map(1, 0x30000, 0x30FFF, GPA + 0x5000, MAP_F_READ | MAP_F_WRITE)
    head = _post(event_queue)
    result = await client.execute("inject-dma", {"endpoint": BLK, "address": 0x20000,
                                                 "access": "write", "size": 64})
    assert result["translated"] is False and result["fault"]["reason"] == "mapping"
    assert event_queue.read_writable(head) == _record(2, 2, BLK, 0x20000)
    assert (await _fault_event(events))["access"] == "write"
    assert memory.read(GPA + 0x3000, 64) == bytes(64)
    result = await client.execute("inject-dma", {"endpoint": BLK, "address": 0x30004,
                                                 "access": "write", "size": 20})
    assert result == {"translated": True, "fault": None}
    assert memory.read(GPA + 0x5000, 32) == bytes(4) + (PATTERN * 3)[:20] + bytes(8)


async def test_a_bypassed_endpoint_reaches_guest_physical_memory(backend, event_queue):
    b, client, _ = backend
    memory = _memory(b, RNG)
    memory.write(GPA + 0x40, b"phys")
    b.iommu.attach(9, RNG, 1)  # a bypass domain
    result = await client.execute("inject-dma", {"endpoint": RNG, "address": GPA + 0x40})
    assert result == {"translated": True, "fault": None, "data": b"phys".hex()}
    # translated, but to no guest memory: the device would get an error from the bus
    result = await client.execute("inject-dma", {"endpoint": RNG, "address": 0x1000})
    assert result["translated"] is True and result["fault"] is None
    assert "outside guest memory" in result["error"]


async def test_a_translator_that_misses_is_filled_then_translates(backend):
    b, client, _ = backend
    memory = _memory(b, RNG)
    memory.write(GPA + 0x7FFC, b"abcdefgh")
    translator = PageTranslator(miss_first=True)
    translator.map(RNG, 0x1000, GPA + 0x7000, 0x2000)
    reported = []
    b.endpoints[RNG].dma = TranslatedDma(translator, RNG, memory, reported.append)
    result = await client.execute("inject-dma", {"endpoint": RNG, "address": 0x1FFC,
                                                 "size": 8})
    assert result == {"translated": True, "fault": None, "data": b"abcdefgh".hex()}
    # one fill per page the access touched, each for the access asked for
    assert translator.fills == [(RNG, 0x1000, Access.READ), (RNG, 0x2000, Access.READ)]
    assert reported == []


async def test_a_fill_that_finds_nothing_is_a_stage_1_fault(backend):
    b, client, _ = backend
    memory = _memory(b, RNG)
    translator = PageTranslator(miss_first=True)
    reported = []
    b.endpoints[RNG].dma = TranslatedDma(translator, RNG, memory, reported.append)
    result = await client.execute("inject-dma", {"endpoint": RNG, "address": 0x5000,
                                                 "access": "write"})
    assert result == {"translated": False, "fault": {
        "endpoint": RNG, "address": 0x5000, "access": "write", "reason": "f_translation",
        "stage": 1}}
    assert [(f.address, f.access) for f in reported] == [(0x5000, Access.WRITE)]
    assert translator.fills == [(RNG, 0x5000, Access.WRITE)]


class _NeverSettles(PageTranslator):
    """Every fill is invalidated before the retry: the access misses forever."""

    async def fill(self, miss):
        await super().fill(miss)
        self.invalidate()


async def test_a_translation_that_keeps_missing_gives_up(backend):
    b, client, _ = backend
    memory = _memory(b, RNG)
    translator = _NeverSettles(miss_first=True)
    translator.map(RNG, 0x1000, GPA, 0x1000)
    b.endpoints[RNG].dma = TranslatedDma(translator, RNG, memory)
    with pytest.raises(ExecuteError, match="kept missing") as err:
        await client.execute("inject-dma", {"endpoint": RNG, "address": 0x1000})
    assert err.value.error_class == "GenericError"
    assert len(translator.fills) == MAX_REFILLS
    # the server is still there
    assert await client.execute("query-endpoint-devices")


@pytest.mark.parametrize("args, message", [
    ({"address": 0}, "Parameter 'endpoint' is missing"),
    ({"endpoint": BLK}, "Parameter 'address' is missing"),
    ({"endpoint": BLK, "address": "0x1000"}, "expected: integer"),
    ({"endpoint": BLK, "address": -1}, "'address' is out of range"),
    ({"endpoint": BLK, "address": 0, "access": "exec"}, "does not accept value 'exec'"),
    ({"endpoint": BLK, "address": 0, "access": 1}, "expected: string"),
    ({"endpoint": BLK, "address": 0, "size": 0}, "'size' must be 1 to 4096"),
    ({"endpoint": BLK, "address": 0, "size": 4097}, "'size' must be 1 to 4096"),
    ({"endpoint": BLK, "address": (1 << 64) - 2}, "beyond the 64-bit space"),
    ({"endpoint": BLK, "address": 0, "data": "00"}, "Parameter 'data' is unexpected"),
    ({"endpoint": 1 << 32, "address": 0}, "'endpoint' is out of range"),
    ({"endpoint": 0x20, "address": 0}, "Endpoint 0x20 has no device"),
])
async def test_bad_arguments_are_generic_errors(backend, args, message):
    b, client, _ = backend
    with pytest.raises(ExecuteError, match=message) as err:
        await client.execute("inject-dma", args)
    assert err.value.error_class == "GenericError"
    assert b.device.faults_reported + b.device.faults_dropped == 0


async def test_the_command_is_listed(backend):
    _, client, _ = backend
    names = [c["name"] for c in await client.execute("query-commands")]
    assert "inject-dma" in names
