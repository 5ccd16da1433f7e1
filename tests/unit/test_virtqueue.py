"""Split virtqueues, driven by a fake driver in real guest memory."""

from __future__ import annotations

import os
import struct

import pytest

from pviommu.dma import PhysicalDma
from pviommu.memory import MemoryAccessError
from pviommu.virtio.device import VirtioDevice
from pviommu.virtio.features import STATUS_DRIVER_OK, STATUS_NEEDS_RESET
from pviommu.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    SplitQueue,
    VirtqueueError,
    gather,
    scatter,
)
from tests.fakes.virtio_driver import FakeDriver, RecordingTransport, memfd_memory

GPA = 0x40000000
SIZE = 1 << 20
QSIZE = 8


@pytest.fixture
def memory():
    mem, fd = memfd_memory(SIZE, GPA)
    yield mem
    mem.clear()
    os.close(fd)


@pytest.fixture
def driver(memory):
    return FakeDriver(memory, GPA, QSIZE)


@pytest.fixture
def dma(memory):
    return PhysicalDma(memory)


# -- well-formed chains ------------------------------------------------------------------


def test_pop_on_an_empty_ring_returns_none(driver, dma):
    q = driver.queue(dma)
    assert q.pop() is None
    assert not q.has_work()
    driver.add([b"x"], [])  # added but not published
    assert q.pop() is None
    driver.publish()
    assert q.has_work()
    assert q.pop() is not None
    assert q.pop() is None


def test_single_descriptor_chain(driver, dma):
    q = driver.queue(dma)
    head = driver.add([b"hello world"], [])
    driver.publish()
    chain = q.pop()
    assert chain.head == head
    assert len(chain.readable) == 1 and chain.writable == []
    assert chain.readable_len == 11 and chain.writable_len == 0
    assert gather(dma, chain.readable) == b"hello world"
    assert q.next_avail == 1


def test_multi_descriptor_chain_readable_then_writable(driver, dma):
    q = driver.queue(dma)
    head = driver.add([b"abc", b"defgh"], [3, 5])
    driver.publish()
    chain = q.pop()
    assert chain.head == head
    assert [n for _, n in chain.readable] == [3, 5]
    assert [n for _, n in chain.writable] == [3, 5]
    assert gather(dma, chain.readable) == b"abcdefgh"
    assert gather(dma, chain.readable, 2, 3) == b"cde"  # across the descriptor boundary
    scatter(dma, chain.writable, b"12345678")
    q.push(chain, 8)
    assert driver.used() == [(head, 8)]
    assert driver.read_writable(head) == b"12345678"
    with pytest.raises(VirtqueueError):
        gather(dma, chain.readable, 4, 5)
    with pytest.raises(VirtqueueError):
        scatter(dma, chain.writable, b"x" * 9)


def test_several_chains_in_order_and_used_ring_contents(driver, dma, memory):
    q = driver.queue(dma)
    heads = [driver.add([bytes([i])], [2]) for i in range(3)]
    driver.publish()
    chains = [q.pop() for _ in range(3)]
    assert [c.head for c in chains] == heads
    assert [gather(dma, c.readable) for c in chains] == [b"\0", b"\1", b"\2"]
    assert q.pop() is None
    # complete out of order
    q.push(chains[2], 2)
    q.push(chains[0].head, 1)  # push by head index too
    assert driver.used_idx() == 2
    raw = memory.read(driver.used_ring + 4, 16)
    assert struct.unpack("<IIII", raw) == (heads[2], 2, heads[0], 1)
    assert driver.used() == [(heads[2], 2), (heads[0], 1)]
    assert driver.used() == []


def test_indirect_chain_when_negotiated(driver, dma):
    q = driver.queue(dma, indirect=True)
    head = driver.add([b"in-", b"direct"], [4, 4], indirect=True)
    driver.publish()
    chain = q.pop()
    assert chain.head == head
    assert gather(dma, chain.readable) == b"in-direct"
    assert [n for _, n in chain.writable] == [4, 4]
    scatter(dma, chain.writable, b"ABCDEFGH")
    q.push(chain, 8)
    assert driver.used() == [(head, 8)]
    assert driver.read_writable(head) == b"ABCDEFGH"


