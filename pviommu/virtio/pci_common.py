"""The virtio-pci common configuration structure (``virtio_pci_common_cfg``, 64 bytes).

It holds what the virtio-pci transport negotiates with the driver: feature
windows, device status, MSI-X vector numbers and the per-queue registers. A
write of 0 to ``device_status`` resets (through the owner's callback),
FEATURES_OK validates the accepted features, DRIVER_OK starts every enabled
queue on the device. Accesses are only meaningful at a field's offset and
with its width (the 64-bit addresses are two independent 32-bit halves);
anything else reads 0 and is ignored as a write, logged once.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..dma import DMA_ERRORS, DmaSpace
from .device import VirtioDevice
from .features import (
    F_ACCESS_PLATFORM,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    bit,
)
from .queue import MAX_QUEUE_SIZE, SplitQueue, VirtqueueError

log = logging.getLogger(__name__)

COMMON_CFG_SIZE = 64
NO_VECTOR = 0xFFFF
_MASK32 = 0xFFFFFFFF


class Reg(enum.IntEnum):
    """Field offsets (``VIRTIO_PCI_COMMON_*``)."""

    DFSELECT = 0x00
    DF = 0x04
    GFSELECT = 0x08
    GF = 0x0C
    MSIX_CONFIG = 0x10
    NUM_QUEUES = 0x12
    STATUS = 0x14
    CFG_GENERATION = 0x15
    Q_SELECT = 0x16
    Q_SIZE = 0x18
    Q_MSIX = 0x1A
    Q_ENABLE = 0x1C
    Q_NOTIFY_OFF = 0x1E
    Q_DESC_LO = 0x20
    Q_DESC_HI = 0x24
    Q_DRIVER_LO = 0x28
    Q_DRIVER_HI = 0x2C
    Q_DEVICE_LO = 0x30
    Q_DEVICE_HI = 0x34
    Q_NOTIFY_DATA = 0x38
    Q_RESET = 0x3A
    ADMIN_Q_INDEX = 0x3C
    ADMIN_Q_NUM = 0x3E


_WIDTH = {r: 4 if r < Reg.MSIX_CONFIG or Reg.Q_DESC_LO <= r <= Reg.Q_DEVICE_HI
          else 1 if r in (Reg.STATUS, Reg.CFG_GENERATION) else 2 for r in Reg}
_ADDRESS = {Reg.Q_DESC_LO: "desc", Reg.Q_DESC_HI: "desc", Reg.Q_DRIVER_LO: "driver",
            Reg.Q_DRIVER_HI: "driver", Reg.Q_DEVICE_LO: "device", Reg.Q_DEVICE_HI: "device"}


def log_once(seen: set[Hashable], key: Hashable, msg: str, *args: object) -> None:
    """Logs ``msg`` as a warning the first time ``key`` shows up in ``seen``."""
    if key not in seen:
        seen.add(key)
        log.warning(msg, *args)


@dataclass
class QueueRegs:
    """The driver's view of one virtqueue; ``started`` once handed to the device."""

    size: int
    vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    started: bool = False


