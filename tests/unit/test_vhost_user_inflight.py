"""In-flight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) through a fake front-end.

A back-end that dies with requests in flight, completed out of order, leaves
them marked in the front-end's region; the next back-end, handed the same region
and the used index as the ring's base (what QEMU does after a reconnect),
submits exactly those again, oldest first, and carries on at the right
available index.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pviommu.dma import PhysicalDma
from pviommu.transport.vhost_user import protocol as p
from pviommu.transport.vhost_user.backend import VhostUserServer
from pviommu.transport.vhost_user.inflight import (
    DESC,
    HEADER,
    InflightRegion,
    create_region,
    queue_region_size,
)
from pviommu.transport.vhost_user.protocol import ProtocolFeature as PF
from pviommu.transport.vhost_user.protocol import Request as R
from pviommu.virtio.device import VirtioDevice
from pviommu.virtio.features import F_VERSION_1, bit
from pviommu.virtio.queue import Chain, SplitQueue
from tests.fakes.vhost_user import FakeFrontend, RingFds
from tests.fakes.virtio_driver import DEFAULT_GPA, DEFAULT_UADDR, FakeDriver, memfd_memory

MEM_SIZE = 1 << 20
QUEUE = 16


class HeldDevice(VirtioDevice):
    """Each request waits until the test releases its tag (the first readable byte);
    it writes the tag back. ``seen``: the tags in the order requests began."""

    device_id = 0x1F
    name = "held"
    resubmittable = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.release: dict[int, asyncio.Event] = {}

    def offered_features(self) -> int:
        return bit(F_VERSION_1)

    def config_bytes(self) -> bytes:
        return bytes(8)

    def process(self, index: int, queue: SplitQueue) -> None:
        self.serve(index, queue, self._request)

    async def _request(self, queue: SplitQueue, chain: Chain) -> int:
        addr, _ = chain.readable[0]
        tag = queue.dma.read(addr, 1)[0]
        self.seen.append(tag)
        await self.release.setdefault(tag, asyncio.Event()).wait()
        queue.dma.write(chain.writable[0][0], bytes([tag]))
        return 1


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[VhostUserServer]:
    srv = VhostUserServer(sock_dir / "held.sock", HeldDevice(), kick_threads=False)
    await srv.start()
    yield srv
    await srv.close()


class Guest:
    """The guest's memory and its driver of the one queue; survives back-ends."""

    def __init__(self) -> None:
        self.memory, self.fd = memfd_memory(MEM_SIZE)
        self.driver = FakeDriver(self.memory, DEFAULT_GPA, QUEUE, span=0x10000)
        self.ring: RingFds | None = None
        self.heads: dict[int, int] = {}  # tag -> head

    async def plug(self, fe: FakeFrontend, region: tuple[int, int, int] | None = None
                   ) -> tuple[int, int, int]:
        """What QEMU's vhost-user-blk does at a start: negotiation, the in-flight
        region (a new one, or the one kept), memory, the ring from the used index."""
        await fe.negotiate()
        if region is None:
            region = await fe.inflight_region(1, QUEUE)
        else:
            assert await fe.set_inflight(region[0], region[1], region[2], 1, QUEUE) == 0
        assert await fe.set_mem_table([(DEFAULT_GPA, MEM_SIZE, DEFAULT_UADDR, 0)],
                                      [self.fd]) == 0
        if self.ring is not None:
            self.ring.close()
        self.ring = await fe.start_vring(0, self.driver, base=self.driver.used_idx())
        return region

    def post(self, tag: int) -> None:
        head = self.driver.add([bytes([tag])], [1])
        self.heads[tag] = head
        self.driver.publish()
        assert self.ring is not None
        self.ring.kick_ring()

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.memory.clear()
        os.close(self.fd)


