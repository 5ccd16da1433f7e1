"""The device-model side of virtio, independent of how the device reaches QEMU.

Devices whose requests wait (file I/O, guest memory only the frontend can
reach) handle each request in its own asyncio task: :meth:`VirtioDevice.serve`
pops the chains and spawns one task per chain, :meth:`VirtioDevice.complete`
returns a chain to the driver. A reset, or stopping or replacing a queue,
cancels that queue's tasks; a completion that still arrives for a queue that
is no longer the device's current one is dropped, so it never touches the old
rings. Requests may complete out of order.

Where a DMA space's translation misses (it is fetched asynchronously, see
:class:`~pviommu.iommu.translation.TranslationMiss`), the code that can wait
awaits the fill and runs the step again: a request task reruns its handler
(handlers resolve every buffer before moving a byte, so a miss has moved
none), a kick that missed on the rings pops again once the fill is done, and a
completion writes the used ring again (a miss there loses nothing). A device
whose :meth:`VirtioDevice.process` completes inline (virtio-iommu) needs a DMA
space that never misses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol

from ..dma import DMA_ERRORS, Access, DmaSpace, PhysicalDma, TranslationMiss, fill, piece_len
from ..memory import GuestMemory, Piece, RemoteRange
from .features import F_ACCESS_PLATFORM, F_VERSION_1, STATUS_NEEDS_RESET, bit
from .queue import Chain, SplitQueue, VirtqueueError, segments

log = logging.getLogger(__name__)


class VirtioTransport(Protocol):
    """What a device asks of its transport."""

    def notify(self, queue: int) -> None:
        """Raises the used-buffer notification (interrupt) of ``queue``."""
        ...

    def device_error(self, queue: int, reason: str) -> None:
        """Tells the driver side that the device needs a reset because of ``queue``."""
        ...


RequestHandler = Callable[[SplitQueue, Chain], Awaitable[int]]
"""Handles one chain of a queue; returns the number of bytes it wrote into the chain."""

MAX_REFILLS = 16
"""How often in a row one access may miss again right after its fill before the
step gives up (a translator that never settles must not spin forever)."""


class _Refills:
    """Counts the fills of one step, to give up on an access that keeps missing."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None
        self.repeats = 0

    def again(self, miss: TranslationMiss) -> bool:
        """Whether ``miss`` may be filled once more."""
        key = (miss.iova, int(miss.access))
        self.repeats = self.repeats + 1 if key == self.last else 0
        self.last = key
        return self.repeats < MAX_REFILLS