def test_indirect_chain_without_indirect_negotiated_is_an_error(driver, dma):
    q = driver.queue(dma, indirect=False)
    driver.add([b"x"], [4], indirect=True)
    driver.publish()
    with pytest.raises(VirtqueueError, match="INDIRECT_DESC"):
        q.pop()


def test_indirect_write_flag_on_the_table_descriptor_is_ignored(driver, dma):
    q = driver.queue(dma, indirect=True)
    table = driver.alloc(32)
    buf = driver.buffer(b"data")
    driver.add_raw_descriptors([(buf, 4, DESC_F_NEXT, 1), (buf, 4, DESC_F_WRITE, 0)],
                               table=table)
    driver.add_raw_descriptors([(table, 32, DESC_F_INDIRECT | DESC_F_WRITE, 0)])
    driver.make_available(0)
    driver.publish()
    chain = q.pop()
    assert chain.readable == [(buf, 4)] and chain.writable == [(buf, 4)]


def test_next_avail_wraps_at_65535(memory, dma):
    driver = FakeDriver(memory, GPA, QSIZE)
    driver.set_avail_idx(65534)  # the driver's index starts there (e.g. after migration)
    q = driver.queue(dma, next_avail=65534)
    heads = [driver.add([bytes([i])], [1]) for i in range(4)]
    driver.publish()
    assert driver.read_avail_idx() == 2  # wrapped
    assert q.has_work()
    got = []
    while (chain := q.pop()) is not None:
        got.append(chain.head)
        q.push(chain, 1)
    assert got == heads
    assert q.next_avail == 2
    assert [h for h, _ in driver.used()] == heads


def test_used_idx_wraps_at_65535(memory, dma):
    driver = FakeDriver(memory, GPA, QSIZE)
    memory.write(driver.used_ring + 2, struct.pack("<H", 65535))
    driver.last_used = 65535
    q = driver.queue(dma)
    assert q.used_idx == 65535
    head = driver.add([b"a"], [])
    driver.publish()
    q.push(q.pop(), 0)
    assert driver.used_idx() == 0
    assert driver.used() == [(head, 0)]


def test_next_avail_constructor_value_is_masked(driver, dma):
    assert driver.queue(dma, next_avail=0x10003).next_avail == 3


# -- notifications ----------------------------------------------------------------------


def test_event_idx_pop_on_empty_writes_avail_event(driver, dma):
    q = driver.queue(dma, event_idx=True)
    driver.avail_event = 0xBEEF
    assert q.pop() is None
    assert driver.avail_event == 0
    heads = [driver.add([b"x"], []) for _ in range(3)]
    driver.publish()
    assert [q.pop().head for _ in range(3)] == heads
    assert driver.avail_event == 0  # not touched while there is work
    assert q.pop() is None
    assert driver.avail_event == 3  # re-armed at the next index to process


def test_without_event_idx_avail_event_is_not_written(driver, dma):
    q = driver.queue(dma, event_idx=False)
    driver.avail_event = 0xBEEF
    assert q.pop() is None
    assert driver.avail_event == 0xBEEF


def test_event_idx_needs_interrupt_honours_used_event(driver, dma):
    q = driver.queue(dma, event_idx=True)
    driver.no_interrupt = True  # ignored with EVENT_IDX
    for _ in range(4):
        driver.add([b"x"], [])
    driver.publish()
    chains = [q.pop() for _ in range(4)]
    assert not q.needs_interrupt()  # nothing pushed yet
    driver.used_event = 1  # interrupt when used idx moves past 1, i.e. reaches 2
    q.push(chains[0], 0)  # used idx 1
    assert not q.needs_interrupt()
    q.push(chains[1], 0)  # used idx 2
    assert q.needs_interrupt()
    assert not q.needs_interrupt()  # nothing new since
    driver.used_event = 2
    q.push(chains[2], 0)
    q.push(chains[3], 0)  # 2 -> 4 crosses used_event 2 (3rd entry)
    assert q.needs_interrupt()


