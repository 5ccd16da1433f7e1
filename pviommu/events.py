"""The backend's typed events, and the bus that delivers them to listeners.

Producers (the IOMMU, the virtio-iommu device, revocation, the wiring of the
devices' NEEDS_RESET, and for tracing the endpoint devices and the vSMMU
endpoints' IOTLBs) publish frozen dataclasses on one :class:`EventBus`.
Each :class:`EventListener` on it hears the event types it asked for, in the
order the listeners were registered. The QMP layer is one listener (it turns
events into the QMP events of docs/QMP.md); whoever else wants to know
registers a listener of its own instead of wrapping someone's callback.

The request-level events (:class:`IommuRequestDone`, :class:`EndpointRequestDone`,
:class:`IotlbMissDone`, :class:`IotlbMessage`) are on the hot path: their
producers build them only when :meth:`EventBus.wants` says a listener asked for
them (the trace of docs/TRACING.md does). Their times are ``time.monotonic_ns()``.
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


@dataclass(frozen=True, slots=True)
class IommuRequestDone:
    """One virtio-iommu request, from being taken off the request queue to its completion.

    ``kind`` is ATTACH, DETACH, MAP, UNMAP or PROBE (UNREADABLE for a request whose
    head could not be read); the fields its body has are set, the others None.
    ``mappings`` is the number of mappings in use once it completed.
    """

    kind: str
    status: str
    start_ns: int
    end_ns: int
    domain: int | None = None
    endpoint: int | None = None
    virt_start: int | None = None
    virt_end: int | None = None
    phys_start: int | None = None
    flags: int | None = None
    mappings: int = 0


@dataclass(frozen=True, slots=True)
class EndpointRequestDone:
    """One request of an endpoint device, from its task's first step to its status.

    ``device`` is the device model's name (virtio-blk, virtio-rng); ``kind`` the
    request type (IN, OUT, FLUSH, GET_ID, TYPE_n; ENTROPY for virtio-rng);
    ``length`` the data bytes it asked to move; ``status`` OK, IOERR or UNSUPP
    (virtio-rng: OK, or EMPTY for a chain filled with nothing). A request that
    missed in the IOTLB spans its fills too.
    """

    endpoint: int
    device: str
    kind: str
    status: str
    start_ns: int
    end_ns: int
    length: int
    sector: int | None = None


@dataclass(frozen=True, slots=True)
class IotlbMissDone:
    """One IOTLB MISS round trip of a vSMMU endpoint to QEMU.

    ``result``: ok (an UPDATE granted it), refused (a guest stage-1 fault), timeout,
    unavailable (no channel, channel broken), unanswered (acked without the UPDATE)
    or cancelled.
    """

    endpoint: int
    iova: int
    access: str
    result: str
    start_ns: int
    end_ns: int


@dataclass(frozen=True, slots=True)
class IotlbMessage:
    """An IOTLB UPDATE or INVALIDATE that QEMU sent a vSMMU endpoint (``size`` 0:
    everything); ``gpa`` is where an UPDATE points in guest RAM."""

    endpoint: int
    kind: str
    iova: int
    size: int
    at_ns: int
    gpa: int | None = None


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
        self._wanted: dict[type, bool] = {}

    def register(self, listener: EventListener) -> EventListener:
        """Adds ``listener`` after the others; returns it (to remove it later)."""
        self.listeners.append(listener)
        self._wanted.clear()
        return listener

    def listen(self, handler: Callable[[Any], None], *types: type) -> EventListener:
        """Registers a listener that calls ``handler`` for the events of ``types``."""
        return self.register(EventListener(handler, *types))

    def remove(self, listener: EventListener) -> None:
        """Stops delivering to ``listener``."""
        self.listeners.remove(listener)
        self._wanted.clear()

    def wants(self, event_type: type) -> bool:
        """Whether any listener would hear an event of ``event_type``: a producer on a
        hot path builds and publishes the event only then. One dictionary lookup,
        the answer cached until a listener is registered or removed."""
        try:
            return self._wanted[event_type]
        except KeyError:
            wanted = any(not listener.types or issubclass(event_type, listener.types)
                         for listener in self.listeners)
            self._wanted[event_type] = wanted
            return wanted

    def publish(self, event: object) -> None:
        """Delivers ``event`` now. A listener that raises is logged; the others still
        hear the event, and the producer (often a guest's request) goes on."""
        for listener in list(self.listeners):
            if listener.accepts(event):
                try:
                    listener.handler(event)
                except Exception:
                    log.exception("event listener %r failed on %r", listener.handler, event)