class CommonConfig:
    """The common configuration registers of one virtio-pci function over ``device``.

    ``bus_master`` says whether the function may do DMA (PCI command MASTER);
    ``on_reset`` performs the whole transport + device reset a status write of
    0 asks for. ``generation`` is ``config_generation``; a reset keeps it.
    """

    def __init__(self, device: VirtioDevice, dma: DmaSpace, num_vectors: int, queue_max: int,
                 bus_master: Callable[[], bool], on_reset: Callable[[], None]) -> None:
        if not 0 < queue_max <= MAX_QUEUE_SIZE or queue_max & (queue_max - 1):
            raise ValueError(f"queue size {queue_max} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        self.device = device
        self.dma = dma
        self.num_vectors = num_vectors
        self.queue_max = queue_max
        self._bus_master = bus_master
        self._on_reset = on_reset
        self.generation = 0
        self._logged: set[Hashable] = set()
        self.reset()

    def reset(self) -> None:
        """Every register back to its reset value (the device's own reset is the owner's)."""
        self.dfselect = 0
        self.gfselect = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.queues = [QueueRegs(self.queue_max) for _ in range(self.device.num_queues)]

    # -- state the function asks about -------------------------------------------------

    @property
    def status(self) -> int:
        """The device status (the device owns it: NEEDS_RESET is its bit)."""
        return self.device.status

    def live(self) -> bool:
        """Whether the driver finished initialisation and has not given up."""
        ready = STATUS_FEATURES_OK | STATUS_DRIVER_OK
        return self.status & ready == ready and not self.status & STATUS_FAILED

    def queue_vector(self, index: int) -> int:
        """The MSI-X vector of queue ``index`` (NO_VECTOR if none or no such queue)."""
        return self.queues[index].vector if 0 <= index < len(self.queues) else NO_VECTOR

    def kickable(self, index: int) -> bool:
        """Whether a driver notification of queue ``index`` should reach the device."""
        return (0 <= index < len(self.queues) and self.queues[index].started and self.live()
                and self._bus_master())

    def start_queues(self) -> None:
        """Hands every enabled, not yet started queue to the device and kicks it once.

        Nothing happens before DRIVER_OK, after FAILED, or without bus mastering.
        A queue whose rings are invalid breaks the device (NEEDS_RESET).
        """
        if not self.live() or not self._bus_master():
            return
        for index, regs in enumerate(self.queues):
            if not regs.enabled or regs.started:
                continue
            try:
                queue = SplitQueue(self.dma, regs.size, regs.desc, regs.driver, regs.device,
                                   event_idx=self.device.has_feature(F_EVENT_IDX),
                                   indirect=self.device.has_feature(F_INDIRECT_DESC))
                self.device.start_queue(index, queue)
            except (VirtqueueError, ValueError, *DMA_ERRORS) as e:
                self.device.fail(index, f"queue cannot start: {e}")
                continue
            regs.started = True
            self.device.kick(index)

    def stop_queues(self) -> None:
        """Takes every started queue away from the device."""
        for index, regs in enumerate(self.queues):
            if regs.started:
                self.device.stop_queue(index)
                regs.started = False

    # -- register access --------------------------------------------------------------------

    def _selected(self) -> QueueRegs | None:
        sel = self.queue_select
        return self.queues[sel] if sel < len(self.queues) else None

    def _field(self, offset: int, size: int, what: str) -> Reg | None:
        try:
            reg = Reg(offset)
        except ValueError:
            reg = None
        if reg is None or _WIDTH[reg] != size:
            log_once(self._logged, (what, offset, size),
                     "virtio-pci: common config %s of %d bytes at %#x is not a field access; "
                     "ignored", what, size, offset)
            return None
        return reg

    def read(self, offset: int, size: int) -> int:
        """The value of the field at ``offset`` (0 for a non-field access)."""
        reg = self._field(offset, size, "read")
        if reg is None:
            return 0
        q = self._selected()
        match reg:
            case Reg.DFSELECT:
                return self.dfselect
            case Reg.DF:
                return self._window(self.device.offered_features(), self.dfselect)
            case Reg.GFSELECT:
                return self.gfselect
            case Reg.GF:
                return self._window(self.driver_features, self.gfselect)
            case Reg.MSIX_CONFIG:
                return self.config_vector
            case Reg.NUM_QUEUES:
                return len(self.queues)
            case Reg.STATUS:
                return self.status
            case Reg.CFG_GENERATION:
                return self.generation
            case Reg.Q_SELECT:
                return self.queue_select
            case Reg.Q_MSIX:
                return q.vector if q else NO_VECTOR
            case Reg.Q_SIZE if q is not None:
                return q.size
            case Reg.Q_ENABLE if q is not None:
                return int(q.enabled)
            case Reg.Q_NOTIFY_OFF if q is not None:
                return self.queue_select
            case Reg.Q_SIZE | Reg.Q_ENABLE | Reg.Q_NOTIFY_OFF:  # no such queue
                return 0
            case _ if reg in _ADDRESS:
                value = getattr(q, _ADDRESS[reg]) if q else 0
                return value >> 32 if reg & 4 else value & _MASK32
        return 0  # queue_notify_data, queue_reset, admin queue fields: nothing offered

    @staticmethod
    def _window(features: int, select: int) -> int:
        return (features >> (32 * select)) & _MASK32 if select < 2 else 0

    def _vector(self, value: int) -> int:
        # A vector the table does not have cannot be mapped: it reads back as NO_VECTOR.
        return value if value < self.num_vectors else NO_VECTOR

    def write(self, offset: int, size: int, value: int) -> None:
        """A driver write of ``value`` to the field at ``offset``."""
        reg = self._field(offset, size, "write")
        if reg is None:
            return
        q = self._selected()
        match reg:
            case Reg.DFSELECT:
                self.dfselect = value
            case Reg.GFSELECT:
                self.gfselect = value
            case Reg.GF:
                self._write_driver_features(value)
            case Reg.MSIX_CONFIG:
                self.config_vector = self._vector(value)
            case Reg.STATUS:
                self._write_status(value)
            case Reg.Q_SELECT:
                self.queue_select = value
            case Reg.Q_MSIX if q is not None:
                q.vector = self._vector(value)
            case Reg.Q_ENABLE if q is not None:
                self._write_enable(q, value)
            case Reg.Q_SIZE if q is not None:
                self._write_size(q, value)
            case Reg.Q_SIZE | Reg.Q_MSIX | Reg.Q_ENABLE:
                log.warning("virtio-pci: %s write to nonexistent queue %d ignored",
                            reg.name, self.queue_select)
            case _ if reg in _ADDRESS:
                self._write_address(q, reg, value)
            case _:
                log.warning("virtio-pci: write %#x to read-only %s ignored", value, reg.name)

    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK:
            log.warning("virtio-pci: driver_feature write after FEATURES_OK ignored")
        elif self.gfselect >= 2:
            log.warning("virtio-pci: driver_feature write to window %d ignored", self.gfselect)
        else:
            shift = 32 * self.gfselect
            self.driver_features = (self.driver_features & ~(_MASK32 << shift)) | (value << shift)

    def _write_size(self, q: QueueRegs, value: int) -> None:
        if q.enabled:
            log.warning("virtio-pci: queue %d: size written while enabled; ignored",
                        self.queue_select)
        elif 0 < value <= self.queue_max and not value & (value - 1):
            q.size = value
        else:
            log.warning("virtio-pci: queue %d: size %d is not a power of 2 in 1..%d; ignored",
                        self.queue_select, value, self.queue_max)

    def _write_address(self, q: QueueRegs | None, reg: Reg, value: int) -> None:
        if q is None or q.enabled:
            log.warning("virtio-pci: %s write to queue %d ignored (nonexistent or enabled)",
                        reg.name, self.queue_select)
            return
        name = _ADDRESS[reg]
        old = getattr(q, name)
        new = (old & _MASK32) | (value << 32) if reg & 4 else (old & ~_MASK32) | value
        setattr(q, name, new)

    def _write_enable(self, q: QueueRegs, value: int) -> None:
        if value != 1:
            log.warning("virtio-pci: driver wrote %d to queue_enable of queue %d; ignored",
                        value, self.queue_select)
            return
        q.enabled = True
        self.start_queues()  # only acts once DRIVER_OK is set

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._on_reset()
            return
        old = self.status
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            problem = self._features_problem()
            if problem is not None:
                log.warning("virtio-pci: %s: refusing FEATURES_OK: %s", self.device.name, problem)
                value &= ~STATUS_FEATURES_OK
        self.device.set_status(value & ~STATUS_NEEDS_RESET)  # the device's bit, not the driver's
        new = self.status
        if new & STATUS_FAILED and not old & STATUS_FAILED:
            log.warning("virtio-pci: %s: driver set FAILED; device stopped", self.device.name)
            self.stop_queues()
        elif new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if not new & STATUS_FEATURES_OK:
                log.warning("virtio-pci: %s: DRIVER_OK without FEATURES_OK; queues not started",
                            self.device.name)
            self.start_queues()

    def _features_problem(self) -> str | None:
        features = self.driver_features
        if not features & bit(F_VERSION_1):
            return "VERSION_1 not accepted"
        if self.device.has_feature_offered(F_ACCESS_PLATFORM) and \
                not features & bit(F_ACCESS_PLATFORM):
            return "ACCESS_PLATFORM offered but not accepted"
        try:
            self.device.set_driver_features(features)
        except ValueError as e:
            return str(e)
        return None