def test_event_idx_used_event_behind_means_no_interrupt(driver, dma):
    q = driver.queue(dma, event_idx=True)
    driver.add([b"x"], [])
    driver.add([b"x"], [])
    driver.publish()
    a, b = q.pop(), q.pop()
    q.push(a, 0)
    driver.used_event = 0
    assert q.needs_interrupt()  # 0 -> 1 passes event 0
    driver.used_event = 0  # the driver did not move it: it wants no more interrupts
    q.push(b, 0)
    assert not q.needs_interrupt()


def test_no_interrupt_flag_without_event_idx(driver, dma):
    q = driver.queue(dma)
    for _ in range(2):
        driver.add([b"x"], [])
    driver.publish()
    a, b = q.pop(), q.pop()
    driver.used_event = 5  # ignored without EVENT_IDX
    q.push(a, 0)
    assert q.needs_interrupt()
    driver.no_interrupt = True
    q.push(b, 0)
    assert not q.needs_interrupt()


# -- construction checks ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 6, 12, 65536, 32768 * 2, -8])
def test_queue_size_must_be_a_power_of_two_up_to_32768(dma, size):
    with pytest.raises(VirtqueueError, match="power of 2"):
        SplitQueue(dma, size, GPA, GPA + 0x1000, GPA + 0x2000)


def test_largest_queue_size_is_accepted(dma):
    assert SplitQueue(dma, 32768, GPA, GPA + 0x80000, GPA + 0x90000).size == 32768


@pytest.mark.parametrize(("desc", "avail", "used", "what"), [
    (GPA + 8, GPA + 0x1000, GPA + 0x2000, "descriptor table"),
    (GPA, GPA + 0x1001, GPA + 0x2000, "available ring"),
    (GPA, GPA + 0x1000, GPA + 0x2002, "used ring"),
])
def test_misaligned_rings_are_refused(dma, desc, avail, used, what):
    with pytest.raises(VirtqueueError, match=what):
        SplitQueue(dma, 8, desc, avail, used)


def test_ring_outside_guest_memory_is_a_memory_access_error(dma):
    with pytest.raises(MemoryAccessError):
        SplitQueue(dma, 8, GPA, GPA + 0x1000, GPA + SIZE)


# -- malicious chains -------------------------------------------------------------------


def _post(driver, descs, head=0, first=0):
    driver.add_raw_descriptors(descs, first)
    driver.make_available(head)
    driver.publish()


def test_head_outside_the_queue(driver, dma):
    q = driver.queue(dma)
    _post(driver, [], head=QSIZE)
    with pytest.raises(VirtqueueError, match="head 8"):
        q.pop()


def test_next_outside_the_queue(driver, dma):
    q = driver.queue(dma)
    buf = driver.alloc(16)
    _post(driver, [(buf, 4, DESC_F_NEXT, QSIZE)])
    with pytest.raises(VirtqueueError, match="next descriptor 8"):
        q.pop()


@pytest.mark.parametrize("loop", [[0], [1, 0], [1, 2, 3, 1]])
def test_a_chain_that_loops(driver, dma, loop):
    q = driver.queue(dma)
    buf = driver.alloc(16)
    # descriptor i links to loop[i]
    _post(driver, [(buf, 1, DESC_F_NEXT, nxt) for nxt in loop])
    with pytest.raises(VirtqueueError, match="loop"):
        q.pop()


def test_a_chain_as_long_as_the_table_is_fine(driver, dma):
    q = driver.queue(dma)
    buf = driver.alloc(16)
    descs = [(buf, 1, DESC_F_NEXT, i + 1) for i in range(QSIZE - 1)] + [(buf, 1, 0, 0)]
    _post(driver, descs)
    assert q.pop().readable_len == QSIZE


def test_a_loop_inside_an_indirect_table(driver, dma):
    q = driver.queue(dma, indirect=True)
    buf = driver.alloc(16)
    table = driver.alloc(32)
    driver.add_raw_descriptors([(buf, 1, DESC_F_NEXT, 1), (buf, 1, DESC_F_NEXT, 0)], table=table)
    _post(driver, [(table, 32, DESC_F_INDIRECT, 0)])
    with pytest.raises(VirtqueueError, match="loop"):
        q.pop()


