"""The soak's host actions keep nothing per action in the backend's heap.

The soak (pviommu/scenarios/soak.py) faults and revokes over QMP several times a
second for minutes; its RSS check once failed for memory that was not the
backend's (the guest RAM pages it touched, see ``soak._resources``). This is the
in-process check of the backend's own part: thousands of MAP, revoke-mapping,
inject-fault and UNMAP cycles through a real QMP server and client leave the
Python heap (tracemalloc) where a few hundred left it.
"""

import gc
import logging
import tracemalloc

import pytest
from qemu.qmp import QMPClient

from pviommu.devices.viommu import VirtioIommu
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import IommuConfig, PvIommu, Status
from pviommu.iommu.revocation import Revocations
from pviommu.qmp.server import QmpServer
from pviommu.qmp.viommu import ViommuCommands

ENDPOINT, DOMAIN, PAGE = 0x10, 1, 0x1000
WARM_UP, CYCLES = 200, 1500
SLACK = 64 * 1024
"""Bytes the heap may move by between the two measures (caches, free lists): far
below what a record kept per action would add (~100 bytes a cycle: 150 KB)."""


@pytest.fixture
async def host(tmp_path):
    iommu = PvIommu(IommuConfig(), endpoints=[ENDPOINT])
    device = VirtioIommu(iommu)
    server = QmpServer({"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"})
    ViommuCommands(server, iommu, device, revocations=Revocations(iommu, iommu.events))
    path = tmp_path / "qmp.sock"
    await server.start_unix(str(path))
    client = QMPClient("soak")
    # qemu.qmp's default listener queues every event the client hears, for ever: the
    # client's heap, not the backend's; it would hide the measure.
    client.events.event_filter = lambda _event: False
    await client.connect(str(path))
    assert iommu.attach(DOMAIN, ENDPOINT, 0) == Status.OK
    yield iommu, device, client
    await client.disconnect()
    await server.close()


async def _cycles(iommu, client, first, n):
    for i in range(first, first + n):
        iova = (i % 512) * PAGE
        assert iommu.map(DOMAIN, iova, iova + PAGE - 1, 0x40000000 + iova,
                         MAP_F_READ | MAP_F_WRITE) == Status.OK
        if i % 2:
            await client.execute("revoke-mapping", {"endpoint": ENDPOINT, "address": iova})
        else:
            await client.execute("inject-fault", {"endpoint": ENDPOINT, "address": iova,
                                                  "access": "read", "reason": "mapping"})
            assert iommu.unmap(DOMAIN, iova, iova + PAGE - 1) == Status.OK


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def test_fault_and_revocation_cycles_leave_the_heap_flat(host):
    iommu, device, client = host
    logging.disable(logging.WARNING)  # pytest keeps every record it captures
    tracemalloc.start()
    try:
        await _cycles(iommu, client, 0, WARM_UP)
        before = _heap()
        await _cycles(iommu, client, WARM_UP, CYCLES)
        after = _heap()
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
    assert device.faults_dropped == (WARM_UP + CYCLES) // 2  # no event queue: all dropped
    assert iommu.mapping_count == 0
    assert after - before < SLACK, f"the heap grew {after - before} bytes in {CYCLES} cycles"
