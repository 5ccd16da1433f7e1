"""Device-tree patching with pylibfdt.

QEMU writes an ``iommu-map`` only for its own virtio-iommu-pci. For an IOMMU
served elsewhere (vhost-user-test-device-pci), the launcher dumps QEMU's DTB
and adds the binding itself, exactly as QEMU would for its own device.
"""

from __future__ import annotations

import libfdt

PCIE_NODE = "/pcie@10000000"
_SLACK = 4096


class DtbError(Exception):
    """The device tree does not have the shape the patch expects."""


def _max_phandle(fdt: libfdt.Fdt) -> int:
    best = 0
    node = 0
    depth = 0
    while True:
        phandle: int = fdt.get_phandle(node)
        best = max(best, phandle)
        node, depth = fdt.next_node(node, depth, (libfdt.NOTFOUND,))
        if node < 0:
            return best


def add_pci_iommu(dtb: bytes, iommu_rid: int = 0x8, pcie_node: str = PCIE_NODE,
                  compatible: tuple[str, ...] = ("virtio,pci-iommu", "pci1af4,1057")) -> bytes:
    """Adds a PCI virtio-iommu at requester ID ``iommu_rid`` translating the bus.

    Every other RID of the host bridge is mapped to the IOMMU with endpoint ID
    = RID; the IOMMU's own RID is left out of the map.
    """
    fdt = libfdt.Fdt(bytes(dtb))
    fdt.resize(fdt.totalsize() + _SLACK)
    try:
        parent = fdt.path_offset(pcie_node)
    except libfdt.FdtException as exc:
        raise DtbError(f"no {pcie_node} node in the device tree") from exc
    dev, fn = iommu_rid >> 3 & 0x1F, iommu_rid & 0x7
    name = f"virtio_iommu@{dev:x},{fn:x}"
    phandle = _max_phandle(fdt) + 1
    node = fdt.add_subnode(parent, name)
    fdt.setprop(node, "compatible", b"".join(c.encode() + b"\0" for c in compatible))
    fdt.setprop(node, "reg", (iommu_rid << 8).to_bytes(4, "big") + bytes(16))
    fdt.setprop_u32(node, "#iommu-cells", 1)
    fdt.setprop_u32(node, "phandle", phandle)
    parent = fdt.path_offset(pcie_node)
    cells: list[int] = []
    if iommu_rid > 0:
        cells += [0, phandle, 0, iommu_rid]
    if iommu_rid < 0xFFFF:
        cells += [iommu_rid + 1, phandle, iommu_rid + 1, 0xFFFF - iommu_rid]
    fdt.setprop(parent, "iommu-map", b"".join(c.to_bytes(4, "big") for c in cells))
    fdt.pack()
    return bytes(fdt.as_bytearray())


def iommu_map(dtb: bytes, pcie_node: str = PCIE_NODE) -> list[tuple[int, int, int, int]]:
    """The ``iommu-map`` of the PCI host bridge: (rid-base, phandle, id-base, length)."""
    fdt = libfdt.Fdt(bytes(dtb))
    raw = bytes(fdt.getprop(fdt.path_offset(pcie_node), "iommu-map"))
    words = [int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4)]
    # A well-formed map has 4 cells an entry; a truncated one keeps its short last tuple
    # (mypy cannot see the length of a slice, hence the ignore).
    return [tuple(words[i:i + 4]) for i in range(0, len(words), 4)]  # type: ignore[misc]
