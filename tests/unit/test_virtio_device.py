"""VirtioDevice's asynchronous requests: tasks, completion, cancellation on reset."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import pytest

from pviommu.dma import Access, PhysicalDma
from pviommu.memory import MemoryAccessError, RegionSpec, RemoteRange
from pviommu.virtio.device import VirtioDevice, resolve_segments, split_pieces
from pviommu.virtio.features import F_ACCESS_PLATFORM, F_VERSION_1, STATUS_NEEDS_RESET, bit
from pviommu.virtio.queue import Chain, SplitQueue
from tests.fakes.virtio_driver import FakeDriver, RecordingTransport, memfd_memory

GPA = 0x40000000
SIZE = 1 << 20


class GatedDevice(VirtioDevice):
    """Each request waits for its own gate, then reports its whole writable part written."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.fail_heads: set[int] = set()

    def gate(self, head: int) -> asyncio.Event:
        return self.gates.setdefault(head, asyncio.Event())

    def process(self, index: int, queue: SplitQueue) -> None:
        self.serve(index, queue, self.handle)

    async def handle(self, queue: SplitQueue, chain: Chain) -> int:
        self.started.append(chain.head)
        await self.gate(chain.head).wait()
        if chain.head in self.fail_heads:
            raise RuntimeError("device bug")
        return chain.writable_len


@pytest.fixture
def memory():
    mem, fd = memfd_memory(SIZE, GPA)
    yield mem
    mem.clear()
    os.close(fd)


@pytest.fixture
def rig(memory):
    driver = FakeDriver(memory, GPA, queue_size=8)
    dev = GatedDevice()
    transport = RecordingTransport()
    dev.transport = transport
    queue = driver.queue(PhysicalDma(memory))
    dev.start_queue(0, queue)
    return dev, driver, queue, transport


async def idle(dev) -> None:
    """Waits for the device's requests, failing instead of hanging."""
    await asyncio.wait_for(dev.wait_idle(), 5)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_defaults_and_access_platform():
    dev = VirtioDevice()
    assert dev.queue_max_size == 256
    assert dev.offered_features() == bit(F_VERSION_1)
    dev.access_platform = True
    assert dev.offered_features() == bit(F_VERSION_1) | bit(F_ACCESS_PLATFORM)


async def test_requests_run_concurrently_and_complete_out_of_order(rig):
    dev, driver, _, transport = rig
    first = driver.add([b"a"], [3])
    second = driver.add([b"b"], [5])
    driver.publish()
    dev.kick(0)
    await settle()
    assert dev.started == [first, second]
    assert dev.in_flight == 2
    assert driver.used() == [] and transport.notified == []
    dev.gate(second).set()
    await settle()
    assert driver.used() == [(second, 5)]
    assert transport.notified == [0]
    dev.gate(first).set()
    await idle(dev)
    assert driver.used() == [(first, 3)]
    assert transport.notified == [0, 0]
    assert dev.in_flight == 0


async def test_reset_cancels_requests_and_leaves_the_ring_alone(rig):
    dev, driver, _, transport = rig
    head = driver.add([b"a"], [3])
    driver.publish()
    dev.kick(0)
    await settle()
    (task,) = dev._tasks[dev.queues[0]]
    used_before = driver.used_idx()
    dev.reset()
    dev.gate(head).set()
    await idle(dev)
    assert task.cancelled()
    assert driver.used_idx() == used_before and driver.used() == []
    assert transport.notified == []


async def test_stop_queue_cancels_its_requests(rig):
    dev, driver, queue, transport = rig
    driver.add([b"a"], [3])
    driver.publish()
    dev.kick(0)
    await settle()
    (task,) = dev._tasks[queue]
    assert dev.stop_queue(0) is queue
    await idle(dev)
    assert task.cancelled()
    assert driver.used() == [] and transport.notified == []


async def test_replacing_a_queue_cancels_the_old_queues_requests(rig, memory):
    dev, driver, queue, transport = rig
    driver.add([b"a"], [3])
    driver.publish()
    dev.kick(0)
    await settle()
    (task,) = dev._tasks[queue]
    dev.start_queue(0, driver.queue(PhysicalDma(memory), next_avail=queue.next_avail))
    await idle(dev)
    assert task.cancelled()
    assert driver.used() == [] and transport.notified == []


async def test_a_late_completion_for_a_stale_queue_is_dropped(rig, memory):
    dev, driver, queue, transport = rig
    head = driver.add([b"a"], [3])
    driver.publish()
    chain = queue.pop()
    assert chain is not None and chain.head == head
    # a request that survives its cancellation still cannot touch the old queue
    dev.reset()
    assert dev.complete(0, queue, chain, 3) is False
    dev.start_queue(0, driver.queue(PhysicalDma(memory)))
    assert dev.complete(0, queue, chain, 3) is False
    assert driver.used_idx() == 0 and transport.notified == []
    assert dev.complete(0, dev.queues[0], chain, 3) is True
    assert driver.used() == [(head, 3)] and transport.notified == [0]


