"""The device-model side of virtio, independent of how the device reaches QEMU."""

from __future__ import annotations

import logging
from typing import Protocol

from ..dma import DMA_ERRORS, DmaSpace, PhysicalDma
from ..memory import GuestMemory
from .features import F_VERSION_1, STATUS_NEEDS_RESET, bit
from .queue import SplitQueue, VirtqueueError

log = logging.getLogger(__name__)


class VirtioTransport(Protocol):
    """What a device asks of its transport."""

    def notify(self, queue: int) -> None:
        """Raises the used-buffer notification (interrupt) of ``queue``."""
        ...

    def device_error(self, queue: int, reason: str) -> None:
        """Tells the driver side that the device needs a reset because of ``queue``."""
        ...


class VirtioDevice:
    """Base of a virtio device model: features, config space, queues, reset.

    Subclasses set ``device_id``, ``num_queues``, implement :meth:`config_bytes`,
    :meth:`offered_features` and :meth:`process`, and may override
    :meth:`write_config` and :meth:`on_reset`.
    """

    device_id: int = 0
    num_queues: int = 1
    name: str = "virtio"

    def __init__(self) -> None:
        self.transport: VirtioTransport | None = None
        self.queues: dict[int, SplitQueue] = {}
        self.driver_features = 0
        self.status = 0
        self.broken_reason: str | None = None

    def offered_features(self) -> int:
        """The device's feature bits (transport-independent ones included)."""
        return bit(F_VERSION_1)

    def config_bytes(self) -> bytes:
        """The device-specific configuration space as the driver reads it."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space at ``offset``; ValueError outside it."""
        cfg = self.config_bytes()
        if offset < 0 or size <= 0 or offset + size > len(cfg):
            raise ValueError(f"config read {offset}+{size} outside {len(cfg)} bytes")
        return cfg[offset:offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver write to config space; ValueError for read-only fields."""
        raise ValueError(f"{self.name}: config offset {offset} is read-only")

    def set_driver_features(self, features: int) -> None:
        """Records the features the driver accepted; ValueError if not offered."""
        extra = features & ~self.offered_features()
        if extra:
            raise ValueError(f"{self.name}: driver accepted features {extra:#x} never offered")
        self.driver_features = features

    def set_status(self, status: int) -> None:
        """The driver writes the device status: NEEDS_RESET stays the device's, except on 0."""
        self.status = status and status | (self.status & STATUS_NEEDS_RESET)

    def has_feature_offered(self, n: int) -> bool:
        """Whether the device offers feature bit ``n``."""
        return bool(self.offered_features() & bit(n))

    def bind_memory(self, memory: GuestMemory) -> DmaSpace:
        """The DMA space the device's rings live in (guest-physical by default)."""
        return PhysicalDma(memory)

    def has_feature(self, n: int) -> bool:
        """Whether feature bit ``n`` was negotiated."""
        return bool(self.driver_features & bit(n))

    @property
    def needs_reset(self) -> bool:
        """Whether the device stopped because the driver broke the rules."""
        return self.broken_reason is not None

    def start_queue(self, index: int, queue: SplitQueue) -> None:
        """Starts processing ``queue`` as queue ``index``."""
        if not 0 <= index < self.num_queues:
            raise ValueError(f"{self.name} has no queue {index}")
        self.queues[index] = queue

    def stop_queue(self, index: int) -> SplitQueue | None:
        """Stops queue ``index``; returns it so the caller can read its state."""
        return self.queues.pop(index, None)

    def kick(self, index: int) -> None:
        """The driver notified queue ``index``: process it, or break on a rule violation."""
        queue = self.queues.get(index)
        if queue is None or self.needs_reset:
            return
        try:
            self.process(index, queue)
        except (VirtqueueError, *DMA_ERRORS) as e:
            self.fail(index, str(e))

    def process(self, index: int, queue: SplitQueue) -> None:
        """Handles every available chain of ``queue``."""
        raise NotImplementedError

    def interrupt(self, index: int) -> None:
        """Notifies the driver about used buffers of ``index`` if it wants to be."""
        queue = self.queues.get(index)
        if queue is not None and self.transport is not None and queue.needs_interrupt():
            self.transport.notify(index)

    def fail(self, index: int, reason: str) -> None:
        """Sets NEEDS_RESET: the device stops processing until it is reset."""
        log.error("%s: queue %d: %s; device needs reset", self.name, index, reason)
        self.broken_reason = reason
        self.status |= STATUS_NEEDS_RESET
        if self.transport is not None:
            self.transport.device_error(index, reason)

    def reset(self, system: bool = False) -> None:
        """Back to the initial state: no queues, no negotiated features.

        ``system`` is a reset of the whole machine (the frontend went away),
        which also restores what survives a device reset.
        """
        self.queues.clear()
        self.driver_features = 0
        self.status = 0
        self.broken_reason = None
        self.on_reset(system)

    def on_reset(self, system: bool = False) -> None:
        """Device-specific part of a reset."""
