"""The backend's PV-IOMMU QMP commands and events, through real QMP clients."""

import asyncio
import subprocess
import sys

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from pviommu.devices.viommu import VirtioIommu
from pviommu.dma import Access
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import IommuConfig, PvIommu, ResvRegion, Status
from pviommu.iommu.revocation import Revocations
from pviommu.qmp.server import QmpServer
from pviommu.qmp.viommu import ViommuCommands


@pytest.fixture
def iommu():
    return PvIommu(IommuConfig(reserved=[ResvRegion(0x1000000, 0x1FFFFFF)]),
                   endpoints=[0x10, 0x18])


@pytest.fixture
def revocations(iommu):
    return Revocations(iommu, iommu.events)


@pytest.fixture
async def backend(tmp_path, iommu, revocations):
    device = VirtioIommu(iommu)
    server = QmpServer({"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"})
    ViommuCommands(server, iommu, device, revocations=revocations)
    path = tmp_path / "qmp.sock"
    await server.start_unix(str(path))
    client = QMPClient("test")
    events = EventListener()
    client.register_listener(events)
    await client.connect(str(path))
    yield iommu, device, client, events, path
    await client.disconnect()
    await server.close()


async def _next_event(events, name):
    while True:
        event = await asyncio.wait_for(events.get(), 5)
        if event["event"] == name:
            return event


async def test_queries_follow_the_iommu_state(backend):
    iommu, _device, client, events, _ = backend
    assert await client.execute("query-viommu-domains") == []
    assert await client.execute("query-viommu-endpoints") == [
        {"id": 0x10, "attached": False}, {"id": 0x18, "attached": False}]
    assert iommu.attach(7, 0x10, 0) == Status.OK
    event = await _next_event(events, "IOMMU_ENDPOINT_ATTACHED")
    assert event["data"] == {"domain": 7, "endpoint": 0x10}
    for i in range(4):
        assert iommu.map(7, 0x100000 * i, 0x100000 * i + 0xFFFFF, 0x40000000 + 0x100000 * i,
                         MAP_F_READ | (MAP_F_WRITE if i % 2 else 0)) == Status.OK
    assert await client.execute("query-viommu-domains") == [
        {"id": 7, "bypass": False, "endpoints": [0x10], "mappings": 4}]
    assert await client.execute("query-viommu-endpoints") == [
        {"id": 0x10, "attached": True, "domain": 7, "bypass": False},
        {"id": 0x18, "attached": False}]
    found = await client.execute("query-viommu-mappings",
                                 {"domain": 7, "start": 0x150000, "end": 0x250000})
    assert found == [
        {"virt-start": 0x100000, "virt-end": 0x1FFFFF, "phys-start": 0x40100000,
         "read": True, "write": True, "mmio": False},
        {"virt-start": 0x200000, "virt-end": 0x2FFFFF, "phys-start": 0x40200000,
         "read": True, "write": False, "mmio": False}]
    assert len(await client.execute("query-viommu-mappings", {"domain": 7})) == 4
    assert (await client.execute("query-viommu-config"))["mappings"] == 4
    assert iommu.detach(7, 0x10) == Status.OK
    event = await _next_event(events, "IOMMU_ENDPOINT_DETACHED")
    assert event["data"] == {"domain": 7, "endpoint": 0x10}
    config = await client.execute("query-viommu-config")
    assert config["reserved-regions"] == [
        {"start": 0x08090000, "end": 0x0809FFFF, "subtype": "msi"},
        {"start": 0x1000000, "end": 0x1FFFFFF, "subtype": "reserved"}]
    assert config["probe-size"] == 512
    assert config["mappings"] == 0  # domain 7 went away with its last endpoint
    assert (config["max-domains"], config["max-mappings"]) == (1 << 16, 1 << 18)