async def test_a_request_ignoring_cancellation_does_not_complete_after_reset(rig):
    dev, driver, queue, transport = rig
    head = driver.add([b"a"], [3])
    driver.publish()
    chain = queue.pop()
    gate = asyncio.Event()

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # carries on anyway
            await gate.wait()
        dev.complete(0, queue, chain, 3)

    task = dev.spawn(0, queue, stubborn())
    await settle()
    dev.reset()
    await settle()
    assert task.done() and not task.cancelled()
    assert driver.used_idx() == 0 and transport.notified == []
    assert head == chain.head


async def test_a_failing_handler_still_completes_its_chain(rig, caplog):
    dev, driver, _, _ = rig
    head = driver.add([b"a"], [3])
    driver.publish()
    dev.fail_heads.add(head)
    dev.gate(head).set()
    with caplog.at_level(logging.ERROR):
        dev.kick(0)
        await idle(dev)
    assert driver.used() == [(head, 0)]
    assert "internal error" in caplog.text and "device bug" in caplog.text
    assert not dev.needs_reset


async def test_a_used_length_beyond_the_writable_part_is_clamped(rig, caplog):
    dev, driver, queue, _ = rig
    head = driver.add([b"a"], [3])
    driver.publish()
    chain = queue.pop()
    with caplog.at_level(logging.ERROR):
        assert dev.complete(0, queue, chain, 100)
    assert driver.used() == [(head, 3)]
    assert "completed with 100 bytes of 3" in caplog.text


async def test_a_broken_device_completes_nothing(rig):
    dev, driver, queue, transport = rig
    driver.add([b"a"], [3])
    driver.publish()
    chain = queue.pop()
    dev.fail(0, "ring corrupt")
    assert dev.complete(0, queue, chain, 3) is False
    assert driver.used_idx() == 0 and transport.notified == []


async def test_an_unreachable_used_ring_breaks_the_device(memory):
    dev = GatedDevice()
    dev.transport = transport = RecordingTransport()
    driver = FakeDriver(memory, GPA + SIZE - 0x1000, queue_size=8, span=0x1000)
    queue = driver.queue(PhysicalDma(memory))
    head = driver.add([b"a"], [3])
    driver.publish()
    dev.start_queue(0, queue)
    chain = queue.pop()
    assert chain is not None and chain.head == head
    queue.used = GPA + SIZE  # as if the used ring were outside guest memory
    assert dev.complete(0, queue, chain, 3) is False
    assert dev.status & STATUS_NEEDS_RESET
    assert transport.errors and "used ring" in transport.errors[0][1]


async def test_at_most_queue_size_requests_are_in_flight(memory):
    dev = GatedDevice()
    dev.transport = RecordingTransport()
    driver = FakeDriver(memory, GPA, queue_size=4)
    queue = driver.queue(PhysicalDma(memory))
    dev.start_queue(0, queue)
    heads = [driver.add([], [1]) for _ in range(4)]
    driver.publish()
    dev.kick(0)
    # a misbehaving driver makes the same heads available again while they are in flight
    for h in heads:
        driver.make_available(h)
    driver.publish()
    dev.kick(0)
    await settle()
    assert dev.in_flight == 4 and queue.next_avail == 4
    for h in heads:
        dev.gate(h).set()
    await idle(dev)
    assert queue.next_avail == 8
    assert driver.used_idx() == 8  # the waiting four ran once the first four completed


def test_spawn_needs_a_running_loop(rig):
    dev, _, queue, _ = rig

    async def nothing() -> None:
        return None

    coro = nothing()
    with pytest.raises(RuntimeError):
        dev.spawn(0, queue, coro)
    assert coro.cr_frame is None  # closed, so no "never awaited" warning


# -- resolving buffers ---------------------------------------------------------------------


def test_resolve_segments_slices_across_buffers(memory):
    dma = PhysicalDma(memory)
    memory.write(GPA, bytes(range(64)))
    segs = [(GPA, 8), (GPA + 100, 0), (GPA + 16, 8), (GPA + 32, 8)]
    pieces = resolve_segments(dma, segs, 5, 8, Access.READ)
    assert [bytes(p) for p in pieces] == [bytes(range(5, 8)), bytes(range(16, 21))]
    assert resolve_segments(dma, segs, 0, 0, Access.READ) == []
    with pytest.raises(ValueError):
        resolve_segments(dma, segs, 20, 5, Access.READ)


def test_resolve_segments_translates_everything_or_raises(memory):
    dma = PhysicalDma(memory)
    segs = [(GPA, 8), (GPA + SIZE - 4, 8)]  # the second runs out of guest memory
    with pytest.raises(MemoryAccessError):
        resolve_segments(dma, segs, 0, 16, Access.WRITE)


def test_split_pieces_cuts_views_and_remote_ranges(memory):
    memory.add_region(RegionSpec(GPA + SIZE, 0x1000, 0, 0), None)
    local = memory.piece(GPA, 10)
    remote = memory.piece(GPA + SIZE, 10)
    assert isinstance(remote, RemoteRange)
    batches = list(split_pieces([local, remote], 4))
    sizes = [[len(p) if isinstance(p, memoryview) else p.length for p in b] for b in batches]
    assert sizes == [[4], [4], [2, 2], [4], [4]]
    assert batches[3][0] == RemoteRange(memory, GPA + SIZE + 2, 4)
    assert list(split_pieces([], 4)) == []
