"""End to end, vSMMU mode: the backend's virtio-blk and virtio-rng over vhost-user to
stock vhost-user-blk-pci / vhost-user-rng-pci (iommu_platform=on) behind QEMU's SMMUv3.

The guest's arm-smmu-v3 driver owns stage 1; the backend owns stage 2. The disk is
read and written with sha256 checked on both sides and the rng read; a stage-2
unmap armed over QMP takes the IPA page under the guest's next disk read away, which
gives the VSMMU_EVENT record and an I/O error in the guest; the host maps the page
back and the guest reads on.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from pviommu.backend import Backend, BackendConfig
from pviommu.endpoints import EndpointSpec
from pviommu.iommu.smmu_events import SmmuEvent
from pviommu.machine.guest_image import build_guest_image
from pviommu.machine.qemu import QemuMachine
from pviommu.machine.topology import Topology, VhostUserBlkPci, VhostUserRngPci, pci_rid
from pviommu.qmp.vsmmu import EVENT_VSMMU
from pviommu.scenarios import pv
from pviommu.scenarios.dma import DmaPlan, make_image

pytestmark = pytest.mark.e2e

MiB = 1 << 20
PLAN = DmaPlan(image_bytes=16 * MiB, read_bytes=1 * MiB, write_offset=8 * MiB,
               write_bytes=1 * MiB)
BLK_ADDR, RNG_ADDR = "2.0", "3.0"

GUEST = r"""
mark() { echo "@@PVIOMMU $*"; }
smmu=$(ls -d /sys/bus/platform/devices/*.smmuv3 | head -1)
driver=$(basename "$(readlink "$smmu/driver")")
mark SMMU iommus="$(ls /sys/class/iommu | tr '\n' ',')" driver="$driver"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || { mark FAIL what=no-disk; exit 1; }
mark GROUP blk="$(basename "$(readlink /sys/bus/pci/devices/0000:00:02.0/iommu_group)")"
bs=65536
sum=$(dd if=/dev/vda bs=$bs count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
mark READ sha256="$sum"
dd if=/dev/urandom of=/tmp/payload bs=$bs count=16 2>/dev/null
wsum=$(sha256sum /tmp/payload | cut -d' ' -f1)
dd if=/tmp/payload of=/dev/vda bs=$bs seek=128 oflag=direct conv=fsync 2>/dev/null ||
    mark FAIL what=write
back=$(dd if=/dev/vda bs=$bs skip=128 count=16 iflag=direct 2>/dev/null |
       sha256sum | cut -d' ' -f1)
mark WRITE sha256="$wsum" readback="$back"
mark RNG bytes="$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)"
mark READY
i=0
while [ $i -lt 120 ]; do
    if ! dd if=/dev/vda of=/dev/null bs=$bs count=1 iflag=direct 2>/dev/null; then
        mark IOERR try=$i logged="$(dmesg | grep -c 'I/O error')"
        break
    fi
    sleep 0.5; i=$((i + 1))
done
i=0
while [ $i -lt 60 ]; do
    sleep 0.5; i=$((i + 1))
    s=$(dd if=/dev/vda bs=$bs count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$s" = "$sum" ] && { mark AFTER sha256="$s"; break; }
done
mark DONE
"""


async def _event(events, name, timeout=60):
    while True:
        event = await asyncio.wait_for(events.get(), timeout)
        if event["event"] == name:
            return event["data"]


async def test_vsmmu_blk_and_rng_with_a_stage2_fault(qemu, assets, tmp_path):
    image = tmp_path / "disk.img"
    host_read_sha = make_image(image, PLAN)
    blk = EndpointSpec("blk", tmp_path / "blk.sock", pci_rid(BLK_ADDR), image=image,
                       transport="vhost-user")
    rng = EndpointSpec("rng", tmp_path / "rng.sock", pci_rid(RNG_ADDR), transport="vhost-user")
    script = tmp_path / "init.sh"
    script.write_text(GUEST)
    initrd = tmp_path / "initramfs.cpio.gz"
    build_guest_image(initrd, busybox=assets.busybox, modules_dir=assets.modules,
                      modules=["virtio_blk", "virtio-rng"], init=script)
    config = BackendConfig(viommu_socket=None, qmp_socket=tmp_path / "qmp.sock",
                           devices=[blk, rng])
    async with Backend(config):
        client, events = await pv.backend_qmp(config.qmp_socket)
        try:
            topology = Topology(kernel=assets.kernel, initrd=initrd, iommu="smmuv3",
                                append="console=ttyAMA0 panic=-1 quiet",
                                devices=[VhostUserBlkPci(BLK_ADDR, "vblk", blk.socket),
                                         VhostUserRngPci(RNG_ADDR, "vrng", rng.socket)])
            vm = QemuMachine(qemu, topology, tmp_path, log_file=tmp_path / "console.log")
            async with vm:
                console = vm.console
                ready = await console.wait_marker("READY", 240)
                assert ready is not None
                smmu = console.find("SMMU").fields
                assert "smmu3" in smmu["iommus"] and smmu["driver"] == "arm-smmu-v3"
                read = console.find("READ").fields
                write = console.find("WRITE").fields
                assert read["sha256"] == host_read_sha
                assert write["readback"] == write["sha256"]
                assert console.find("RNG").fields["bytes"] == "256"

                devices = {d["id"]: d for d in await client.execute("query-endpoint-devices")}
                for d in devices.values():
                    assert (d["transport"], d["mode"]) == ("vhost-user", "vsmmu")
                    assert d["iotlb"]["miss"] > 0 and d["iotlb"]["update"] > 0
                assert devices[blk.endpoint]["iotlb"]["invalidate"] > 0

                # The IPA page under the guest's next disk read leaves stage 2.
                armed = await client.execute("stage2-unmap", {
                    "endpoint": blk.endpoint, "min-size": 4096, "access": "write"})
                assert armed["armed"]
                data = await _event(events, EVENT_VSMMU)
                assert (data["type"], data["s2"], data["class"], data["rnw"],
                        data["stream-id"]) == ("F_TRANSLATION", True, "in", False, blk.endpoint)
                record = SmmuEvent.unpack(bytes.fromhex(data["record"]))
                assert record.ipa == data["ipa"] and record.input_address == data["input-address"]
                queued = await client.execute("query-vsmmu-events")
                assert queued["events"][-1]["record"] == data["record"]
                ioerr = await console.wait_marker("IOERR", 60)
                assert int(ioerr.fields["logged"]) >= 1
                # The host gives the page back; the guest reads on.
                page = data["ipa"] & ~0xFFF
                await client.execute("stage2-map", {"start": page, "size": 4096})
                after = await console.wait_marker("AFTER", 60)
                assert after.fields["sha256"] == host_read_sha
                await console.wait_marker("DONE", 30)
        finally:
            await client.disconnect()
    with open(image, "rb") as fh:
        fh.seek(PLAN.write_offset)
        assert hashlib.sha256(fh.read(PLAN.write_bytes)).hexdigest() == write["sha256"]