def test_next_outside_an_indirect_table(driver, dma):
    q = driver.queue(dma, indirect=True)
    buf = driver.alloc(16)
    table = driver.alloc(32)
    driver.add_raw_descriptors([(buf, 1, DESC_F_NEXT, 2), (buf, 1, 0, 0)], table=table)
    _post(driver, [(table, 32, DESC_F_INDIRECT, 0)])
    with pytest.raises(VirtqueueError, match="next descriptor 2 outside a table of 2"):
        q.pop()


def test_indirect_inside_indirect(driver, dma):
    q = driver.queue(dma, indirect=True)
    inner = driver.alloc(16)
    driver.add_raw_descriptors([(driver.alloc(4), 4, 0, 0)], table=inner)
    outer = driver.alloc(16)
    driver.add_raw_descriptors([(inner, 16, DESC_F_INDIRECT, 0)], table=outer)
    _post(driver, [(outer, 16, DESC_F_INDIRECT, 0)])
    with pytest.raises(VirtqueueError, match="inside an indirect"):
        q.pop()


def test_indirect_and_next_together(driver, dma):
    q = driver.queue(dma, indirect=True)
    table = driver.alloc(16)
    driver.add_raw_descriptors([(driver.alloc(4), 4, 0, 0)], table=table)
    _post(driver, [(table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1), (driver.alloc(4), 4, 0, 0)])
    with pytest.raises(VirtqueueError, match="both INDIRECT and NEXT"):
        q.pop()


@pytest.mark.parametrize("length", [0, 8, 17, 31])
def test_indirect_table_length_invalid(driver, dma, length):
    q = driver.queue(dma, indirect=True)
    table = driver.alloc(32)
    _post(driver, [(table, length, DESC_F_INDIRECT, 0)])
    with pytest.raises(VirtqueueError, match=f"indirect table length {length} "):
        q.pop()


def test_indirect_after_direct_descriptors(driver, dma):
    q = driver.queue(dma, indirect=True)
    table = driver.alloc(16)
    driver.add_raw_descriptors([(driver.alloc(4), 4, 0, 0)], table=table)
    _post(driver, [(driver.alloc(4), 4, DESC_F_NEXT, 1), (table, 16, DESC_F_INDIRECT, 0)])
    with pytest.raises(VirtqueueError, match="after direct"):
        q.pop()


def test_readable_after_writable(driver, dma):
    q = driver.queue(dma)
    buf = driver.alloc(16)
    _post(driver, [(buf, 4, DESC_F_NEXT, 1), (buf, 4, DESC_F_WRITE | DESC_F_NEXT, 2),
                   (buf, 4, 0, 0)])
    with pytest.raises(VirtqueueError, match="readable descriptor after a device-writable"):
        q.pop()


def test_readable_after_writable_in_an_indirect_table(driver, dma):
    q = driver.queue(dma, indirect=True)
    buf = driver.alloc(16)
    table = driver.alloc(32)
    driver.add_raw_descriptors([(buf, 4, DESC_F_WRITE | DESC_F_NEXT, 1), (buf, 4, 0, 0)],
                               table=table)
    _post(driver, [(table, 32, DESC_F_INDIRECT, 0)])
    with pytest.raises(VirtqueueError, match="readable descriptor after"):
        q.pop()


def test_avail_idx_more_than_size_ahead(driver, dma):
    q = driver.queue(dma)
    driver.set_avail_idx(QSIZE + 1)
    with pytest.raises(VirtqueueError, match="more than the queue size"):
        q.pop()


def test_avail_idx_exactly_size_ahead_is_fine(driver, dma):
    q = driver.queue(dma)
    for _ in range(QSIZE):
        driver.add([b"x"], [])
    driver.publish()
    assert driver.read_avail_idx() == QSIZE
    assert len([q.pop() for _ in range(QSIZE)]) == QSIZE
    assert q.pop() is None


def test_avail_idx_going_backwards_is_an_error(driver, dma):
    q = driver.queue(dma, next_avail=5)
    driver.set_avail_idx(4)  # 65535 entries "ahead"
    with pytest.raises(VirtqueueError, match="65535 entries ahead"):
        q.pop()


def test_chain_total_over_4_gib(driver, dma):
    q = driver.queue(dma)
    _post(driver, [(GPA, 0xFFFFFFFF, DESC_F_NEXT, 1), (GPA, 2, 0, 0)])
    with pytest.raises(VirtqueueError, match="exceeds 4 GiB"):
        q.pop()


