"""A fake virtio-pci *driver* for a PCI function, and a loopback device to drive.

:class:`PciDriver` speaks to a :class:`~pviommu.pci.function.PciFunction`
the way a client (QEMU's vfio-user-pci) forwards a Linux guest's accesses:
config-space reads and writes, BAR4 register accesses, MSI-X eventfds.
:meth:`PciDriver.probe` follows Linux's modern virtio-pci probe order up to
(not including) DRIVER_OK; :meth:`PciDriver.setup_queue` is its ``setup_vq``.

:class:`EchoDevice` copies each chain's readable bytes into its writable
buffers; its 4-byte config space is one little-endian u32 the driver may write.
"""

from __future__ import annotations

import os
import struct

from pviommu.pci.function import IrqIndex, PciFunction, RegionIndex
from pviommu.virtio.device import VirtioDevice
from pviommu.virtio.features import (
    F_ACCESS_PLATFORM,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    bit,
)
from pviommu.virtio.pci_common import Reg
from pviommu.virtio.queue import SplitQueue, gather, scatter
from tests.fakes.virtio_driver import FakeDriver

BAR4 = RegionIndex.BAR4
CONFIG = RegionIndex.CONFIG
ISR = 0x1000
DEVICE_CFG = 0x2000
NOTIFY = 0x3000
COMMAND_MEMORY_MASTER = 0x6
ACCESS_PLATFORM = bit(F_ACCESS_PLATFORM)


class EchoDevice(VirtioDevice):
    """One queue; each chain gets its readable bytes copied into its writable ones."""

    device_id = 42
    num_queues = 1
    name = "echo"
    queue_max_size = 16

    def __init__(self, extra_features: int = 0) -> None:
        super().__init__()
        self.extra_features = extra_features
        self.value = 0x11223344
        self.resets = 0

    def offered_features(self) -> int:
        return bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | self.extra_features

    def config_bytes(self) -> bytes:
        return struct.pack("<I", self.value)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 4:
            raise ValueError(f"echo: config write {offset}+{len(data)} is not the u32")
        self.value = struct.unpack("<I", data)[0]

    def process(self, index: int, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            data = gather(queue.dma, chain.readable)[:chain.writable_len]
            scatter(queue.dma, chain.writable, data)
            queue.push(chain, len(data))
        self.interrupt(index)

    def on_reset(self, system: bool = False) -> None:
        self.resets += 1


def eventfd() -> int:
    """A non-blocking eventfd."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def fired(fd: int) -> int:
    """How many times the eventfd was signalled since the last call (its counter)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


class PciDriver:
    """Register-level access to a virtio-pci function, plus Linux's probe steps.

    ``vectors`` are the test's ends of the MSI-X eventfds (the function got dups).
    """

    def __init__(self, function: PciFunction) -> None:
        self.fn = function
        self.vectors: list[int] = []

    def close(self) -> None:
        """Closes the test's eventfd ends."""
        for fd in self.vectors:
            os.close(fd)
        self.vectors = []

    # -- raw accesses ---------------------------------------------------------------------

    def cfg_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.fn.region_read(CONFIG, offset, size), "little")

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.fn.region_write(CONFIG, offset, value.to_bytes(size, "little"))

    def bar_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.fn.region_read(BAR4, offset, size), "little")

    def bar_write(self, offset: int, size: int, value: int) -> None:
        self.fn.region_write(BAR4, offset, value.to_bytes(size, "little"))

    def read(self, reg: Reg, size: int) -> int:
        """A common-config field."""
        return self.bar_read(reg, size)

    def write(self, reg: Reg, size: int, value: int) -> None:
        self.bar_write(reg, size, value)

    @property
    def status(self) -> int:
        return self.read(Reg.STATUS, 1)

    def add_status(self, bits: int) -> int:
        """Read-modify-write of the status, as ``virtio_add_status``; returns the read-back."""
        self.write(Reg.STATUS, 1, self.status | bits)
        return self.status

    def device_features(self) -> int:
        self.write(Reg.DFSELECT, 4, 0)
        low = self.read(Reg.DF, 4)
        self.write(Reg.DFSELECT, 4, 1)
        return low | self.read(Reg.DF, 4) << 32

    def write_features(self, features: int) -> None:
        self.write(Reg.GFSELECT, 4, 0)
        self.write(Reg.GF, 4, features & 0xFFFFFFFF)
        self.write(Reg.GFSELECT, 4, 1)
        self.write(Reg.GF, 4, features >> 32)

    def kick(self, queue: int) -> None:
        """The driver's notification: a 16-bit write of the queue index to its slot."""
        self.write(Reg.Q_SELECT, 2, queue)
        off = self.read(Reg.Q_NOTIFY_OFF, 2)
        self.bar_write(NOTIFY + 4 * off, 2, queue)

    # -- Linux's probe ----------------------------------------------------------------------

    def probe(self, features: int | None = None) -> int:
        """Enable + master, reset, ACK, DRIVER, features, FEATURES_OK, MSI-X eventfds, config
        vector 0. Returns the status read after FEATURES_OK."""
        self.cfg_write(0x04, 2, self.cfg_read(0x04, 2) | COMMAND_MEMORY_MASTER)
        self.write(Reg.STATUS, 1, 0)
        assert self.status == 0
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        offered = self.device_features()
        self.write_features(offered if features is None else features)
        status = self.add_status(STATUS_FEATURES_OK)
        if not status & STATUS_FEATURES_OK:
            return status
        self.assign_vectors(self.fn.irq_count(IrqIndex.MSIX))
        self.write(Reg.MSIX_CONFIG, 2, 0)
        assert self.read(Reg.MSIX_CONFIG, 2) == 0
        return status

    def assign_vectors(self, count: int) -> None:
        """QEMU enabling MSI-X: one eventfd per vector (the function owns a dup of each)."""
        self.close()
        self.vectors = [eventfd() for _ in range(count)]
        self.fn.set_irq_eventfds(IrqIndex.MSIX, 0, [os.dup(fd) for fd in self.vectors])

    def setup_queue(self, index: int, ring: FakeDriver, vector: int) -> None:
        """Linux's ``setup_vq`` for ``ring`` (whose size the device must allow)."""
        assert index < self.read(Reg.NUM_QUEUES, 2)
        self.write(Reg.Q_SELECT, 2, index)
        assert self.read(Reg.Q_SIZE, 2) >= ring.size
        assert self.read(Reg.Q_ENABLE, 2) == 0
        self.write(Reg.Q_SIZE, 2, ring.size)
        for lo, addr in ((Reg.Q_DESC_LO, ring.desc), (Reg.Q_DRIVER_LO, ring.avail),
                         (Reg.Q_DEVICE_LO, ring.used_ring)):
            self.write(lo, 4, addr & 0xFFFFFFFF)
            self.write(Reg(lo + 4), 4, addr >> 32)
        self.write(Reg.Q_MSIX, 2, vector)
        assert self.read(Reg.Q_MSIX, 2) == vector
        assert self.read(Reg.Q_NOTIFY_OFF, 2) == index

    def enable_queue(self, index: int) -> None:
        self.write(Reg.Q_SELECT, 2, index)
        self.write(Reg.Q_ENABLE, 2, 1)

    def driver_ok(self) -> int:
        return self.add_status(STATUS_DRIVER_OK)

