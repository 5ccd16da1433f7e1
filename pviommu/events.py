"""The backend's typed events, and the bus that delivers them to listeners.

Producers (the IOMMU, the virtio-iommu device, revocation, the wiring of the
devices' NEEDS_RESET) publish frozen dataclasses on one :class:`EventBus`.
Each :class:`EventListener` on it hears the event types it asked for, in the
order the listeners were registered. The QMP layer is one listener (it turns
events into the QMP events of docs/QMP.md); whoever else wants to know
registers a listener of its own instead of wrapping someone's callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .iommu.faults import Fault
from .iommu.translation import Revoked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointAttached:
    """The guest attached ``endpoint`` to ``domain``."""

    domain: int
    endpoint: int


@dataclass(frozen=True)
class EndpointDetached:
    """``endpoint`` left ``domain`` (DETACH, a move to another domain, a reset)."""

    domain: int
    endpoint: int


@dataclass(frozen=True)
class FaultRecorded:
    """A fault was reported; ``delivered`` says whether the guest got a record of it."""

    fault: Fault
    delivered: bool


@dataclass(frozen=True)
class MappingRevoked:
    """The host took a mapping away behind the guest's back."""

    revoked: Revoked


@dataclass(frozen=True)
class RevokedMemoryChecked:
    """The sha256 of the memory behind a revoked mapping, at revocation and after the
    request that faulted on it (None when it could not be taken)."""

    revoked: Revoked
    sha256_before: str | None
    sha256_after: str | None


@dataclass(frozen=True)
class DeviceNeedsReset:
    """A device entered NEEDS_RESET because of ``queue``; ``endpoint`` is None for the
    IOMMU itself."""

    kind: str
    queue: int
    reason: str
    endpoint: int | None = None


class EventListener:
    """Hears the events of the given types (every event if none) through ``handler``."""

    def __init__(self, handler: Callable[[Any], None], *types: type) -> None:
        self.handler = handler
        self.types = types

    def accepts(self, event: object) -> bool:
        """Whether this listener wants ``event``."""
        return not self.types or isinstance(event, self.types)


class EventBus:
    """Delivers each published event to every listener that accepts it."""

    def __init__(self) -> None:
        self.listeners: list[EventListener] = []

    def register(self, listener: EventListener) -> EventListener:
        """Adds ``listener`` after the others; returns it (to remove it later)."""
        self.listeners.append(listener)
        return listener

    def listen(self, handler: Callable[[Any], None], *types: type) -> EventListener:
        """Registers a listener that calls ``handler`` for the events of ``types``."""
        return self.register(EventListener(handler, *types))

    def remove(self, listener: EventListener) -> None:
        """Stops delivering to ``listener``."""
        self.listeners.remove(listener)

    def publish(self, event: object) -> None:
        """Delivers ``event`` now. A listener that raises is logged; the others still
        hear the event, and the producer (often a guest's request) goes on."""
        for listener in list(self.listeners):
            if listener.accepts(event):
                try:
                    listener.handler(event)
                except Exception:
                    log.exception("event listener %r failed on %r", listener.handler, event)
