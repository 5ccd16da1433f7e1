"""virtio-rng (entropy device, id 4): fills the driver's buffers with random bytes.

One request queue, no configuration space. Each chain's device-writable
buffers are resolved in the queue's DMA space (for an endpoint: its PV-IOMMU
domain) and then filled; device-readable descriptors are skipped and never
written. At most :data:`MAX_FILL` bytes are filled per chain (the spec lets the
device use less than the whole buffer); the used length is the number of bytes
written.

virtio-rng has no status byte, so a chain that cannot be filled (a failed
translation, which the DMA space has already reported as a fault, or an
address outside guest memory) is completed with used length 0, as is a chain
without writable bytes: no request is ever left pending.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..dma import DMA_ERRORS, Access, DmaFault, store
from ..virtio.device import VirtioDevice, resolve_segments
from ..virtio.features import F_EVENT_IDX, F_INDIRECT_DESC, bit
from ..virtio.queue import Chain, SplitQueue
from .traced import Traced, TracedRequests

log = logging.getLogger(__name__)

DEVICE_ID = 4
QUEUE_MAX_SIZE = 64
MAX_FILL = 1 << 16

EntropySource = Callable[[int], bytes]


class VirtioRng(TracedRequests, VirtioDevice):
    """A virtio-rng device drawing its bytes from ``source`` (``os.urandom``).

    ``access_platform`` offers VIRTIO_F_ACCESS_PLATFORM (an endpoint behind
    the PV-IOMMU). ``stats`` counts requests, bytes written, faults (failed
    translations), memory errors (addresses outside guest memory) and empty
    requests (nothing to write, or a source that gave nothing).

    Its requests are published as :class:`~pviommu.events.EndpointRequestDone`
    (kind ENTROPY) once :meth:`trace_to` gave it a bus with a listener for them.
    """

    device_id = DEVICE_ID
    num_queues = 1
    name = "virtio-rng"
    queue_max_size = QUEUE_MAX_SIZE

    def __init__(self, *, access_platform: bool = True,
                 source: EntropySource = os.urandom) -> None:
        super().__init__()
        self.access_platform = access_platform
        self.source = source
        self.stats: dict[str, Any] = {"requests": 0, "bytes": 0, "faults": 0,
                                      "memory_errors": 0, "empty": 0}

    def offered_features(self) -> int:
        return super().offered_features() | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX)

    def process(self, index: int, queue: SplitQueue) -> None:
        self.serve(index, queue, self._traced if self.tracing() else self._request)

    async def _traced(self, queue: SplitQueue, chain: Chain) -> int:
        async def run(seen: Traced) -> int:
            seen.kind, seen.length = "ENTROPY", min(chain.writable_len, MAX_FILL)
            written = await self._request(queue, chain)
            seen.status = "OK" if written else "EMPTY"
            return written
        return await self.timed(queue, chain, run)

    async def _request(self, queue: SplitQueue, chain: Chain) -> int:
        """Fills the chain's writable buffers; returns the bytes written."""
        self.stats["requests"] += 1
        want = min(chain.writable_len, MAX_FILL)
        if want == 0:
            log.error("request %d has no writable bytes (%d readable); completed with 0",
                      chain.head, chain.readable_len)
            self.stats["empty"] += 1
            return 0
        data = self.source(want)[:want]
        if not data:
            log.error("request %d: the entropy source gave nothing; completed with 0",
                      chain.head)
            self.stats["empty"] += 1
            return 0
        try:
            pieces = resolve_segments(queue.dma, chain.writable, 0, len(data), Access.WRITE)
            await store(pieces, data)
        except (*DMA_ERRORS, OSError) as e:
            self._dma_error(e, chain)
            return 0
        self.stats["bytes"] += len(data)
        return len(data)

    def _dma_error(self, e: Exception, chain: Chain) -> None:
        if isinstance(e, DmaFault):
            self.stats["faults"] += 1
            log.warning("request %d: %s; completed with 0", chain.head, e)
        else:
            self.stats["memory_errors"] += 1
            log.error("request %d: %s; completed with 0", chain.head, e)

