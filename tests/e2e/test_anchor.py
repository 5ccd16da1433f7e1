"""End to end: the anchor (QEMU's virtio-iommu-pci + virtio-blk-pci) with a real guest."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from pviommu.machine.console import GuestFailed, GuestTimeout
from pviommu.machine.guest_image import build_initramfs
from pviommu.machine.qemu import QemuMachine
from pviommu.machine.topology import Topology, VirtioBlkPci, VirtioIommuPci
from pviommu.scenarios import dma

pytestmark = pytest.mark.e2e


async def test_guest_dma_through_builtin_virtio_iommu(qemu, assets, tmp_path):
    plan = dma.DmaPlan()
    report = await dma.run(qemu, assets, tmp_path, mode="builtin", plan=plan)
    assert report["mode"] == "builtin"
    assert report["dma"]["read"]["ok"], report["dma"]["read"]
    assert report["dma"]["write"]["ok"], report["dma"]["write"]
    assert report["dma"]["checksums_ok"] is True
    assert report["dma"]["bytes_read"] == plan.read_bytes
    assert report["dma"]["bytes_written"] == plan.write_bytes
    # the disk sits behind the IOMMU
    assert report["guest"]["disk_pci"] == "0000:00:02.0"
    assert report["guest"]["iommu_group"] is not None
    assert report["guest"]["modules"][0] == "virtio_iommu"
    assert report["guest"]["scenario_rc"] == 0
    assert report["faults"] == []
    assert report["qemu"]["status"] == "running"
    assert {(d["vendor"], d["device"]) for d in report["qemu"]["pci_devices"]} >= {
        (0x1AF4, 0x1057), (0x1AF4, 0x1042)}  # virtio-iommu, virtio-blk (modern)
    assert report["qemu"]["exit_status"] == 0
    assert 0 < report["timings"]["boot_s"] < report["timings"]["total_s"]


async def test_guest_failure_is_reported_with_its_reason(qemu, assets, tmp_path):
    # the write lies past the end of the disk: the guest's dd fails
    plan = dma.DmaPlan(image_bytes=16 << 20, read_bytes=1 << 20, write_offset=32 << 20,
                       write_bytes=1 << 20)
    with pytest.raises(GuestFailed, match="guest scenario failed: write"):
        await dma.run(qemu, assets, tmp_path, plan=plan)


def test_demo_json_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pviommu.cli", "demo", "--mode", "builtin", "--json",
         "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["mode"] == "builtin"
    assert set(report["dma"]) >= {"bytes_read", "bytes_written", "checksums_ok"}
    assert report["dma"]["checksums_ok"] is True
    assert isinstance(report["faults"], list)
    assert set(report["timings"]) >= {"boot_s", "total_s"}


async def test_qemu_is_killed_when_the_test_body_fails(qemu, assets, tmp_path):
    initrd = tmp_path / "initrd.gz"
    # a scenario that never prints DONE: the guest blocks on a missing disk
    build_initramfs(initrd, busybox=assets.busybox, modules_dir=assets.modules,
                    modules=["virtio_iommu", "virtio_blk"], scenario="anchor-dma",
                    env={"DISK": "vdz", "READ_BYTES": 0, "WRITE_OFFSET": 0, "WRITE_BYTES": 0})
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    topo = Topology(kernel=assets.kernel, initrd=initrd,
                    devices=[VirtioIommuPci(), VirtioBlkPci(image=image)])
    vm = QemuMachine(qemu, topo, tmp_path)
    with pytest.raises(GuestTimeout):
        async with vm:
            pid = vm.pid
            assert (await vm.execute("query-status"))["status"] == "running"
            await vm.console.wait_marker("BOOTED", 120)
            await vm.console.wait_marker("DONE", 1)
    await asyncio.sleep(0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not vm.qmp_socket.exists()
