"""The iommu-map patch, on a device tree compiled by dtc and on QEMU's own."""

import subprocess

import libfdt
import pytest

from pviommu.machine import dtb
from pviommu.machine.qemu import dump_dtb
from pviommu.machine.topology import Topology

DTS = """
/dts-v1/;
/ {
    #address-cells = <2>; #size-cells = <2>;
    intc: intc@8000000 { phandle = <0x8002>; };
    pcie@10000000 {
        compatible = "pci-host-ecam-generic";
        device_type = "pci";
        #address-cells = <3>; #size-cells = <2>;
        msi-map = <0 0x8002 0 0x10000>;
    };
};
"""


@pytest.fixture
def small_dtb(tmp_path):
    src = tmp_path / "t.dts"
    src.write_text(DTS)
    return subprocess.run(["dtc", "-I", "dts", "-O", "dtb", src], check=True,
                          capture_output=True).stdout


def test_patch_adds_the_iommu_node_and_map(small_dtb):
    out = dtb.add_pci_iommu(small_dtb, iommu_rid=0x8)
    fdt = libfdt.Fdt(out)
    node = fdt.path_offset("/pcie@10000000/virtio_iommu@1,0")
    assert fdt.getprop(node, "compatible").as_stringlist() == ["virtio,pci-iommu", "pci1af4,1057"]
    assert bytes(fdt.getprop(node, "reg")) == (0x800).to_bytes(4, "big") + bytes(16)
    assert fdt.getprop(node, "#iommu-cells").as_uint32() == 1
    phandle = fdt.get_phandle(node)
    assert phandle == 0x8003  # one above the largest existing phandle
    assert dtb.iommu_map(out) == [(0, phandle, 0, 8), (9, phandle, 9, 0xFFF7)]
    # the rest of the tree is untouched
    assert fdt.getprop(fdt.path_offset("/pcie@10000000"), "msi-map") is not None


def test_patch_at_rid_zero_maps_only_above(small_dtb):
    out = dtb.add_pci_iommu(small_dtb, iommu_rid=0)
    ph = libfdt.Fdt(out).get_phandle(libfdt.Fdt(out).path_offset("/pcie@10000000/virtio_iommu@0,0"))
    assert dtb.iommu_map(out) == [(1, ph, 1, 0xFFFF)]


def test_missing_host_bridge_is_a_clear_error(tmp_path):
    src = tmp_path / "e.dts"
    src.write_text("/dts-v1/; / { };")
    blob = subprocess.run(["dtc", "-I", "dts", "-O", "dtb", src], check=True,
                          capture_output=True).stdout
    with pytest.raises(dtb.DtbError, match="pcie@10000000"):
        dtb.add_pci_iommu(blob)


async def test_patch_of_qemus_virt_dtb(qemu, assets, tmp_path):
    topo = Topology(kernel=assets.kernel, initrd=assets.kernel)
    blob = await dump_dtb(qemu, topo, tmp_path / "virt.dtb")
    patched = dtb.add_pci_iommu(blob)
    fdt = libfdt.Fdt(patched)
    phandles = []
    node, depth = 0, 0
    while node >= 0:
        if fdt.get_phandle(node):
            phandles.append(fdt.get_phandle(node))
        node, depth = fdt.next_node(node, depth, (libfdt.NOTFOUND,))
    assert len(phandles) == len(set(phandles)), "phandles must stay unique"
    ph = fdt.get_phandle(fdt.path_offset("/pcie@10000000/virtio_iommu@1,0"))
    assert dtb.iommu_map(patched) == [(0, ph, 0, 8), (9, ph, 9, 0xFFF7)]
    # dtc can decompile what we wrote
    subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-o", "/dev/null", "-"], input=patched,
                   check=True, capture_output=True)