def test_chain_total_of_exactly_4_gib_is_allowed(driver, dma):
    q = driver.queue(dma)
    _post(driver, [(GPA, 0xFFFFFFFF, DESC_F_NEXT, 1), (GPA, 1, 0, 0)])
    assert q.pop().readable_len == 1 << 32


def test_indirect_table_outside_guest_memory(driver, dma):
    q = driver.queue(dma, indirect=True)
    _post(driver, [(GPA + SIZE, 32, DESC_F_INDIRECT, 0)])
    with pytest.raises(MemoryAccessError):
        q.pop()


def test_buffer_outside_guest_memory_fails_on_access(driver, dma):
    q = driver.queue(dma)
    _post(driver, [(GPA - 0x1000, 8, DESC_F_NEXT, 1), (GPA + SIZE - 4, 8, DESC_F_WRITE, 0)])
    chain = q.pop()  # addresses are only checked when they are used
    with pytest.raises(MemoryAccessError):
        gather(dma, chain.readable)
    with pytest.raises(MemoryAccessError):
        scatter(dma, chain.writable, b"12345678")


# -- the device side: errors become NEEDS_RESET ------------------------------------------




class EchoDevice(VirtioDevice):
    """Copies each chain's readable bytes into its writable part."""

    num_queues = 1
    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.processed: list[bytes] = []

    def process(self, index: int, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            data = gather(queue.dma, chain.readable)
            self.processed.append(data)
            scatter(queue.dma, chain.writable, data)
            queue.push(chain, len(data))
        self.interrupt(index)


@pytest.fixture
def echo(driver, dma):
    dev = EchoDevice()
    dev.transport = RecordingTransport()
    dev.status = STATUS_DRIVER_OK
    dev.start_queue(0, driver.queue(dma))
    return dev


def test_kick_processes_and_notifies(echo, driver):
    head = driver.add([b"ping"], [4])
    driver.publish()
    echo.kick(0)
    assert driver.used() == [(head, 4)]
    assert driver.read_writable(head) == b"ping"
    assert echo.transport.notified == [0]
    assert not echo.needs_reset and echo.status == STATUS_DRIVER_OK
    echo.kick(0)  # nothing new: no interrupt
    assert echo.transport.notified == [0]
    echo.kick(5)  # no such queue: ignored
    assert echo.transport.errors == []


@pytest.mark.parametrize("breakage", ["head", "loop", "memory", "writable_outside"])
def test_kick_turns_ring_errors_into_needs_reset_and_stops(echo, driver, breakage):
    buf = driver.alloc(16)
    if breakage == "head":
        _post(driver, [], head=QSIZE + 3)
    elif breakage == "loop":
        _post(driver, [(buf, 1, DESC_F_NEXT, 0)])
    elif breakage == "memory":
        _post(driver, [(GPA + SIZE, 4, 0, 0)])
    else:
        _post(driver, [(buf, 4, DESC_F_NEXT, 1), (GPA + SIZE - 2, 4, DESC_F_WRITE, 0)])
    echo.kick(0)
    assert echo.needs_reset
    assert echo.status == STATUS_DRIVER_OK | STATUS_NEEDS_RESET
    assert echo.status & 64
    assert echo.broken_reason
    assert echo.transport.errors == [(0, echo.broken_reason)]
    assert echo.transport.notified == []
    assert driver.used() == []
    # a good chain after the breakage is not processed
    processed = list(echo.processed)
    driver.add([b"later"], [5])
    driver.publish()
    echo.kick(0)
    assert echo.processed == processed
    assert driver.used() == []
    assert len(echo.transport.errors) == 1
    # a reset brings the device back
    echo.reset()
    assert not echo.needs_reset and echo.status == 0 and echo.queues == {}


def test_set_driver_features_refuses_unoffered_bits(echo):
    with pytest.raises(ValueError):
        echo.set_driver_features(1 << 5)
    echo.set_driver_features(1 << 32)
    assert echo.has_feature(32)


def test_start_queue_refuses_unknown_index(echo, driver, dma):
    with pytest.raises(ValueError):
        echo.start_queue(1, driver.queue(dma))
