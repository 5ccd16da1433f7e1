"""A machine topology and the QEMU command line that builds it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def pci_rid(addr: str, bus: int = 0) -> int:
    """The requester ID (= IOMMU endpoint ID) of a PCI address "DEV.FN" on ``bus``."""
    dev, _, fn = addr.partition(".")
    return (bus << 8) | (int(dev, 16) << 3) | int(fn or "0", 16)


def pci_addr(rid: int) -> str:
    """The "DEV.FN" address (QEMU's ``addr=``) of requester ID ``rid`` on its bus."""
    return f"{rid >> 3 & 0x1F:x}.{rid & 7:x}"


def pci_name(rid: int) -> str:
    """The guest's sysfs name (domain 0) of the function with requester ID ``rid``."""
    return f"0000:{rid >> 8:02x}:{rid >> 3 & 0x1F:02x}.{rid & 7:x}"


@dataclass
class Device:
    """A device on the machine's root PCI bus at ``addr`` ("DEV.FN")."""

    addr: str
    id: str

    @property
    def endpoint_id(self) -> int:
        """The IOMMU endpoint ID of the device (its PCI requester ID)."""
        return pci_rid(self.addr)

    def qemu_args(self) -> list[str]:
        """The QEMU options that create this device."""
        raise NotImplementedError


@dataclass
class VirtioIommuPci(Device):
    """QEMU's built-in virtio-iommu-pci (the anchor the PV-IOMMU is measured against)."""

    addr: str = "1.0"
    id: str = "viommu"

    def qemu_args(self) -> list[str]:
        return ["-device", f"virtio-iommu-pci,id={self.id},addr={self.addr}"]


@dataclass
class VhostUserIommuPci(Device):
    """The PV-IOMMU: QEMU's generic vhost-user device, served by the backend."""

    socket: Path = Path()
    addr: str = "1.0"
    id: str = "viommu"

    def qemu_args(self) -> list[str]:
        return [
            "-chardev", f"socket,id={self.id},path={self.socket}",
            "-device", f"vhost-user-test-device-pci,id={self.id}-dev,chardev={self.id},"
            f"virtio-id=23,num_vqs=2,config_size=40,addr={self.addr}",
        ]


@dataclass
class VirtioRngPci(Device):
    """QEMU's built-in virtio-rng-pci (modern only).

    Behind the PV-IOMMU it is an endpoint the guest attaches (virtio_pci binds
    to it) without DMA, as long as the guest does not load virtio_rng: QEMU
    would take the guest's I/O virtual addresses for physical ones.
    """

    addr: str = "2.0"
    id: str = "rng0"
    iommu_platform: bool = False
    """Offer VIRTIO_F_ACCESS_PLATFORM: its DMA then goes through QEMU's own IOMMU."""

    def qemu_args(self) -> list[str]:
        platform = ",iommu_platform=on" if self.iommu_platform else ""
        return ["-device",
                f"virtio-rng-pci,id={self.id},addr={self.addr},disable-legacy=on{platform}"]


@dataclass
class VirtioBlkPci(Device):
    """QEMU's built-in virtio-blk-pci backed by a raw image file.

    ``iommu_platform`` makes it offer VIRTIO_F_ACCESS_PLATFORM, so that the
    guest's DMA to it goes through the IOMMU (maps and unmaps); without it
    Linux hands the device guest-physical addresses and the IOMMU never
    translates anything for it.
    """

    image: Path = Path()
    addr: str = "2.0"
    id: str = "blk0"
    iommu_platform: bool = True
    read_only: bool = False
    serial: str | None = None
    """What the guest reads as the disk's serial (virtio-blk GET_ID); None: QEMU's none."""

    def qemu_args(self) -> list[str]:
        ro = ",read-only=on" if self.read_only else ""
        return [
            "-blockdev",
            f"driver=file,filename={self.image},node-name={self.id}-file,cache.direct=off"
            f"{ro}",
            "-blockdev", f"driver=raw,file={self.id}-file,node-name={self.id}-fmt{ro}",
            "-device", f"virtio-blk-pci,id={self.id},drive={self.id}-fmt,addr={self.addr},"
            f"disable-legacy=on,iommu_platform={'on' if self.iommu_platform else 'off'}"
            + (f",serial={self.serial}" if self.serial else ""),
        ]


@dataclass
class VfioUserPci(Device):
    """A PCI function served by the backend over vfio-user (a PV-mode endpoint).

    QEMU forwards its config space and BAR accesses to the socket and hands
    guest memory over with DMA_MAP; it never interprets the device's DMA
    addresses, so the backend translates them.
    """

    socket: Path = Path()
    addr: str = "2.0"
    id: str = "ep0"

    def qemu_args(self) -> list[str]:
        spec = {"driver": "vfio-user-pci", "id": self.id, "addr": self.addr,
                "socket": {"type": "unix", "path": str(self.socket)}}
        return ["-device", json.dumps(spec, separators=(",", ":"))]


@dataclass
class VhostUserBlkPci(Device):
    """QEMU's stock vhost-user-blk-pci, served by the backend (a vSMMU-mode endpoint).

    ``iommu_platform=on`` makes its DMA go through QEMU's IOMMU (the SMMUv3):
    QEMU answers the backend's IOTLB misses with the guest's stage-1
    translation. The device is transitional, and a transitional device refuses
    iommu_platform, hence ``disable-legacy=on``; ``num-queues=1`` matches the
    backend's single request queue.

    ``reconnect_ms`` makes QEMU connect again that often when the backend goes
    away (chardev ``reconnect-ms``): the disk survives a backend restart. Only
    vhost-user-blk-pci takes it: vhost-user-rng-pci and vhost-user-test-device-pci
    fail to realize with it in QEMU 10.2 (docs/ARCHITECTURE.md "Restarting the
    backend").
    """

    socket: Path = Path()
    addr: str = "2.0"
    id: str = "vblk"
    reconnect_ms: int | None = None

    def qemu_args(self) -> list[str]:
        reconnect = f",reconnect-ms={self.reconnect_ms}" if self.reconnect_ms else ""
        return ["-chardev", f"socket,id={self.id},path={self.socket}{reconnect}",
                "-device", f"vhost-user-blk-pci,chardev={self.id},addr={self.addr},"
                "iommu_platform=on,num-queues=1,disable-legacy=on"]


@dataclass
class VhostUserRngPci(Device):
    """QEMU's stock vhost-user-rng-pci, served by the backend, behind QEMU's IOMMU."""

    socket: Path = Path()
    addr: str = "3.0"
    id: str = "vrng"

    def qemu_args(self) -> list[str]:
        return ["-chardev", f"socket,id={self.id},path={self.socket}",
                "-device", f"vhost-user-rng-pci,chardev={self.id},addr={self.addr},"
                "iommu_platform=on"]


@dataclass
class Topology:
    """An Arm virt machine: CPU, memory, guest boot files and PCI devices."""

    kernel: Path
    initrd: Path
    append: str = "console=ttyAMA0 panic=-1 quiet"
    memory_mb: int = 1024
    smp: int = 2
    cpu: str = "max"
    gic_version: int = 3
    devices: list[Device] = field(default_factory=list)
    dtb: Path | None = None
    iommu: str | None = None
    """The virt machine's own IOMMU (``"smmuv3"``: QEMU's SMMUv3 on the PCI bus,
    the guest's stage 1 in vSMMU mode); None for none."""
    extra_args: list[str] = field(default_factory=list)
    """More QEMU options, at the end of the command line."""
    user_qmp: Path | None = None
    """A second QMP monitor on this UNIX socket, for people (``qmp-shell``) while the
    launcher holds the first one (a QEMU QMP socket takes one client at a time)."""

    def machine_option(self, dumpdtb: Path | None = None) -> str:
        """The value of -machine."""
        opt = f"virt,gic-version={self.gic_version},memory-backend=mem"
        if self.iommu is not None:
            opt += f",iommu={self.iommu}"
        if dumpdtb is not None:
            opt += f",dumpdtb={dumpdtb}"
        return opt

    def command_line(self, qemu: Path, qmp_socket: Path | None = None,
                     dumpdtb: Path | None = None) -> list[str]:
        """The full QEMU argv: serial console on stdio, QMP on a UNIX socket.

        Guest RAM is a shared memfd so that out-of-process devices can map it.
        With ``dumpdtb`` QEMU writes its device tree to that file and exits.
        """
        argv = [
            str(qemu),
            "-machine", self.machine_option(dumpdtb),
            "-cpu", self.cpu,
            "-smp", str(self.smp),
            "-m", f"{self.memory_mb}M",
            "-object",
            f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
            "-nodefaults", "-no-user-config", "-nic", "none",
            "-display", "none", "-monitor", "none",
            # signal=off: a Ctrl-C typed on the console reaches the guest, not QEMU.
            "-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0",
            "-no-reboot",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", self.append,
        ]
        if self.dtb is not None and dumpdtb is None:
            argv += ["-dtb", str(self.dtb)]
        if qmp_socket is not None:
            argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
        if self.user_qmp is not None and dumpdtb is None:
            argv += ["-chardev", f"socket,id=userqmp,path={self.user_qmp},server=on,wait=off",
                     "-mon", "chardev=userqmp,mode=control"]
        for dev in self.devices:
            argv += dev.qemu_args()
        return argv + self.extra_args