async def until(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def release(device: HeldDevice, *tags: int) -> None:
    for tag in tags:
        device.release.setdefault(tag, asyncio.Event()).set()


async def test_inflight_shmfd_is_offered_to_a_resubmittable_device_only(
        server: VhostUserServer, sock_dir: Path) -> None:
    fe = await FakeFrontend.connect(server.path)
    try:
        _, protocol = await fe.negotiate()
        assert protocol & (1 << PF.INFLIGHT_SHMFD)
    finally:
        fe.close()
    plain = VirtioDevice()
    assert not plain.resubmittable


async def test_get_inflight_fd_gives_a_sealed_zeroed_region(server: VhostUserServer) -> None:
    fe = await FakeFrontend.connect(server.path)
    try:
        await fe.negotiate()
        reply, fds = await fe.call_fds(R.GET_INFLIGHT_FD, p.INFLIGHT.pack(0, 0, 1, 128))
        size, offset, n, q = p.INFLIGHT.unpack(reply.payload)
        assert (offset, n, q) == (0, 1, 128)
        assert size == queue_region_size(128) >= HEADER.size + 128 * DESC.size
        assert os.fstat(fds[0]).st_size == size
        assert os.pread(fds[0], size, 0) == bytes(size)
        with pytest.raises(OSError):
            os.ftruncate(fds[0], 0)  # sealed: it cannot shrink under a mapping
        os.close(fds[0])
    finally:
        fe.close()


async def test_requests_in_flight_when_the_backend_dies_are_resubmitted_in_order(
        server: VhostUserServer) -> None:
    device = server.device
    assert isinstance(device, HeldDevice)
    guest = Guest()
    fe = await FakeFrontend.connect(server.path)
    region = await guest.plug(fe)
    try:
        for tag in (1, 2, 3, 4):
            guest.post(tag)
        await until(lambda: device.seen == [1, 2, 3, 4])
        release(device, 3)  # completes out of order: only 3 reaches the used ring
        await until(lambda: guest.driver.used_idx() == 1)
        assert guest.driver.used() == [(guest.heads[3], 1)]
        fe.close()  # the back-end "dies": its tasks are cancelled, nothing more completes
        await until(lambda: server.connection is None)

        device.seen.clear()
        device.release.clear()
        fe = await FakeFrontend.connect(server.path)
        await guest.plug(fe, region)  # the same region, the ring from used idx 1
        # 1, 2 and 4 again, in the order they were first taken; 3 is not redone.
        await until(lambda: device.seen == [1, 2, 4])
        guest.post(5)  # and a new request goes on after them, at avail index 4
        await until(lambda: device.seen == [1, 2, 4, 5])
        release(device, 1, 2, 4, 5)
        await until(lambda: guest.driver.used_idx() == 5)
        assert sorted(h for h, _ in guest.driver.used()) == sorted(
            guest.heads[t] for t in (1, 2, 4, 5))
        assert server.connection is not None
        assert server.connection.inflight is not None
        assert server.connection.inflight.queue(0).in_flight() == 0  # type: ignore[union-attr]
    finally:
        fe.close()
        os.close(region[0])
        guest.close()


async def test_a_completion_published_but_not_cleared_is_not_redone() -> None:
    """The back-end died between writing the used index and clearing the mark: the
    used index in guest memory says the last batch is done."""
    fd, size = create_region(1, QUEUE)
    region = InflightRegion(fd, size, 0, 1, QUEUE)
    os.close(fd)
    try:
        q = region.queue(0)
        assert q is not None and q.recover(0) is None  # fresh: version set, nothing to do
        for head in (5, 6, 7):
            q.take(head)
        q.before_used(6)  # ... the used ring now says 1, then the process died
        again = InflightRegion(*_reopen(region), 1, QUEUE)
        q2 = again.queue(0)
        assert q2 is not None and q2.recover(1) == [5, 7]
        assert q2.counter == 3
        again.close()
    finally:
        region.close()


def _reopen(region: InflightRegion) -> tuple[int, int, int]:
    fd = os.memfd_create("copy")
    os.write(fd, bytes(region._view))
    return fd, region.size, 0


async def test_a_bad_region_is_refused(server: VhostUserServer) -> None:
    fe = await FakeFrontend.connect(server.path)
    try:
        await fe.negotiate()
        small, _ = create_region(1, 4)
        unsealed = os.memfd_create("unsealed")
        os.ftruncate(unsealed, queue_region_size(QUEUE))
        for fd, size, n, q in ((small, queue_region_size(4), 1, QUEUE),  # too small
                               (unsealed, queue_region_size(QUEUE), 1, QUEUE),
                               (small, queue_region_size(4), 2, 4),      # 2 queues, 1 ring
                               (small, queue_region_size(4), 1, 3)):     # not a power of 2
            assert await fe.set_inflight(fd, size, 0, n, q) != 0
        assert await fe.ack(R.SET_INFLIGHT_FD, p.INFLIGHT.pack(64, 0, 1, 4)) != 0  # no fd
        os.close(small)
        os.close(unsealed)
        assert server.connection is not None and server.connection.inflight is None
        assert (await fe.call(R.GET_FEATURES)).u64  # still talking
    finally:
        fe.close()


class _Tracker:
    """An in-flight tracker that remembers what the queue told it."""

    def __init__(self, left: list[int] | None) -> None:
        self.left = left
        self.events: list[tuple[str, int]] = []

    def take(self, head: int) -> None:
        self.events.append(("take", head))

    def before_used(self, head: int) -> None:
        self.events.append(("before", head))

    def after_used(self, head: int, used_idx: int) -> None:
        self.events.append(("after", head))

    def recover(self, used_idx: int) -> list[int] | None:
        return self.left


def test_a_queue_pops_the_resubmitted_chains_first_then_goes_on_past_them() -> None:
    memory, fd = memfd_memory(MEM_SIZE)
    try:
        driver = FakeDriver(memory, DEFAULT_GPA, QUEUE, span=0x10000)
        heads = [driver.add([bytes([t])], [1]) for t in range(4)]
        driver.publish()
        # A back-end took all four, completed the second, died with 0, 2, 3 in flight.
        used = driver.queue(PhysicalDma(memory))
        for _ in range(4):
            used.pop()
        used.push(heads[1], 1)
        tracker = _Tracker([heads[3], heads[0], heads[2]])  # oldest first, as recovered
        q = driver.queue(PhysicalDma(memory), next_avail=driver.used_idx())
        q.track_inflight(tracker)
        assert q.has_work()
        first = q.pop()
        assert first is not None and first.head == heads[3]
        q.unpop()  # undone: popped again
        assert [c.head for c in (q.pop(), q.pop(), q.pop()) if c] == [heads[3], heads[0],
                                                                    heads[2]]
        assert q.next_avail == 4 and not q.has_work()
        assert tracker.events == []  # resubmitted chains keep their marks
        new = driver.add([b"n"], [1])
        driver.publish()
        chain = q.pop()
        assert chain is not None and chain.head == new
        q.push(chain, 1)
        assert tracker.events == [("take", new), ("before", new), ("after", new)]
    finally:
        memory.clear()
        os.close(fd)
