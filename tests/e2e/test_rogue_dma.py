"""End to end: QMP ``inject-dma`` makes the backend's disk do a rogue DMA behind a real
guest's PV-IOMMU; the guest's virtio_iommu driver logs the real translation fault and
the guest's own disk I/O carries on."""

import asyncio

import pytest
from qemu.qmp import EventListener

from pviommu.backend import EVENT_NEEDS_RESET, Backend, BackendConfig
from pviommu.machine.qemu import QemuMachine
from pviommu.machine.topology import pci_name
from pviommu.qmp.viommu import EVENT_FAULT, EVENT_REVOKED
from pviommu.scenarios import pv
from pviommu.scenarios.dma import DmaPlan, blk_checks, make_image
from pviommu.scenarios.runner import wait_step

pytestmark = pytest.mark.e2e

MiB = 1 << 20
ROGUE = 0xBAD000
PLAN = DmaPlan(image_bytes=16 * MiB, read_bytes=1 * MiB, write_offset=8 * MiB,
               write_bytes=1 * MiB)


def _holds(mappings, address):
    return any(m["virt-start"] <= address <= m["virt-end"] for m in mappings)


async def _event(events, name):
    event = await asyncio.wait_for(events.get(), 30)
    while event["event"] != name:
        event = await asyncio.wait_for(events.get(), 30)
    return event["data"]


async def test_a_rogue_dma_is_a_real_fault_in_the_guest_and_io_carries_on(qemu, assets,
                                                                          tmp_path):
    image = tmp_path / "disk.img"
    host_read_sha = make_image(image, PLAN)
    specs = pv.endpoint_specs(tmp_path, image)
    blk = specs[0].endpoint
    # The guest checks the disk, says READY, waits for a fault in its log (FAULT_SEEN),
    # then reads the disk until the armed revocation fails a read, and reads again.
    opts = pv.PvOptions(blk=PLAN, rng_bytes=0, fault=pv.FaultPlan(), revoke=True)
    initrd = tmp_path / "initramfs.cpio.gz"
    pv.pv_initramfs(initrd, assets, [pci_name(s.endpoint) for s in specs], opts)
    config = BackendConfig(viommu_socket=tmp_path / "viommu.sock",
                           qmp_socket=tmp_path / "qmp.sock", endpoints=[], devices=specs)
    async with Backend(config) as backend:
        client, events = await pv.backend_qmp(config.qmp_socket)
        resets = EventListener(EVENT_NEEDS_RESET)
        client.register_listener(resets)
        try:
            topology = await pv.pv_topology(
                qemu, assets, initrd, tmp_path, config.viommu_socket,
                "console=ttyAMA0 panic=-1 quiet", pv.endpoint_devices(specs))
            vm = QemuMachine(qemu, topology, tmp_path, log_file=tmp_path / "console.log")
            async with vm:
                console = vm.console
                await console.wait_marker("BOOTED", opts.boot_timeout)
                await wait_step(console, resets, "READY", opts.step_timeout)
                [ep] = [e for e in await client.execute("query-viommu-endpoints")
                        if e["id"] == blk]
                assert ep["attached"] and not ep["bypass"]
                mappings = await client.execute("query-viommu-mappings",
                                                 {"domain": ep["domain"]})
                assert not _holds(mappings, ROGUE)
                events.clear()

                # a rogue read where the guest mapped nothing: a real MAPPING fault
                result = await client.execute("inject-dma", {"endpoint": blk,
                                                             "address": ROGUE})
                assert result == {"translated": False, "fault": {
                    "endpoint": blk, "address": ROGUE, "access": "read",
                    "reason": "mapping"}}
                line = await console.wait_line(r"fault from EP 16 at 0xbad000 \[R\]", 60)
                assert "virtio_iommu" in line
                assert await _event(events, EVENT_FAULT) == {
                    "endpoint": blk, "address": ROGUE, "access": "read",
                    "reason": "mapping", "delivered": True}
                await wait_step(console, resets, "FAULT_SEEN", opts.step_timeout)

                # a rogue read of what the guest did map (its rings): the bytes there
                readable = next(m for m in mappings if m["read"])
                result = await client.execute("inject-dma", {
                    "endpoint": blk, "address": readable["virt-start"], "size": 16})
                assert result["translated"] is True and result["fault"] is None
                memory = backend.endpoints[blk].memory
                assert bytes.fromhex(result["data"]) == memory.read(readable["phys-start"], 16)

                # the guest's own I/O: reads go on until a revocation fails one, the
                # driver logs the I/O error, and the next read succeeds
                await client.execute("revoke-mapping", {"endpoint": blk, "min-size": 4096,
                                                        "access": "write"})
                await _event(events, EVENT_REVOKED)
                await wait_step(console, resets, "IO_RECOVERED", opts.step_timeout)
                await wait_step(console, resets, "DONE", opts.step_timeout)
                assert await vm.wait_exit(opts.step_timeout) == 0
            stats = await client.execute("query-viommu-stats")
            [disk, _rng] = await client.execute("query-endpoint-devices")
        finally:
            await client.disconnect()
    assert console.find("FAIL") is None
    assert blk_checks(console, image, PLAN, host_read_sha)["checksums_ok"]
    # two faults reached the guest: the rogue DMA's and the revocation's; only the
    # revocation's was one of the disk's requests
    assert (stats["faults-reported"], stats["faults-dropped"]) == (2, 0)
    assert disk["stats"]["faults"] == 1 and disk["stats"]["errors"] == 1
    assert disk["needs-reset"] is False