class VirtioDevice:
    """Base of a virtio device model: features, config space, queues, reset.

    Subclasses set ``device_id``, ``num_queues``, implement :meth:`config_bytes`,
    :meth:`offered_features` and :meth:`process`, and may override
    :meth:`write_config` and :meth:`on_reset`. A device whose requests wait
    implements :meth:`process` with :meth:`serve`.

    ``queue_max_size`` is the largest queue the transport lets the driver
    configure. ``access_platform`` makes the device offer VIRTIO_F_ACCESS_PLATFORM:
    an endpoint behind an IOMMU, whose every DMA address is translated.
    ``resubmittable``: a request may be done twice (a disk's: it writes the same
    data again), so a vhost-user transport may track the requests in flight
    across a back-end restart (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), resubmitting
    those a dead back-end had taken, whether it finished them or not.
    """

    device_id: int = 0
    num_queues: int = 1
    name: str = "virtio"
    queue_max_size: int = 256
    access_platform: bool = False
    resubmittable: bool = False

    def __init__(self) -> None:
        self.transport: VirtioTransport | None = None
        self.queues: dict[int, SplitQueue] = {}
        self.driver_features = 0
        self.status = 0
        self.broken_reason: str | None = None
        self.on_needs_reset: Callable[[int, str], None] | None = None
        """Called with the queue and the reason when the device enters NEEDS_RESET."""
        self._tasks: dict[SplitQueue, set[asyncio.Task[None]]] = {}
        self._throttled: set[int] = set()
        # A queue whose rings missed: the task filling them kicks it again.
        self._ring_fills: dict[SplitQueue, asyncio.Task[None]] = {}
        self._ring_refills: dict[SplitQueue, _Refills] = {}

    def offered_features(self) -> int:
        """The device's feature bits (transport-independent ones included)."""
        features = bit(F_VERSION_1)
        if self.access_platform:
            features |= bit(F_ACCESS_PLATFORM)
        return features

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
        """Starts processing ``queue`` as queue ``index`` (a queue it replaces is stopped)."""
        if not 0 <= index < self.num_queues:
            raise ValueError(f"{self.name} has no queue {index}")
        old = self.queues.get(index)
        if old is not None and old is not queue:
            self.cancel_requests(old)
            self._throttled.discard(index)
        self.queues[index] = queue

    def stop_queue(self, index: int) -> SplitQueue | None:
        """Stops queue ``index`` and cancels its requests; returns it so the caller can
        read its state."""
        queue = self.queues.pop(index, None)
        self._throttled.discard(index)
        if queue is not None:
            self.cancel_requests(queue)
        return queue

    def kick(self, index: int) -> None:
        """The driver notified queue ``index``: process it, or break on a rule violation."""
        queue = self.queues.get(index)
        if queue is None or self.needs_reset or queue in self._ring_fills:
            return
        try:
            self.process(index, queue)
        except TranslationMiss as miss:
            self._fill_rings(index, queue, miss)
            return
        except (VirtqueueError, *DMA_ERRORS) as e:
            self.fail(index, str(e))
        self._ring_refills.pop(queue, None)

    def _fill_rings(self, index: int, queue: SplitQueue, miss: TranslationMiss) -> None:
        """Fills what a ring access of ``queue`` missed, then kicks it again."""
        refills = self._ring_refills.setdefault(queue, _Refills())
        if not refills.again(miss):
            self.fail(index, f"rings: {miss}, again after {MAX_REFILLS} fills")
            return
        try:
            task = asyncio.get_running_loop().create_task(
                self._kick_after_fill(index, queue, miss), name=f"{self.name}-q{index}-fill")
        except RuntimeError:
            self.fail(index, f"rings: {miss} outside the event loop")
            return
        self._ring_fills[queue] = task

    async def _kick_after_fill(self, index: int, queue: SplitQueue,
                               miss: TranslationMiss) -> None:
        try:
            await fill(queue.dma, miss)
        finally:
            self._ring_fills.pop(queue, None)
        if self.queues.get(index) is queue:
            self.kick(index)

    def process(self, index: int, queue: SplitQueue) -> None:
        """Handles every available chain of ``queue``."""
        raise NotImplementedError

    # -- queues served off the event loop --------------------------------------------------

    thread_queues: frozenset[int] = frozenset()
    """Queues whose kicks a transport may serve on a thread with :meth:`kick_threaded`."""

    def kick_threaded(self, index: int) -> bool:
        """:meth:`kick` on a transport's kick thread, holding the loop's lock
        (:mod:`pviommu.loop_lock`).

        Handles what can be handled without the event loop and returns True, or
        returns False, having changed nothing the loop's :meth:`kick` would not
        redo, when the rest must go to the loop (the transport schedules
        :meth:`kick` there). It must not publish events, start or cancel tasks,
        nor enter NEEDS_RESET: those belong to the loop.
        """
        return False

    # -- asynchronous requests -------------------------------------------------------------

    def serve(self, index: int, queue: SplitQueue, handler: RequestHandler) -> None:
        """Pops the available chains of ``queue`` and handles each in its own task.

        Each chain is completed with the length ``handler`` returns (0 if it
        raises: a request is never left pending). At most ``queue.size``
        requests of a queue are in flight: a driver that makes more chains
        available (only possible by reusing the heads of in-flight ones) waits
        until one completes. Ring errors propagate (see :meth:`kick`).
        """
        while len(self._tasks.get(queue, ())) < queue.size:
            chain = queue.pop()
            if chain is None:
                return
            self.spawn(index, queue, self._run(index, queue, chain, handler))
        log.debug("%s: queue %d: %d requests in flight; the rest waits", self.name, index,
                  queue.size)
        self._throttled.add(index)

    async def _run(self, index: int, queue: SplitQueue, chain: Chain,
                   handler: RequestHandler) -> None:
        written = await self._handle(index, queue, chain, handler)
        refills = _Refills()
        pushed = False
        while True:
            try:
                if not pushed:
                    if not self._push(index, queue, chain, written):
                        return
                    pushed = True
                self._signal(index, queue)
                return
            except TranslationMiss as miss:
                if not refills.again(miss):
                    self.fail(index, f"used ring: {miss}, again after {MAX_REFILLS} fills")
                    return
                await fill(queue.dma, miss)

    async def _handle(self, index: int, queue: SplitQueue, chain: Chain,
                      handler: RequestHandler) -> int:
        """Runs ``handler`` until no translation misses; returns the length it wrote."""
        refills = _Refills()
        while True:
            try:
                return await handler(queue, chain)
            except TranslationMiss as miss:
                if not refills.again(miss):
                    log.error("%s: queue %d: chain %d: %s, again after %d fills; completed "
                              "with 0", self.name, index, chain.head, miss, MAX_REFILLS)
                    return 0
                await fill(queue.dma, miss)
            except Exception:  # a bug of ours must not leave the request pending
                log.exception("%s: queue %d: internal error handling chain %d", self.name,
                              index, chain.head)
                return 0

    def spawn(self, index: int, queue: SplitQueue,
              coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Runs ``coro``, a request of ``queue`` (queue ``index``), as a tracked task.

        Stopping or replacing the queue, or resetting the device, cancels it.
        Needs a running event loop.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            raise
        task = loop.create_task(coro, name=f"{self.name}-q{index}")
        self._tasks.setdefault(queue, set()).add(task)
        task.add_done_callback(lambda t: self._finished(index, queue, t))
        return task

    def _finished(self, index: int, queue: SplitQueue, task: asyncio.Task[None]) -> None:
        tasks = self._tasks.get(queue)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._tasks[queue]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: queue %d: request task failed", self.name, index,
                      exc_info=task.exception())
        if index in self._throttled and self.queues.get(index) is queue:
            self._throttled.discard(index)
            self.kick(index)  # chains left waiting by serve()

    def complete(self, index: int, queue: SplitQueue, chain: Chain, written: int) -> bool:
        """Returns ``chain`` to the driver with ``written`` bytes, then interrupts.

        Only if ``queue`` is still the device's queue ``index`` and the device
        is not broken; otherwise the completion is dropped (the old rings are
        not touched) and False is returned. (For a DMA space that misses, the
        request tasks complete in two restartable steps instead.)
        """
        if not self._push(index, queue, chain, written):
            return False
        self._signal(index, queue)
        return not self.needs_reset

    def _push(self, index: int, queue: SplitQueue, chain: Chain, written: int) -> bool:
        """Puts ``chain`` in the used ring unless the completion is stale or the ring
        faults (NEEDS_RESET); a TranslationMiss propagates with nothing written."""
        if self.queues.get(index) is not queue or self.needs_reset:
            log.debug("%s: queue %d: completion of chain %d dropped (queue reset, stopped "
                      "or replaced)", self.name, index, chain.head)
            return False
        if not 0 <= written <= chain.writable_len:
            log.error("%s: queue %d: chain %d completed with %d bytes of %d writable",
                      self.name, index, chain.head, written, chain.writable_len)
            written = min(max(written, 0), chain.writable_len)
        try:
            queue.push(chain, written)
        except DMA_ERRORS as e:
            self.fail(index, f"used ring: {e}")
            return False
        return True

    def _signal(self, index: int, queue: SplitQueue) -> None:
        """Interrupts for what was pushed on ``queue``, if it is still queue ``index``;
        a TranslationMiss propagates with nothing changed."""
        if self.queues.get(index) is not queue or self.needs_reset:
            return
        try:
            self.interrupt(index)
        except DMA_ERRORS as e:
            self.fail(index, f"used ring: {e}")

    def cancel_requests(self, queue: SplitQueue | None = None) -> None:
        """Cancels the in-flight requests of ``queue`` (default: of every queue)."""
        for q, tasks in list(self._tasks.items()):
            if queue is None or q is queue:
                for task in tasks:
                    task.cancel()
        for q, task in list(self._ring_fills.items()):
            if queue is None or q is queue:
                task.cancel()
                del self._ring_fills[q]
                self._ring_refills.pop(q, None)

    @property
    def in_flight(self) -> int:
        """How many request tasks are running (cancelled ones until they end)."""
        return sum(len(tasks) for tasks in self._tasks.values())

    async def wait_idle(self) -> None:
        """Waits until every request task has ended (including ones started meanwhile)."""
        while self._tasks or self._ring_fills:
            pending = set().union(*self._tasks.values(), self._ring_fills.values())
            await asyncio.wait(pending)
            await asyncio.sleep(0)  # let the tasks' done callbacks run

    def interrupt(self, index: int) -> None:
        """Notifies the driver about used buffers of ``index`` if it wants to be."""
        queue = self.queues.get(index)
        if queue is not None and self.transport is not None and queue.needs_interrupt():
            self.transport.notify(index)

    def fail(self, index: int, reason: str) -> None:
        """Sets NEEDS_RESET: the device stops processing until it is reset.

        ``on_needs_reset`` hears of it once per reset, when the device enters it.
        """
        log.error("%s: queue %d: %s; device needs reset", self.name, index, reason)
        entering = self.broken_reason is None
        self.broken_reason = reason
        self.status |= STATUS_NEEDS_RESET
        if self.transport is not None:
            self.transport.device_error(index, reason)
        if entering and self.on_needs_reset is not None:
            self.on_needs_reset(index, reason)

    def reset(self, system: bool = False) -> None:
        """Back to the initial state: no queues, no negotiated features.

        ``system`` is a reset of the whole machine (the frontend went away),
        which also restores what survives a device reset.
        """
        self.cancel_requests()
        self._throttled.clear()
        self.queues.clear()
        self.driver_features = 0
        self.status = 0
        self.broken_reason = None
        self.on_reset(system)

    def on_reset(self, system: bool = False) -> None:
        """Device-specific part of a reset."""