async def test_bad_arguments_get_qemu_style_errors(backend):
    _, _, client, _, _ = backend
    cases = [
        ("query-viommu-mappings", {}, "Parameter 'domain' is missing"),
        ("query-viommu-mappings", {"domain": "7"},
         "Invalid parameter type for 'domain', expected: integer"),
        ("query-viommu-mappings", {"domain": 3}, "Domain 3 does not exist"),
        ("query-viommu-domains", {"bogus": 1}, "Parameter 'bogus' is unexpected"),
        ("inject-fault", {"endpoint": 0x10, "address": 0, "access": "fetch"},
         "Parameter 'access' does not accept value 'fetch'"),
        ("inject-fault", {"endpoint": 1 << 32, "address": 0},
         "Parameter 'endpoint' is out of range"),
        ("inject-fault", {"endpoint": 0x10, "address": -1},
         "Parameter 'address' is out of range"),
    ]
    for cmd, args, message in cases:
        with pytest.raises(ExecuteError) as info:
            await client.execute(cmd, args)
        assert info.value.error_class == "GenericError"
        assert message in info.value.error.error.desc


async def test_inject_fault_without_event_buffers_is_counted_dropped(backend):
    _, device, client, events, _ = backend
    result = await client.execute("inject-fault", {"endpoint": 0x10, "address": 0xDEAD000,
                                                   "access": "write"})
    # no driver, so no event queue: the fault is dropped, and said so
    assert result == {"delivered": False}
    event = await _next_event(events, "IOMMU_FAULT")
    assert event["data"] == {"endpoint": 0x10, "address": 0xDEAD000, "access": "write",
                             "reason": "mapping", "delivered": False}
    stats = await client.execute("query-viommu-stats")
    assert stats["faults-dropped"] == 1 and stats["faults-reported"] == 0
    assert device.faults_dropped == 1


async def test_query_commands_lists_the_schema(backend):
    _, _, client, _, _ = backend
    names = {c["name"] for c in await client.execute("query-commands")}
    assert names >= {"qmp_capabilities", "query-commands", "query-viommu-domains",
                     "query-viommu-mappings", "query-viommu-endpoints", "query-viommu-stats",
                     "query-viommu-config", "inject-fault"}


async def test_qmp_shell_drives_the_backend(backend):
    iommu, _, _, _, path = backend
    iommu.attach(3, 0x18, 0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qemu.qmp.qmp_shell", str(path),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(
        proc.communicate(b"query-viommu-domains\ninject-fault endpoint=24 address=4096\n"), 30)
    text = out.decode()
    assert proc.returncode == 0, text
    assert '{"return": [{"id": 3, "bypass": false, "endpoints": [24], "mappings": 0}]}' in text
    assert '{"return": {"delivered": false}}' in text


async def test_revoke_mapping_now_or_armed(backend, revocations):
    iommu, _device, client, _events, _ = backend
    iommu.attach(3, 0x10, 0)
    iommu.map(3, 0x10000, 0x1FFFF, 0x40000000, MAP_F_READ | MAP_F_WRITE)
    iommu.map(3, 0x20000, 0x20FFF, 0x40100000, MAP_F_READ)
    got = await client.execute("revoke-mapping", {"endpoint": 0x10, "address": 0x10800})
    assert got == {"armed": False, "virt-start": 0x10000, "virt-end": 0x1FFFF,
                   "phys-start": 0x40000000}
    assert [m["virt-start"] for m in await client.execute(
        "query-viommu-mappings", {"domain": 3})] == [0x20000]
    for args, message in (
            ({"endpoint": 0x10, "address": 0x10800}, "no mapping at 0x10800"),
            ({"endpoint": 0x99}, "does not exist"),
            ({"endpoint": 0x10, "address": 0x20000, "min-size": 4}, "only apply"),
            ({"endpoint": 0x10, "access": "sideways"}, "does not accept")):
        with pytest.raises(ExecuteError, match=message):
            await client.execute("revoke-mapping", args)
    assert await client.execute("revoke-mapping", {"endpoint": 0x10, "min-size": 4096,
                                                   "access": "read"}) == {"armed": True}
    armed = revocations.armed[0x10]
    assert (armed.min_length, armed.access) == (4096, Access.READ)
