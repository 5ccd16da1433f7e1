"""Topology -> QEMU command line."""

import json
from pathlib import Path

import pytest

from pviommu.machine.topology import (
    Topology,
    VfioUserPci,
    VhostUserBlkPci,
    VhostUserRngPci,
    VirtioBlkPci,
    VirtioIommuPci,
    pci_addr,
    pci_rid,
)


@pytest.mark.parametrize(("addr", "rid"), [("1.0", 0x8), ("2.0", 0x10), ("2", 0x10),
                                           ("1f.7", 0xFF)])
def test_pci_rid(addr, rid):
    assert pci_rid(addr) == rid
    assert pci_rid(pci_addr(rid)) == rid


def test_command_line_of_the_anchor():
    topo = Topology(kernel=Path("/k"), initrd=Path("/i"),
                    devices=[VirtioIommuPci(), VirtioBlkPci(image=Path("/d.img"))])
    argv = topo.command_line(Path("/q"), qmp_socket=Path("/s"))
    joined = " ".join(argv)
    assert argv[0] == "/q"
    assert "-machine virt,gic-version=3,memory-backend=mem" in joined
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in joined
    assert "-nic none" in joined
    assert "-qmp unix:/s,server=on,wait=off" in joined
    assert "virtio-iommu-pci,id=viommu,addr=1.0" in joined
    assert ("virtio-blk-pci,id=blk0,drive=blk0-fmt,addr=2.0,disable-legacy=on,"
            "iommu_platform=on") in joined
    assert "filename=/d.img" in joined
    assert topo.devices[1].endpoint_id == 0x10


def test_dumpdtb_and_dtb_options():
    topo = Topology(kernel=Path("/k"), initrd=Path("/i"), dtb=Path("/patched.dtb"))
    assert "-dtb" in topo.command_line(Path("/q"))
    dump = topo.command_line(Path("/q"), dumpdtb=Path("/out.dtb"))
    assert "-dtb" not in dump
    assert "virt,gic-version=3,memory-backend=mem,dumpdtb=/out.dtb" in dump


def test_a_vfio_user_endpoint_is_a_json_device_with_its_socket():
    dev = VfioUserPci(socket=Path("/run/blk.sock"), addr="3.0", id="blk")
    argv = dev.qemu_args()
    assert argv[0] == "-device"
    assert json.loads(argv[1]) == {"driver": "vfio-user-pci", "id": "blk", "addr": "3.0",
                                   "socket": {"type": "unix", "path": "/run/blk.sock"}}
    assert dev.endpoint_id == 0x18


def test_vsmmu_machine_has_qemu_smmuv3_and_stock_vhost_user_devices():
    topo = Topology(kernel=Path("/k"), initrd=Path("/i"), iommu="smmuv3",
                    devices=[VhostUserBlkPci(socket=Path("/b.sock")),
                             VhostUserRngPci(socket=Path("/r.sock"))])
    argv = topo.command_line(Path("/q"))
    assert argv[argv.index("-machine") + 1] == "virt,gic-version=3,memory-backend=mem,iommu=smmuv3"
    joined = " ".join(argv)
    assert "socket,id=vblk,path=/b.sock" in joined
    assert ("vhost-user-blk-pci,chardev=vblk,addr=2.0,iommu_platform=on,num-queues=1,"
            "disable-legacy=on") in joined
    assert "vhost-user-rng-pci,chardev=vrng,addr=3.0,iommu_platform=on" in joined
    assert [d.endpoint_id for d in topo.devices] == [0x10, 0x18]
    assert "iommu=" not in " ".join(Topology(kernel=Path("/k"), initrd=Path("/i"))
                                    .command_line(Path("/q")))
