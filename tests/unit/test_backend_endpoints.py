"""The backend's endpoint devices: wiring, QMP, and the revocation report."""

import asyncio

import pytest
from qemu.qmp import EventListener, QMPClient

from pviommu.backend import EVENT_REVOKED, Backend, BackendConfig
from pviommu.dma import Access, DmaFault
from pviommu.endpoints import EndpointSpec
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import Status
from pviommu.iommu.revocation import ArmedRevocation
from pviommu.memory import RegionSpec
from tests.fakes.memfd import sealed_memfd

GPA = 0x40000000
SIZE = 1 << 20
BLK, RNG = 0x10, 0x18


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
        events = EventListener()
        client.register_listener(events)
        await client.connect(str(config.qmp_socket))
        yield b, client, events
        await client.disconnect()


def _memory(b, endpoint):
    fd = sealed_memfd(SIZE, "guest")
    memory = b.endpoints[endpoint].memory
    memory.add_region(RegionSpec(GPA, SIZE, 0, 0), fd)
    return memory


async def _revoked_event(events):
    event = await asyncio.wait_for(events.get(), 5)
    while event["event"] != EVENT_REVOKED:
        event = await asyncio.wait_for(events.get(), 5)
    return event["data"]


async def test_devices_listen_and_are_endpoints_of_the_iommu(backend, tmp_path):
    b, client, _ = backend
    assert (tmp_path / "blk.sock").exists() and (tmp_path / "rng.sock").exists()
    assert b.iommu.known == {0x20, BLK, RNG}
    devices = await client.execute("query-endpoint-devices")
    assert [(d["id"], d["kind"], d["connections"]) for d in devices] == [
        (BLK, "blk", 0), (RNG, "rng", 0)]
    assert devices[0]["image"] == str(tmp_path / "disk.img")
    assert devices[1]["stats"]["requests"] == 0


async def test_a_revocation_reports_the_memory_behind_the_mapping(backend):
    b, _client, events = backend
    memory = _memory(b, BLK)
    memory.write(GPA + 0x3000, b"precious" * 512)
    assert b.iommu.attach(1, BLK, 0) == Status.OK
    assert b.iommu.map(1, 0x10000, 0x10FFF, GPA + 0x3000, MAP_F_READ | MAP_F_WRITE) == Status.OK
    b.revocations.arm(ArmedRevocation(BLK, 4096, Access.WRITE))
    dma = b.endpoints[BLK].dma
    with pytest.raises(DmaFault):
        dma.write(0x10000, b"\xff" * 4096)
    data = await _revoked_event(events)
    assert (data["endpoint"], data["domain"], data["virt-start"], data["virt-end"],
            data["phys-start"]) == (BLK, 1, 0x10000, 0x10FFF, GPA + 0x3000)
    assert data["memory-unchanged"] is True
    assert data["sha256-before"] == data["sha256-after"] is not None
    assert memory.read(GPA + 0x3000, 8) == b"precious"


async def test_a_change_after_the_revocation_is_reported(backend):
    """The digest is taken again after the request: a write that got through shows."""
    b, _client, events = backend
    memory = _memory(b, RNG)
    b.iommu.attach(2, RNG, 0)
    b.iommu.map(2, 0x20000, 0x20FFF, GPA, MAP_F_READ | MAP_F_WRITE)
    assert b.revocations.revoke(RNG, 0x20000) is not None
    memory.write(GPA, b"late")  # as if something wrote there before the check
    assert (await _revoked_event(events))["memory-unchanged"] is False


def test_two_devices_on_one_endpoint_are_refused(tmp_path):
    with pytest.raises(ValueError, match="share an endpoint ID"):
        Backend(BackendConfig(viommu_socket=tmp_path / "v.sock", devices=[
            EndpointSpec("rng", tmp_path / "a.sock", RNG),
            EndpointSpec("rng", tmp_path / "b.sock", RNG)]))


async def test_a_huge_revoked_mapping_is_not_digested(backend):
    b, _client, events = backend
    _memory(b, RNG)
    b.iommu.attach(3, RNG, 0)
    b.iommu.map(3, 0, (128 << 20) - 1, GPA, MAP_F_READ)  # beyond guest memory, too big
    assert b.revocations.revoke(RNG, 0x1000) is not None
    data = await _revoked_event(events)
    assert data["memory-unchanged"] is None and data["sha256-before"] is None


def test_a_revocation_outside_the_event_loop_is_reported_at_once(tmp_path):
    b = Backend(BackendConfig(viommu_socket=tmp_path / "v.sock",
                              devices=[EndpointSpec("rng", tmp_path / "r.sock", RNG)]))
    sent = []
    b.qmp.emit = lambda event, data=None: sent.append((event, data))
    b.iommu.attach(1, RNG, 0)
    b.iommu.map(1, 0, 0xFFF, GPA, MAP_F_READ)
    assert b.revocations.revoke(RNG, 0) is not None
    [revoked] = [data for event, data in sent if event == EVENT_REVOKED]
    assert revoked["memory-unchanged"] is None  # no memory was handed over