# -- resolving request buffers --------------------------------------------------------------


def resolve_segments(dma: DmaSpace, segs: list[tuple[int, int]], offset: int, length: int,
                     access: Access) -> list[Piece]:
    """Resolves ``length`` bytes starting ``offset`` bytes into the buffers ``segs``.

    Every buffer is translated before this returns, so a caller that resolves
    all of a request's buffers first touches nothing when one fails
    (:data:`~pviommu.dma.DMA_ERRORS` propagate). ValueError if the range does not
    lie inside ``segs``.
    """
    total = sum(n for _, n in segs)
    if offset < 0 or length < 0 or offset + length > total:
        raise ValueError(f"{length} bytes at {offset} are outside a {total}-byte buffer")
    pieces: list[Piece] = []
    for addr, n in segments(segs, offset, length):
        pieces += dma.resolve(addr, n, access)
    return pieces


def split_pieces(pieces: list[Piece], limit: int) -> Iterator[list[Piece]]:
    """``pieces`` cut into consecutive batches of at most ``limit`` bytes each."""
    batch: list[Piece] = []
    size = 0
    for p in pieces:
        pos, n = 0, piece_len(p)
        while pos < n:
            take = min(n - pos, limit - size)
            if isinstance(p, RemoteRange):
                batch.append(RemoteRange(p.memory, p.gpa + pos, take))
            else:
                batch.append(p[pos:pos + take])
            size += take
            pos += take
            if size == limit:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch
