"""From a topology to what runs: the backend's command line, QEMU's devices, the
guest's image.

Each IOMMU kind is one :class:`Wiring`: the only place that knows which devices
and which ``pviommu serve`` options the kind takes. A new kind is a new wiring
in :data:`WIRINGS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..machine.guest_image import build_guest_image
from ..machine.topology import (
    Device,
    VfioUserPci,
    VhostUserBlkPci,
    VhostUserIommuPci,
    VhostUserRngPci,
    VirtioBlkPci,
    VirtioIommuPci,
    VirtioRngPci,
    pci_name,
)
from ..provision import GuestAssets
from .topology import Endpoint, Topology, TopologyError

BASE_KERNEL_ARGS = "console=ttyAMA0 panic=-1 quiet"
MODULES = {"blk": "virtio_blk", "rng": "virtio-rng"}
"""The guest driver of each endpoint kind."""
STATE_DIR = "backend-state"
"""The backend's state directory (``pviommu serve --state``) in the lab's workdir,
beside the sockets."""


@dataclass(frozen=True)
class LabEndpoint:
    """One endpoint device of a lab, where it sits and what serves it."""

    kind: str
    address: str
    """Its PCI address, "DEV.FN" (QEMU's ``addr=``)."""
    endpoint_id: int
    """Its IOMMU endpoint ID: the PCI requester ID (the StreamID under the SMMUv3)."""
    socket: Path | None
    """The backend's socket QEMU connects it to; None for QEMU's own devices."""
    image: Path | None
    """A blk's disk image."""
    description: Endpoint

    @property
    def pci(self) -> str:
        """Its name in the guest's /sys/bus/pci/devices, e.g. "0000:00:02.0"."""
        return pci_name(self.endpoint_id)


def lab_endpoints(topology: Topology, workdir: Path, served: bool) -> list[LabEndpoint]:
    """The topology's endpoints placed, with their sockets (``served``: the backend
    serves them) and images (fresh ones go to ``workdir``)."""
    out = []
    for p in topology.placed():
        image = None
        if p.endpoint.kind == "blk":
            image = p.endpoint.image or workdir / f"disk-{p.address.replace('.', '-')}.img"
            if "," in str(image):
                raise TopologyError(f"endpoints[{p.index}].image",
                                    f"{image}: a path with a comma cannot be passed to "
                                    "pviommu serve or QEMU")
        socket = workdir / f"{p.endpoint.kind}-{p.address.replace('.', '-')}.sock"
        out.append(LabEndpoint(p.endpoint.kind, p.address, p.endpoint_id,
                               socket if served else None, image, p.endpoint))
    return out


def create_images(endpoints: list[LabEndpoint]) -> None:
    """Creates the missing disk images (sparse) of QEMU's own blk devices; the backend
    creates those of its devices itself (``size=``)."""
    for ep in endpoints:
        if ep.kind != "blk" or ep.image is None or ep.socket is not None:
            continue
        size = ep.description.size
        if ep.image.exists():
            if size is not None and ep.image.stat().st_size != size:
                raise TopologyError("image", f"{ep.image} is {ep.image.stat().st_size} bytes, "
                                    f"not the size {size} the topology gives")
            continue
        if ep.description.image is not None and size is None:
            raise TopologyError("image", f"{ep.image} does not exist")
        with open(ep.image, "wb") as fh:
            fh.truncate(size if size is not None else 64 << 20)


class Wiring:
    """How one IOMMU kind is wired: QEMU's devices, the backend's options, modules."""

    served = False
    """Whether the backend serves the endpoints (and so runs at all)."""
    machine_iommu: str | None = None
    """The virt machine's own IOMMU (``-M virt,iommu=``)."""
    patch_dtb = False
    """Whether the device tree needs the PV-IOMMU's node (dumped, patched, -dtb)."""
    iommu_module: str | None = "virtio_iommu"

    def backend_args(self, topology: Topology, endpoints: list[LabEndpoint],
                     viommu: Path) -> list[str]:
        """``pviommu serve``'s options besides --qmp (meaningful when ``served``)."""
        return []

    def devices(self, topology: Topology, endpoints: list[LabEndpoint],
                viommu: Path) -> list[Device]:
        """QEMU's devices: the IOMMU's (if it is a PCI function) and the endpoints'."""
        raise NotImplementedError


def _blk_options(ep: LabEndpoint) -> str:
    d = ep.description
    opts = f",image={ep.image}"
    if d.size is not None or d.image is None:
        opts += f",size={d.size if d.size is not None else 64 << 20}"
    if d.read_only:
        opts += ",ro"
    return opts + f",serial={d.serial}"


def _socket(ep: LabEndpoint) -> Path:
    assert ep.socket is not None, "served endpoints have sockets"
    return ep.socket


def _serve_endpoint(ep: LabEndpoint, option: str) -> list[str]:
    text = f"{ep.socket},endpoint={ep.address}"
    if ep.kind == "blk":
        text += _blk_options(ep)
    return [f"--{option}", text]


class PvWiring(Wiring):
    """The backend's PV-IOMMU (vhost-user) and its endpoints over vfio-user."""

    served = True
    patch_dtb = True

    def backend_args(self, topology: Topology, endpoints: list[LabEndpoint],
                     viommu: Path) -> list[str]:
        i = topology.iommu
        args = ["--viommu", str(viommu), "--max-domains", str(i.max_domains),
                "--max-mappings", str(i.max_mappings)]
        if i.bypass:
            args.append("--bypass")
        if not i.bypass_config:
            args.append("--no-bypass-config")
        for start, end in i.reserved:
            args += ["--reserved", f"{start:#x}:{end:#x}"]
        args += ["--page-size-mask", f"{i.page_size_mask:#x}", "--probe-size", str(i.probe_size)]
        for option, value in (("--input-range", i.input_range),
                              ("--domain-range", i.domain_range)):
            if value is not None:
                args += [option, f"{value[0]:#x}:{value[1]:#x}"]
        if i.mmio:
            args.append("--mmio")
        if not i.msi_region:
            args.append("--no-msi-region")
        for ep in endpoints:
            args += _serve_endpoint(ep, ep.kind)
        return args

    def devices(self, topology: Topology, endpoints: list[LabEndpoint],
                viommu: Path) -> list[Device]:
        assert topology.iommu_address is not None
        return [VhostUserIommuPci(socket=viommu, addr=topology.iommu_address),
                *(VfioUserPci(socket=_socket(ep), addr=ep.address, id=f"{ep.kind}{n}")
                  for n, ep in enumerate(endpoints))]


class VsmmuWiring(Wiring):
    """QEMU's SMMUv3 (stage 1) and the backend's endpoints over vhost-user (stage 2)."""

    served = True
    machine_iommu = "smmuv3"
    iommu_module = None  # arm-smmu-v3 is built into Debian's kernel

    def backend_args(self, topology: Topology, endpoints: list[LabEndpoint],
                     viommu: Path) -> list[str]:
        args: list[str] = []
        for ep in endpoints:
            args += _serve_endpoint(ep, f"vsmmu-{ep.kind}")
        # Stage 2 kept, for Lab.restart_backend() (what a reconnecting disk needs).
        return [*args, "--state", str(viommu.parent / STATE_DIR)]

    def devices(self, topology: Topology, endpoints: list[LabEndpoint],
                viommu: Path) -> list[Device]:
        out: list[Device] = []
        for n, ep in enumerate(endpoints):
            if ep.kind == "blk":
                out.append(VhostUserBlkPci(socket=_socket(ep), addr=ep.address, id=f"vblk{n}",
                                           reconnect_ms=ep.description.reconnect_ms))
            else:
                out.append(VhostUserRngPci(socket=_socket(ep), addr=ep.address,
                                           id=f"vrng{n}"))
        return out


class QemuWiring(Wiring):
    """QEMU's own devices behind its virtio-iommu-pci (``builtin``), its SMMUv3
    (``smmuv3``) or no IOMMU (``none``)."""

    def __init__(self, iommu: str | None) -> None:
        self.iommu = iommu
        self.machine_iommu = "smmuv3" if iommu == "smmuv3" else None
        self.iommu_module = "virtio_iommu" if iommu == "virtio-iommu" else None

    def devices(self, topology: Topology, endpoints: list[LabEndpoint],
                viommu: Path) -> list[Device]:
        out: list[Device] = []
        if self.iommu == "virtio-iommu":
            assert topology.iommu_address is not None
            out.append(VirtioIommuPci(addr=topology.iommu_address))
        translated = self.iommu is not None
        for n, ep in enumerate(endpoints):
            if ep.kind == "blk":
                assert ep.image is not None
                out.append(VirtioBlkPci(image=ep.image, addr=ep.address, id=f"blk{n}",
                                        iommu_platform=translated,
                                        read_only=ep.description.read_only,
                                        serial=ep.description.serial))
            else:
                out.append(VirtioRngPci(addr=ep.address, id=f"rng{n}",
                                        iommu_platform=translated))
        return out


WIRINGS: dict[str, Wiring] = {"pv": PvWiring(), "vsmmu": VsmmuWiring(),
                              "builtin": QemuWiring("virtio-iommu"),
                              "smmuv3": QemuWiring("smmuv3"),
                              "none": QemuWiring(None)}


def guest_modules(topology: Topology) -> list[str]:
    """The modules the guest loads at boot: the topology's ``load_modules``, else the
    IOMMU's driver, then the endpoints'."""
    if topology.load_modules is not None:
        return list(topology.load_modules)
    wiring = WIRINGS[topology.iommu.kind]
    names = [wiring.iommu_module] if wiring.iommu_module else []
    return names + list(dict.fromkeys(MODULES[e.kind] for e in topology.endpoints))


def build_lab_image(out: Path, topology: Topology, assets: GuestAssets) -> list[str]:
    """The lab guest's initramfs: its modules, the topology's files, a shell on the
    console. Returns the names of the modules it loads, in order."""
    modules = build_guest_image(out, busybox=assets.busybox, modules_dir=assets.modules,
                                modules=guest_modules(topology), files=topology.files)
    return [m.name for m in modules]


def kernel_command_line(topology: Topology) -> str:
    """The guest's kernel command line."""
    return " ".join([BASE_KERNEL_ARGS, *topology.guest_kernel_args()])
