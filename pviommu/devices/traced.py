"""Endpoint device requests as :class:`~pviommu.events.EndpointRequestDone` events.

A device model whose requests run as tasks (virtio-blk, virtio-rng) mixes in
:class:`TracedRequests`; the backend's wiring calls :meth:`TracedRequests.trace_to`
with its event bus and the device's endpoint ID. A request is timed from its
task's first step to its status: a translation miss reruns the handler after the
fill, and the rerun keeps the first start, so the span covers the IOTLB round
trips. Nothing is timed or built unless a listener wants the events.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from ..events import EndpointRequestDone, EventBus
from ..iommu.translation import TranslationMiss
from ..virtio.queue import Chain, SplitQueue


class Traced:
    """What one traced request turned out to be (the handler fills it in)."""

    __slots__ = ("kind", "length", "sector", "status")

    def __init__(self, kind: str = "", length: int = 0) -> None:
        self.kind = kind
        self.status = "OK"
        self.length = length
        self.sector: int | None = None


class TracedRequests:
    """Mixin: times the requests of a device and publishes them when asked to."""

    name: str
    events: EventBus | None = None
    endpoint: int = -1
    _started: dict[tuple[int, int], tuple[Chain, int]] | None = None

    def trace_to(self, events: EventBus, endpoint: int) -> None:
        """Publishes this device's requests on ``events`` (when wanted) as ``endpoint``."""
        self.events = events
        self.endpoint = endpoint

    def tracing(self) -> bool:
        """Whether a listener wants this device's requests now."""
        return self.events is not None and self.events.wants(EndpointRequestDone)

    async def timed(self, queue: SplitQueue, chain: Chain,
                    run: Callable[[Traced], Awaitable[int]]) -> int:
        """Runs ``run`` (the handler, given the record to fill) and publishes the
        request when it returns; a TranslationMiss leaves its start for the rerun."""
        if self._started is None:
            self._started = {}
        key = (id(queue), chain.head)
        seen = self._started.get(key)
        if seen is None or seen[0] is not chain:  # not a rerun (a head is reused)
            seen = (chain, time.monotonic_ns())
            self._started[key] = seen
        traced = Traced()
        try:
            written = await run(traced)
        except TranslationMiss:
            raise
        except BaseException:
            self._started.pop(key, None)
            raise
        self._started.pop(key, None)
        if self.events is not None:
            self.events.publish(EndpointRequestDone(
                self.endpoint, self.name, traced.kind, traced.status, seen[1],
                time.monotonic_ns(), traced.length, traced.sector))
        return written
