"""The virtio-pci *modern* transport as a PCI function (served over vfio-user).

Layout (the one verified with QEMU 10.2's vfio-user-pci)::

    config space  256 bytes, type 0; pin 0 (no INTx: MSI-X only)
      0x40 MSI-X       table size N = num_queues + 1, table BAR1+0, PBA BAR1+0x800
      0x4C COMMON      BAR4 0x0000, 4 KiB        (virtio_pci_common_cfg)
      0x5C ISR         BAR4 0x1000, 4 KiB
      0x6C DEVICE      BAR4 0x2000, 4 KiB        (the device's config space)
      0x7C NOTIFY      BAR4 0x3000, 4 KiB, multiplier 4: queue q at 0x3000 + 4q
      0x90 PCI_CFG     the config-space window onto BAR4
    BAR1  32-bit memory, 4 KiB: MSI-X table (QEMU emulates it) and PBA (reads 0)
    BAR4  64-bit prefetchable memory, 16 KiB (BAR5 is its upper half)

The client emulates BAR addresses and the MSI-X table; it hands over one
eventfd per MSI-X vector, which this function writes to interrupt the guest.

Choices the spec leaves open:

- Clearing bus mastering (command MASTER) while DRIVER_OK is set resets the
  device, as if the driver had written status 0: the device must not DMA, and
  QEMU's own virtio-pci drops DRIVER_OK there too. Queues start only while
  MASTER is set (they start when it gets set, if DRIVER_OK already is).
- A PCI_CFG window access happens for any config access that overlaps
  ``pci_cfg_data``, only when ``cap.bar`` is 4, ``cap.length`` is 1, 2 or 4,
  ``cap.offset`` is a multiple of it and the access lies in one of the four
  structures; otherwise it does nothing.
- A configuration-change notification is only sent once DRIVER_OK is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Hashable, Iterable

from .. import irqfd
from ..dma import DmaSpace
from ..pci.config import (
    CAP_ID_MSIX,
    CAP_ID_VNDR,
    COMMAND_MASTER,
    CONFIG_SIZE,
    Bar,
    ConfigSpace,
    PciIds,
)
from ..pci.function import (
    NUM_REGIONS,
    IrqIndex,
    PciAccessError,
    RegionIndex,
    RegionInfo,
)
from .device import VirtioDevice
from .features import STATUS_DRIVER_OK
from .pci_common import NO_VECTOR, CommonConfig, log_once

log = logging.getLogger(__name__)

VIRTIO_VENDOR_ID = 0x1AF4
VIRTIO_DEVICE_ID_BASE = 0x1040
VIRTIO_SUBSYSTEM_ID = 0x1100  # QEMU's ID for modern-only virtio devices
REVISION = 1

MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800
MSIX_MAX_VECTORS = MSIX_PBA_OFFSET // 16  # the table (16 bytes a vector) ends at the PBA
MSIX_ENABLE_MASKALL = 0xC000  # message control bits the driver writes

VIRTIO_BAR = 4
VIRTIO_BAR_SIZE = 0x4000
STRUCT_SIZE = 0x1000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4

CFG_COMMON = 1
CFG_NOTIFY = 2
CFG_ISR = 3
CFG_DEVICE = 4
CFG_PCI = 5

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# Byte offsets inside a virtio capability (VIRTIO_PCI_CAP_*) and of pci_cfg_data.
CAP_BAR = 4
CAP_OFFSET = 8
CAP_LENGTH = 12
CAP_PCI_CFG_DATA = 16

# class code (class, subclass, prog-if) by virtio device ID, as QEMU presents them
PCI_CLASS_BY_VIRTIO_ID = {2: 0x010000, 4: 0x00FF00}  # blk: storage/SCSI, rng: "other"
PCI_CLASS_OTHER = 0x00FF00

_VIRTIO_CAP = struct.Struct("<BBBBxxII")  # cap_len, cfg_type, bar, id, offset, length
_STRUCTS = ((CFG_COMMON, COMMON_OFFSET), (CFG_ISR, ISR_OFFSET), (CFG_DEVICE, DEVICE_OFFSET),
            (CFG_NOTIFY, NOTIFY_OFFSET))
_ACCESS_SIZES = (1, 2, 4, 8)


class VirtioPciFunction:
    """A modern virtio-pci function exposing ``device``, whose DMA goes through ``dma``.

    Implements :class:`~pviommu.pci.function.PciFunction` for the transport and
    :class:`~pviommu.virtio.device.VirtioTransport` for the device (it becomes
    ``device.transport``). ``class_code`` defaults to QEMU's class for the
    device type.
    """

    def __init__(self, device: VirtioDevice, dma: DmaSpace, class_code: int | None = None
                 ) -> None:
        self.device = device
        self.num_vectors = device.num_queues + 1
        if not 1 <= device.num_queues < MSIX_MAX_VECTORS:
            raise ValueError(f"{device.name}: {device.num_queues} queues do not fit the layout")
        if class_code is None:
            class_code = PCI_CLASS_BY_VIRTIO_ID.get(device.device_id, PCI_CLASS_OTHER)
        ids = PciIds(vendor=VIRTIO_VENDOR_ID, device=VIRTIO_DEVICE_ID_BASE + device.device_id,
                     revision=REVISION, class_code=class_code,
                     subsystem_vendor=VIRTIO_VENDOR_ID, subsystem_id=VIRTIO_SUBSYSTEM_ID)
        self.config = ConfigSpace(ids, [Bar(MSIX_BAR, MSIX_BAR_SIZE),
                                        Bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, mem64=True,
                                            prefetchable=True)])
        self._add_capabilities()
        self.common = CommonConfig(device, dma, self.num_vectors, device.queue_max_size,
                                   bus_master=self._bus_master, on_reset=self._virtio_reset)
        self.isr = 0
        self._vectors: list[int | None] = [None] * self.num_vectors
        self._logged: set[Hashable] = set()
        device.transport = self

    def _add_capabilities(self) -> None:
        cfg = self.config
        table, pba = MSIX_BAR, MSIX_PBA_OFFSET | MSIX_BAR
        cfg.add_capability(CAP_ID_MSIX, struct.pack("<HII", self.num_vectors - 1, table, pba),
                           struct.pack("<HII", MSIX_ENABLE_MASKALL, 0, 0))
        for cfg_type, offset in _STRUCTS:
            extra = struct.pack("<I", NOTIFY_MULTIPLIER) if cfg_type == CFG_NOTIFY else b""
            cap_len = 2 + _VIRTIO_CAP.size + len(extra)
            cfg.add_capability(CAP_ID_VNDR, _VIRTIO_CAP.pack(cap_len, cfg_type, VIRTIO_BAR, 0,
                                                             offset, STRUCT_SIZE) + extra)
        # PCI_CFG: bar, offset, length and pci_cfg_data are the driver's.
        body = _VIRTIO_CAP.pack(2 + _VIRTIO_CAP.size + 4, CFG_PCI, 0, 0, 0, 0) + bytes(4)
        writable = _VIRTIO_CAP.pack(0, 0, 0xFF, 0, 0xFFFFFFFF, 0xFFFFFFFF) + b"\xff" * 4
        self._cfg_cap = cfg.add_capability(CAP_ID_VNDR, body, writable)

    # -- PciFunction: regions --------------------------------------------------------------

    def _region_size(self, index: int) -> int:
        if index == RegionIndex.CONFIG:
            return CONFIG_SIZE
        return self.config.bar_size(index) if 0 <= index <= RegionIndex.BAR5 else 0

    def regions(self) -> list[RegionInfo]:
        """Regions 0..8: BAR1, BAR4 and config space exist, the rest has size 0."""
        infos = []
        for index in range(NUM_REGIONS):
            size = self._region_size(index)
            infos.append(RegionInfo(index, size, readable=size > 0, writable=size > 0,
                                    memory=index != RegionIndex.CONFIG))
        return infos

    def _check(self, index: int, offset: int, size: int, whole: bool = False) -> None:
        region_size = self._region_size(index)
        if region_size == 0:
            raise PciAccessError(f"region {index} does not exist")
        if size not in _ACCESS_SIZES and not (whole and offset == 0 and size == region_size):
            raise PciAccessError(f"region {index}: access size {size} not supported")
        if offset < 0 or offset + size > region_size:
            raise PciAccessError(f"region {index}: access {offset:#x}+{size} outside "
                                 f"{region_size:#x} bytes")

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """``size`` bytes of region ``index`` at ``offset`` (config also as a whole)."""
        self._check(index, offset, size, whole=index == RegionIndex.CONFIG)
        if index == RegionIndex.CONFIG:
            if self._covers_cfg_data(offset, size):
                self._window_read()
            return self.config.read(offset, size)
        if size == 8:
            return self._bar_read(index, offset, 4) + self._bar_read(index, offset + 4, 4)
        return self._bar_read(index, offset, size)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Writes ``data`` to region ``index`` at ``offset``."""
        self._check(index, offset, len(data))
        if index == RegionIndex.CONFIG:
            self._config_write(offset, bytes(data))
        elif len(data) == 8:
            self._bar_write(index, offset, bytes(data[:4]))
            self._bar_write(index, offset + 4, bytes(data[4:]))
        else:
            self._bar_write(index, offset, bytes(data))

    # -- config space ---------------------------------------------------------------------

    def _bus_master(self) -> bool:
        return bool(self.config.command & COMMAND_MASTER)

    def _config_write(self, offset: int, data: bytes) -> None:
        was_master = self._bus_master()
        self.config.write(offset, data)
        if self._covers_cfg_data(offset, len(data)):
            self._window_write()
        if was_master and not self._bus_master() and self.common.status & STATUS_DRIVER_OK:
            log.warning("virtio-pci: %s: bus mastering turned off while running; device reset",
                        self.device.name)
            self._virtio_reset()
        elif not was_master and self._bus_master():
            self.common.start_queues()

    def _covers_cfg_data(self, offset: int, size: int) -> bool:
        data = self._cfg_cap + CAP_PCI_CFG_DATA
        return offset < data + 4 and data < offset + size

    def _window(self) -> tuple[int, int] | None:
        """The BAR4 (offset, length) the PCI_CFG window designates, if it is a valid one."""
        cap = self._cfg_cap
        bar = self.config.u8(cap + CAP_BAR)
        offset = self.config.u32(cap + CAP_OFFSET)
        length = self.config.u32(cap + CAP_LENGTH)
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or offset % length:
            log.debug("virtio-pci: PCI_CFG window bar %d offset %#x length %d: no access",
                      bar, offset, length)
            return None
        for _, start in _STRUCTS:
            if start <= offset and offset + length <= start + STRUCT_SIZE:
                return offset, length
        return None

    def _window_read(self) -> None:
        window = self._window()
        if window is not None:
            offset, length = window
            self.config.store(self._cfg_cap + CAP_PCI_CFG_DATA,
                              self._bar_read(VIRTIO_BAR, offset, length))

    def _window_write(self) -> None:
        window = self._window()
        if window is not None:
            offset, length = window
            self._bar_write(VIRTIO_BAR, offset,
                            self.config.read(self._cfg_cap + CAP_PCI_CFG_DATA, length))

    # -- BARs -----------------------------------------------------------------------------

    def _bar_read(self, index: int, offset: int, size: int) -> bytes:
        """A BAR read of 1, 2 or 4 bytes."""
        if index != VIRTIO_BAR:
            return bytes(size)  # MSI-X: the client owns the table; the PBA stays clear
        area, rel = offset & ~(STRUCT_SIZE - 1), offset & (STRUCT_SIZE - 1)
        if rel + size > STRUCT_SIZE:
            log_once(self._logged, ("read", offset, size),
                     "virtio-pci: BAR4 read %#x+%d straddles two structures; reads 0", offset,
                     size)
            return bytes(size)
        if area == COMMON_OFFSET:
            return self.common.read(rel, size).to_bytes(size, "little")
        if area == ISR_OFFSET:
            isr, self.isr = self.isr, 0
            return isr.to_bytes(size, "little")
        if area == DEVICE_OFFSET:
            return self._device_config_read(rel, size)
        return bytes(size)  # notify area

    def _bar_write(self, index: int, offset: int, data: bytes) -> None:
        """A BAR write of 1, 2 or 4 bytes."""
        size = len(data)
        if index != VIRTIO_BAR:
            log.debug("virtio-pci: BAR%d write %#x+%d ignored", index, offset, size)
            return
        area, rel = offset & ~(STRUCT_SIZE - 1), offset & (STRUCT_SIZE - 1)
        if rel + size > STRUCT_SIZE:
            log_once(self._logged, ("write", offset, size),
                     "virtio-pci: BAR4 write %#x+%d straddles two structures; ignored", offset,
                     size)
        elif area == COMMON_OFFSET:
            self.common.write(rel, size, int.from_bytes(data, "little"))
        elif area == ISR_OFFSET:
            log.debug("virtio-pci: ISR write ignored")
        elif area == DEVICE_OFFSET:
            try:
                self.device.write_config(rel, data)
            except ValueError as e:
                log.warning("virtio-pci: %s: config write %#x+%d refused: %s", self.device.name,
                            rel, size, e)
        else:
            self._notify_write(rel, size)

    def _device_config_read(self, offset: int, size: int) -> bytes:
        # Past the end of the device's config (inside the 4 KiB window) reads as zeros.
        try:
            available = min(size, len(self.device.config_bytes()) - offset)
            data = self.device.read_config(offset, available) if available > 0 else b""
        except ValueError as e:
            log.warning("virtio-pci: %s: config read %#x+%d refused: %s", self.device.name,
                        offset, size, e)
            data = b""
        return bytes(data[:size]).ljust(size, b"\0")

    def _notify_write(self, offset: int, size: int) -> None:
        if offset % NOTIFY_MULTIPLIER or size not in (2, 4):
            log_once(self._logged, ("notify", offset, size),
                     "virtio-pci: notify write of %d bytes at %#x is no queue's; ignored",
                     size, offset)
            return
        queue = offset // NOTIFY_MULTIPLIER
        if not self.common.kickable(queue):
            log.debug("virtio-pci: kick of queue %d ignored (not running)", queue)
            return
        self.device.kick(queue)

    # -- interrupts -----------------------------------------------------------------------

    def irq_count(self, index: int) -> int:
        """MSI-X: one vector per queue plus the config vector; nothing else."""
        return self.num_vectors if index == IrqIndex.MSIX else 0

    def set_irq_eventfds(self, index: int, start: int, fds: list[int | None]) -> None:
        """MSI-X vectors ``start..`` signal these eventfds (None de-assigns).

        The function owns the fds from now on, even when it refuses them; each
        is made non-blocking (:func:`pviommu.irqfd.adopt`).
        """
        if index != IrqIndex.MSIX or start < 0 or start + len(fds) > self.num_vectors:
            _close(fd for fd in fds if fd is not None)
            raise ValueError(f"no interrupts {start}..{start + len(fds) - 1} of kind {index} "
                             f"(MSI-X has {self.num_vectors})")
        try:
            for fd in fds:
                if fd is not None:
                    irqfd.adopt(fd)
        except OSError as e:
            _close(fd for fd in fds if fd is not None)
            raise ValueError(f"an MSI-X eventfd is unusable: {e}") from e
        old = set(self._vectors)
        self._vectors[start:start + len(fds)] = fds
        _close(fd for fd in old - set(self._vectors) if fd is not None)

    def disable_irqs(self, index: int) -> None:
        """Closes every eventfd of ``index`` (only MSI-X has any)."""
        IrqIndex(index)  # ValueError for an unknown kind
        if index == IrqIndex.MSIX:
            _close({fd for fd in self._vectors if fd is not None})
            self._vectors = [None] * self.num_vectors

    def _signal(self, vector: int) -> None:
        if vector == NO_VECTOR:
            return  # unmapped: the spec forbids an interrupt
        fd = self._vectors[vector]
        if fd is None:
            log.debug("virtio-pci: MSI-X vector %d has no eventfd", vector)
            return
        irqfd.signal(fd, f"virtio-pci: {self.device.name}: MSI-X vector {vector}")

    # -- VirtioTransport --------------------------------------------------------------------

    def notify(self, queue: int) -> None:
        """The used-buffer notification of ``queue``: its vector, if mapped."""
        self.isr |= ISR_QUEUE
        self._signal(self.common.queue_vector(queue))

    def device_error(self, queue: int, reason: str) -> None:
        """The device set NEEDS_RESET: a configuration-change notification."""
        self._config_notification()

    def config_changed(self) -> None:
        """The device's configuration changed: new generation, config notification."""
        self.common.generation = (self.common.generation + 1) & 0xFF
        self._config_notification()

    def _config_notification(self) -> None:
        if self.common.status & STATUS_DRIVER_OK:
            self.isr |= ISR_CONFIG
            self._signal(self.common.config_vector)

    # -- resets -----------------------------------------------------------------------------

    def _virtio_reset(self, system: bool = False) -> None:
        """The virtio reset (status 0): device and transport registers, not PCI config."""
        self.device.reset(system)
        self.common.reset()
        self.isr = 0

    def reset(self, system: bool = False) -> None:
        """Function-level reset: virtio reset, PCI registers, MSI-X eventfds dropped.

        The client re-sends the eventfds once the guest enables MSI-X again; DMA
        mappings are not the function's. ``system`` also resets what a device
        keeps across a device reset.
        """
        self._virtio_reset(system)
        self.config.reset()
        self.disable_irqs(IrqIndex.MSIX)

    def disconnect(self) -> None:
        """The client went away: a system reset, every eventfd closed."""
        self.reset(system=True)


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
