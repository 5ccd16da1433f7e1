"""Topology -> QEMU command line."""

from pathlib import Path

import pytest

from pviommu.machine.topology import Topology, VirtioBlkPci, VirtioIommuPci, pci_rid


@pytest.mark.parametrize(("addr", "rid"), [("1.0", 0x8), ("2.0", 0x10), ("2", 0x10),
                                           ("1f.7", 0xFF)])
def test_pci_rid(addr, rid):
    assert pci_rid(addr) == rid


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
    assert "virtio-blk-pci,id=blk0,drive=blk0-fmt,addr=2.0,disable-legacy=on" in joined
    assert "filename=/d.img" in joined
    assert topo.devices[1].endpoint_id == 0x10


def test_dumpdtb_and_dtb_options():
    topo = Topology(kernel=Path("/k"), initrd=Path("/i"), dtb=Path("/patched.dtb"))
    assert "-dtb" in topo.command_line(Path("/q"))
    dump = topo.command_line(Path("/q"), dumpdtb=Path("/out.dtb"))
    assert "-dtb" not in dump
    assert "virt,gic-version=3,memory-backend=mem,dumpdtb=/out.dtb" in dump
