"""A device that enters NEEDS_RESET tells the host: QMP event DEVICE_NEEDS_RESET.

The case of issue 13: the host revokes the mapping under a virtqueue's rings
(the only mapping an idle guest has); the driver's next kick cannot read the
rings, the device stops, and nothing but this event tells the host.
"""

import asyncio
import fcntl
import os

import pytest
from qemu.qmp import EventListener, QMPClient

from pviommu.backend import EVENT_NEEDS_RESET, Backend, BackendConfig
from pviommu.endpoints import EndpointSpec
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import Status
from pviommu.memory import RegionSpec
from pviommu.virtio.features import STATUS_NEEDS_RESET
from tests.fakes.virtio_driver import FakeDriver
from tests.fakes.virtio_pci_driver import PciDriver

GPA = 0x40000000
SIZE = 1 << 20
RNG = 0x18


@pytest.fixture
async def served(tmp_path):
    config = BackendConfig(viommu_socket=tmp_path / "viommu.sock",
                           qmp_socket=tmp_path / "qmp.sock",
                           devices=[EndpointSpec("rng", tmp_path / "rng.sock", RNG)])
    async with Backend(config) as b:
        client = QMPClient("test")
        events = EventListener(EVENT_NEEDS_RESET)
        client.register_listener(events)
        await client.connect(str(config.qmp_socket))
        try:
            yield b, client, events
        finally:
            await client.disconnect()


def _guest_with_ring(b):
    """The rng endpoint's memory identity-mapped in a DMA domain, queue 0 live."""
    ep = b.endpoints[RNG]
    fd = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # as QEMU's memory-backend-memfd
    ep.memory.set_regions([RegionSpec(GPA, SIZE, 0x7F0000000000, 0)], [fd])  # takes the fd
    assert b.iommu.attach(1, RNG, 0) == Status.OK
    assert b.iommu.map(1, GPA, GPA + 0xFFFF, GPA, MAP_F_READ | MAP_F_WRITE) == Status.OK
    drv = PciDriver(ep.function)
    drv.probe()
    ring = FakeDriver(ep.memory, base=GPA)
    drv.setup_queue(0, ring, 1)
    drv.enable_queue(0)
    drv.driver_ok()
    return drv, ring


async def test_revoking_a_ring_mapping_announces_needs_reset(served):
    b, client, events = served
    drv, ring = _guest_with_ring(b)
    try:
        revoked = await client.execute("revoke-mapping", {"endpoint": RNG, "address": GPA})
        assert revoked["virt-start"] == GPA
        ring.add([], [64])
        ring.publish()
        drv.kick(0)  # the device cannot read the available ring any more
        event = await asyncio.wait_for(events.get(), 5)
        data = event["data"]
        assert (data["endpoint"], data["kind"], data["queue"]) == (RNG, "rng", 0)
        assert "fault" in data["reason"] or "translat" in data["reason"], data["reason"]
        [dev] = await client.execute("query-endpoint-devices")
        assert dev["needs-reset"] and dev["status"] & STATUS_NEEDS_RESET
        drv.kick(0)  # still broken: announced once, not on every kick
        await asyncio.sleep(0.1)
        assert events.empty()
    finally:
        drv.close()


def test_the_event_is_sent_once_per_reset(tmp_path):
    b = Backend(BackendConfig(viommu_socket=tmp_path / "v.sock",
                              devices=[EndpointSpec("rng", tmp_path / "r.sock", RNG)]))
    sent = []
    b.qmp.emit = lambda event, data=None: sent.append((event, data))
    device = b.endpoints[RNG].device
    device.fail(0, "avail ring: boom")
    device.fail(0, "again")
    device.reset()
    device.fail(0, "after reset")
    assert [(e, d["reason"]) for e, d in sent if e == EVENT_NEEDS_RESET] == [
        ("DEVICE_NEEDS_RESET", "avail ring: boom"), ("DEVICE_NEEDS_RESET", "after reset")]


def test_the_iommu_itself_is_announced_without_endpoint(tmp_path):
    b = Backend(BackendConfig(viommu_socket=tmp_path / "v.sock"))
    sent = []
    b.qmp.emit = lambda event, data=None: sent.append((event, data))
    b.device.fail(1, "event queue: boom")
    assert sent == [(EVENT_NEEDS_RESET, {"kind": "iommu", "queue": 1,
                                         "reason": "event queue: boom"})]
