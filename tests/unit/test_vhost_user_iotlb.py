"""vhost-user with VIRTIO_F_ACCESS_PLATFORM: back-end channel and device IOTLB.

The fake front-end plays QEMU's vIOMMU side as QEMU 10.2 does it: a MISS on
the back-end channel is answered with an UPDATE on the main socket, acked
there, and only then is the MISS acked (1 when the guest's stage 1 has no
mapping); guest unmaps arrive as INVALIDATE, lazy mode's as size 0.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pviommu.devices.rng import VirtioRng
from pviommu.dma import Access, PhysicalDma
from pviommu.memory import GuestMemory
from pviommu.transport.vhost_user import protocol as p
from pviommu.transport.vhost_user.backend import VhostUserConnection, VhostUserServer
from pviommu.transport.vhost_user.iotlb import (
    IotlbMissRefused,
    IotlbProtocolError,
    IotlbTimeout,
    IotlbUnavailable,
)
from pviommu.transport.vhost_user.protocol import IotlbMsg, IotlbPerm, IotlbType
from pviommu.transport.vhost_user.protocol import ProtocolFeature as PF
from pviommu.transport.vhost_user.protocol import Request as R
from pviommu.virtio.features import F_ACCESS_PLATFORM
from tests.fakes.vhost_user import FakeBackendChannel, FakeFrontend, Stage1
from tests.fakes.virtio_driver import DEFAULT_GPA, DEFAULT_UADDR, FakeDriver, memfd_memory

MEM_SIZE = 1 << 20
MISS_TIMEOUT = 0.3
IOVA = 0x8000_0000
PAGE = 0x1000


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[VhostUserServer]:
    srv = VhostUserServer(sock_dir / "rng.sock", VirtioRng(access_platform=True),
                          iotlb_miss_timeout=MISS_TIMEOUT)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
def guest() -> Iterator[tuple[GuestMemory, int]]:
    """The guest's RAM as the test sees it, and its memfd."""
    memory, fd = memfd_memory(MEM_SIZE)
    yield memory, fd
    memory.clear()
    os.close(fd)


@pytest.fixture
def memfd(guest: tuple[GuestMemory, int]) -> int:
    return guest[1]


class Qemu:
    """The fake front-end, plugged as QEMU plugs an iommu_platform=on device."""

    def __init__(self, fe: FakeFrontend, channel: FakeBackendChannel,
                 conn: VhostUserConnection) -> None:
        self.fe = fe
        self.channel = channel
        self.conn = conn
        self.stage1 = Stage1()

    def map(self, iova: int, offset: int) -> None:
        """The guest maps ``iova`` to guest RAM at DEFAULT_GPA + offset."""
        self.stage1.pages[iova] = DEFAULT_UADDR + offset

    def serve(self) -> None:
        self.channel.serve(self.stage1.on_miss(self.fe))


@pytest.fixture
async def qemu(server: VhostUserServer, memfd: int) -> AsyncIterator[Qemu]:
    fe = await FakeFrontend.connect(server.path)
    await fe.negotiate()
    channel = await fe.set_backend_channel()
    assert await fe.set_mem_table([(DEFAULT_GPA, MEM_SIZE, DEFAULT_UADDR, 0)], [memfd]) == 0
    assert server.connection is not None
    q = Qemu(fe, channel, server.connection)
    yield q
    q.channel.close()
    fe.close()


async def alive(fe: FakeFrontend) -> None:
    assert (await fe.call(R.GET_QUEUE_NUM)).u64 == 1


# -- negotiation ------------------------------------------------------------------------------


async def test_negotiation_offers_access_platform_and_backend_req(
        server: VhostUserServer, memfd: int) -> None:
    fe = await FakeFrontend.connect(server.path)
    try:
        offered, protocol = await fe.negotiate()
        assert offered & (1 << F_ACCESS_PLATFORM)
        assert protocol & (1 << PF.BACKEND_REQ)
        assert protocol & (1 << PF.REPLY_ACK)
        await alive(fe)  # SET_FEATURES has no reply
        conn = server.connection
        assert conn is not None and conn.access_platform
        assert conn.iotlb.channel is None
        channel = await fe.set_backend_channel()
        assert conn.iotlb.channel is not None
        channel.close()
    finally:
        fe.close()


async def test_a_device_without_access_platform_offers_no_backend_channel(
        sock_dir: Path) -> None:
    srv = VhostUserServer(sock_dir / "plain.sock", VirtioRng(access_platform=False))
    await srv.start()
    fe = await FakeFrontend.connect(srv.path)
    try:
        offered, protocol = await fe.negotiate()
        assert not offered & (1 << F_ACCESS_PLATFORM)
        assert not protocol & (1 << PF.BACKEND_REQ)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            assert await fe.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) != 0
        assert await fe.update(IOVA, PAGE, DEFAULT_UADDR) != 0  # not negotiated
    finally:
        fe.close()
        await srv.close()


# -- a miss, as QEMU answers it -----------------------------------------------------------------


async def test_a_miss_is_answered_by_an_update_then_hits_with_what_it_granted(
        qemu: Qemu) -> None:
    qemu.map(IOVA, 0x5000)
    qemu.serve()
    iotlb = qemu.conn.iotlb
    assert iotlb.lookup(IOVA + 0x10, 0x20, Access.READ) is None
    pieces = await iotlb.resolve(IOVA + 0x10, 0x20, Access.READ)
    assert pieces == [(DEFAULT_GPA + 0x5010, 0x20)]
    [miss] = qemu.channel.misses
    assert (miss.iova, miss.perm) == (IOVA + 0x10, IotlbPerm.RO)  # the exact address
    [entry] = iotlb.entries()
    assert (entry.iova, entry.size, entry.gpa) == (IOVA, PAGE, DEFAULT_GPA + 0x5000)
    # QEMU's UPDATE carries the guest's stage-1 permission of the page: RW here.
    assert entry.access == Access.READ | Access.WRITE
    assert iotlb.lookup(IOVA, PAGE, Access.READ) == [(DEFAULT_GPA + 0x5000, PAGE)]
    # A later write of the same page (a blk status byte beside its header) asks nothing.
    assert await iotlb.resolve(IOVA, 8, Access.WRITE) == [(DEFAULT_GPA + 0x5000, 8)]
    stats = qemu.conn.stats
    assert (stats["iotlb_miss"], stats["iotlb_update"], stats["IOTLB_MSG"]) == (1, 1, 1)


async def test_a_read_only_update_grants_no_write(qemu: Qemu) -> None:
    iotlb = qemu.conn.iotlb
    fill = asyncio.ensure_future(iotlb.fill(IOVA, Access.READ))
    await qemu.channel.next_miss()
    assert await qemu.fe.update(IOVA, PAGE, DEFAULT_UADDR, IotlbPerm.RO) == 0
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)
    await fill
    assert [e.access for e in iotlb.entries()] == [Access.READ]  # never more than perm
    assert iotlb.lookup(IOVA, 1, Access.WRITE) is None
    write = asyncio.ensure_future(iotlb.fill(IOVA, Access.WRITE))
    assert (await qemu.channel.next_miss()).perm == IotlbPerm.WO
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 1)  # the guest's tables say no
    with pytest.raises(IotlbMissRefused):
        await write


async def test_a_range_over_several_pages_fills_each_and_merges_contiguous_pieces(
        qemu: Qemu) -> None:
    qemu.map(IOVA, 0x3000)
    qemu.map(IOVA + PAGE, 0x4000)      # contiguous with the first
    qemu.map(IOVA + 2 * PAGE, 0x9000)  # elsewhere
    qemu.serve()
    pieces = await qemu.conn.iotlb.resolve(IOVA + 0x800, 2 * PAGE, Access.READ | Access.WRITE)
    assert pieces == [(DEFAULT_GPA + 0x3800, 0x1800), (DEFAULT_GPA + 0x9000, 0x800)]
    assert all(m.perm == IotlbPerm.RW for m in qemu.channel.misses)
    assert len(qemu.channel.misses) == 3


async def test_the_main_socket_is_served_while_a_miss_is_outstanding(qemu: Qemu) -> None:
    iotlb = qemu.conn.iotlb
    fill = asyncio.ensure_future(iotlb.fill(IOVA + 4, Access.WRITE))
    miss = await qemu.channel.next_miss()
    # QEMU may send anything on the main socket meanwhile; none of it may wait for the MISS.
    assert p.VRING_STATE.unpack((await qemu.fe.call(
        R.GET_VRING_BASE, p.VRING_STATE.pack(0, 0))).payload) == (0, 0)
    assert await qemu.fe.invalidate(IOVA + 0x10000, PAGE) == 0
    await alive(qemu.fe)
    assert not fill.done()
    assert await qemu.fe.update(IOVA, PAGE, DEFAULT_UADDR + 0x7000) == 0
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)
    await asyncio.wait_for(fill, 2)
    assert miss.iova == IOVA + 4
    assert iotlb.lookup(IOVA + 4, 4, Access.WRITE) == [(DEFAULT_GPA + 0x7004, 4)]


async def test_concurrent_misses_on_one_page_share_one_miss(qemu: Qemu) -> None:
    qemu.map(IOVA, 0)
    qemu.serve()
    iotlb = qemu.conn.iotlb
    results = await asyncio.gather(iotlb.resolve(IOVA, 4, Access.READ),
                                   iotlb.resolve(IOVA + 0x100, 4, Access.READ),
                                   iotlb.resolve(IOVA + 0x200, 4, Access.READ))
    assert results == [[(DEFAULT_GPA, 4)], [(DEFAULT_GPA + 0x100, 4)],
                       [(DEFAULT_GPA + 0x200, 4)]]
    assert len(qemu.channel.misses) == 1
    assert qemu.conn.stats["iotlb_miss_shared"] == 2


async def test_a_miss_acked_with_1_is_a_typed_stage1_fault(qemu: Qemu) -> None:
    qemu.serve()  # nothing mapped: QEMU acks 1
    with pytest.raises(IotlbMissRefused) as e:
        await qemu.conn.iotlb.resolve(IOVA + 0x123, 4, Access.WRITE)
    assert (e.value.iova, e.value.access) == (IOVA + 0x123, Access.WRITE)
    assert qemu.conn.stats["iotlb_miss_refused"] == 1
    assert len(qemu.conn.iotlb) == 0
    await alive(qemu.fe)


async def test_the_unsolicited_update_is_acked_but_not_trusted(qemu: Qemu) -> None:
    # QEMU pushes the used ring's translation at start; its RW was never checked for us.
    assert await qemu.fe.update(IOVA, PAGE, DEFAULT_UADDR) == 0
    assert len(qemu.conn.iotlb) == 0
    assert qemu.conn.stats["iotlb_update_unsolicited"] == 1


# -- invalidation -----------------------------------------------------------------------------


async def _fill_pages(qemu: Qemu, n: int) -> None:
    for i in range(n):
        qemu.map(IOVA + i * PAGE, i * PAGE)
    qemu.serve()
    for i in range(n):
        await qemu.conn.iotlb.resolve(IOVA + i * PAGE, PAGE, Access.READ)
    assert len(qemu.conn.iotlb) == n


async def test_invalidate_a_range(qemu: Qemu) -> None:
    await _fill_pages(qemu, 4)
    iotlb = qemu.conn.iotlb
    generation = iotlb.generation
    assert await qemu.fe.invalidate(IOVA + PAGE, PAGE) == 0
    assert iotlb.generation != generation
    assert iotlb.lookup(IOVA + PAGE, 1, Access.READ) is None
    assert iotlb.lookup(IOVA, PAGE, Access.READ) is not None
    assert iotlb.lookup(IOVA + 2 * PAGE, PAGE, Access.READ) is not None
    # Any overlap drops the whole entry: a partial, unaligned range takes two more.
    assert await qemu.fe.invalidate(IOVA + 3 * PAGE - 1, 2) == 0
    assert [e.iova for e in iotlb.entries()] == [IOVA]
    assert qemu.conn.stats["iotlb_invalidate"] == 2


async def test_invalidate_of_size_0_drops_everything(qemu: Qemu) -> None:
    await _fill_pages(qemu, 3)
    assert await qemu.fe.invalidate(0, 0) == 0  # what lazy mode sends
    assert len(qemu.conn.iotlb) == 0


async def test_an_invalidate_between_update_and_miss_ack_means_another_miss(
        qemu: Qemu) -> None:
    iotlb = qemu.conn.iotlb
    resolve = asyncio.ensure_future(iotlb.resolve(IOVA, 4, Access.READ))
    await qemu.channel.next_miss()
    assert await qemu.fe.update(IOVA, PAGE, DEFAULT_UADDR) == 0
    assert await qemu.fe.invalidate(IOVA, PAGE) == 0  # the guest unmapped meanwhile
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)
    await qemu.channel.next_miss()  # asked again, and now the guest's tables say no
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 1)
    with pytest.raises(IotlbMissRefused):
        await asyncio.wait_for(resolve, 2)


@pytest.mark.parametrize("stop", ["GET_VRING_BASE", "RESET_DEVICE", "SET_STATUS 0",
                                  "SET_MEM_TABLE", "disconnect"])
async def test_the_iotlb_is_cleared_when_the_device_stops(qemu: Qemu, memfd: int,
                                                          stop: str) -> None:
    await _fill_pages(qemu, 2)
    iotlb = qemu.conn.iotlb
    fe = qemu.fe
    if stop == "GET_VRING_BASE":
        await fe.call(R.GET_VRING_BASE, p.VRING_STATE.pack(0, 0))
    elif stop == "RESET_DEVICE":
        assert await fe.ack(R.RESET_DEVICE) == 0
    elif stop == "SET_STATUS 0":
        assert await fe.ack(R.SET_STATUS, p.U64.pack(0)) == 0
    elif stop == "SET_MEM_TABLE":
        assert await fe.set_mem_table([(DEFAULT_GPA, MEM_SIZE, DEFAULT_UADDR, 0)], [memfd]) == 0
    else:
        fe.close()
        with pytest.raises(EOFError):  # QEMU's end of the channel sees it close
            await qemu.channel.read(timeout=2)
        assert iotlb.channel is None
    assert len(iotlb) == 0


# -- a hostile or broken front-end -----------------------------------------------------------


async def test_a_miss_never_answered_times_out_and_a_late_ack_is_not_misread(
        qemu: Qemu) -> None:
    iotlb = qemu.conn.iotlb
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(IotlbTimeout, match="did not answer"):
        await iotlb.fill(IOVA, Access.READ)
    assert loop.time() - start < MISS_TIMEOUT + 1
    await alive(qemu.fe)
    first = await qemu.channel.next_miss()
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)  # too late: dropped
    # The next miss gets its own answer, not the late one.
    fill = asyncio.ensure_future(iotlb.fill(IOVA + PAGE, Access.READ))
    second = await qemu.channel.next_miss()
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 1)
    with pytest.raises(IotlbMissRefused):
        await fill
    assert (first.iova, second.iova) == (IOVA, IOVA + PAGE)
    assert qemu.conn.stats["iotlb_miss_timeout"] == 1


async def test_a_miss_acked_without_an_update_is_a_protocol_error(qemu: Qemu) -> None:
    fill = asyncio.ensure_future(qemu.conn.iotlb.fill(IOVA, Access.READ))
    await qemu.channel.next_miss()
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)
    with pytest.raises(IotlbProtocolError, match="no UPDATE"):
        await fill


async def test_an_update_that_denies_the_access_asked_is_a_protocol_error(
        qemu: Qemu) -> None:
    fill = asyncio.ensure_future(qemu.conn.iotlb.fill(IOVA, Access.WRITE))
    await qemu.channel.next_miss()
    assert await qemu.fe.update(IOVA, PAGE, DEFAULT_UADDR, IotlbPerm.RO) == 0
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)
    with pytest.raises(IotlbProtocolError):
        await fill
    assert len(qemu.conn.iotlb) == 0


@pytest.mark.parametrize("iova,size,uaddr,perm", [
    (IOVA, PAGE, DEFAULT_UADDR + MEM_SIZE, IotlbPerm.RW),      # uaddr outside memory
    (IOVA, 2 * PAGE, DEFAULT_UADDR + MEM_SIZE - PAGE, IotlbPerm.RW),  # runs past the end
    (IOVA, 1 << 62, DEFAULT_UADDR, IotlbPerm.RW),               # huge
    (IOVA + 0x10, PAGE, DEFAULT_UADDR, IotlbPerm.RW),           # unaligned iova
    (IOVA, 0x800, DEFAULT_UADDR, IotlbPerm.RW),                 # unaligned size
    (IOVA, 0, DEFAULT_UADDR, IotlbPerm.RW),                     # empty
    ((1 << 64) - PAGE, 2 * PAGE, DEFAULT_UADDR, IotlbPerm.RW),  # wraps
    (IOVA, PAGE, (1 << 64) - PAGE, IotlbPerm.RW),               # uaddr wraps
    (IOVA, PAGE, DEFAULT_UADDR, 0),                             # no access
    (IOVA, PAGE, DEFAULT_UADDR, 0xFF),                          # unknown bits
])
async def test_bad_updates_are_refused_and_cache_nothing(
        qemu: Qemu, caplog: pytest.LogCaptureFixture,
        iova: int, size: int, uaddr: int, perm: int) -> None:
    fill = asyncio.ensure_future(qemu.conn.iotlb.fill(IOVA, Access.READ))
    await qemu.channel.next_miss()
    assert await qemu.fe.update(iova, size, uaddr, perm) != 0
    assert "refused IOTLB_MSG" in caplog.text
    assert len(qemu.conn.iotlb) == 0
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)
    with pytest.raises(IotlbProtocolError):
        await fill
    await alive(qemu.fe)


async def test_a_wrapping_invalidate_is_refused_and_still_drops_everything(
        qemu: Qemu) -> None:
    await _fill_pages(qemu, 2)
    assert await qemu.fe.invalidate((1 << 64) - PAGE, 2 * PAGE) != 0
    assert len(qemu.conn.iotlb) == 0


@pytest.mark.parametrize("payload", [
    IotlbMsg(IOVA, PAGE, 0, IotlbPerm.RW, IotlbType.MISS).pack(),
    IotlbMsg(IOVA, PAGE, 0, IotlbPerm.RW, IotlbType.ACCESS_FAIL).pack(),
    IotlbMsg(IOVA, PAGE, 0, IotlbPerm.RW, 0).pack(),
    IotlbMsg(IOVA, PAGE, 0, IotlbPerm.RW, 77).pack(),
    IotlbMsg(IOVA, PAGE, DEFAULT_UADDR, IotlbPerm.RW, IotlbType.UPDATE).pack()[:26],
    b"",
])
async def test_unknown_iotlb_types_and_short_payloads_are_refused(
        qemu: Qemu, payload: bytes) -> None:
    assert await qemu.fe.ack(R.IOTLB_MSG, payload) != 0
    await alive(qemu.fe)


async def test_iotlb_messages_are_acked_even_without_reply_ack(
        server: VhostUserServer) -> None:
    fe = await FakeFrontend.connect(server.path)
    try:
        await fe.negotiate(protocol=1 << PF.MQ)
        assert await fe.invalidate(0, 0) == 0  # QEMU waits for this ack whatever was agreed
    finally:
        fe.close()


@pytest.mark.parametrize("kind", ["pipe", "datagram", "no fd", "two fds"])
async def test_a_backend_channel_fd_that_is_not_a_stream_socket_is_refused(
        server: VhostUserServer, kind: str) -> None:
    fe = await FakeFrontend.connect(server.path)
    try:
        await fe.negotiate()
        before = open_fds()
        if kind == "pipe":
            r, w = os.pipe()
            fds, mine = [r], [r, w]
        elif kind == "datagram":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            fds, mine = [b.fileno()], [a.detach(), b.detach()]
        elif kind == "two fds":
            a, b = socket.socketpair()
            fds, mine = [a.fileno(), b.fileno()], [a.detach(), b.detach()]
        else:
            fds, mine = [], []
        try:
            assert await fe.ack(R.SET_BACKEND_REQ_FD, b"", fds) != 0
        finally:
            for fd in mine:
                os.close(fd)
        assert open_fds() == before  # the back-end closed what it received
        conn = server.connection
        assert conn is not None and conn.iotlb.channel is None
        with pytest.raises(IotlbUnavailable, match="no backend channel"):
            await conn.iotlb.fill(IOVA, Access.READ)
        await alive(fe)
    finally:
        fe.close()


async def test_a_backend_channel_closed_by_the_frontend_fails_misses_at_once(
        qemu: Qemu) -> None:
    iotlb = qemu.conn.iotlb
    fill = asyncio.ensure_future(iotlb.fill(IOVA, Access.READ))
    await qemu.channel.next_miss()
    qemu.channel.close()
    with pytest.raises(IotlbUnavailable, match="closed by the frontend"):
        await asyncio.wait_for(fill, 2)
    with pytest.raises(IotlbUnavailable, match="closed"):
        await iotlb.fill(IOVA, Access.READ)
    await alive(qemu.fe)
    # A new SET_BACKEND_REQ_FD (QEMU reconnecting its channel) works again.
    qemu.channel = await qemu.fe.set_backend_channel()
    qemu.map(IOVA, 0)
    qemu.serve()
    assert await iotlb.resolve(IOVA, 4, Access.READ) == [(DEFAULT_GPA, 4)]


@pytest.mark.parametrize("garbage", [
    p.HEADER.pack(p.BackendRequest.IOTLB_MSG, p.VERSION, 0),               # a request
    p.HEADER.pack(p.BackendRequest.CONFIG_CHANGE_MSG, p.VERSION | p.FLAG_REPLY, 8)
    + bytes(8),                                                          # wrong reply
    p.HEADER.pack(p.BackendRequest.IOTLB_MSG, p.VERSION | p.FLAG_REPLY, 4) + bytes(4),
    p.HEADER.pack(p.BackendRequest.IOTLB_MSG, p.VERSION | p.FLAG_REPLY, 1 << 20),
])
async def test_garbage_on_the_backend_channel_breaks_it_not_the_connection(
        qemu: Qemu, garbage: bytes) -> None:
    iotlb = qemu.conn.iotlb
    fill = asyncio.ensure_future(iotlb.fill(IOVA, Access.READ))
    await qemu.channel.next_miss()
    await asyncio.get_running_loop().sock_sendall(qemu.channel.sock, garbage)
    with pytest.raises(IotlbUnavailable, match="backend channel"):
        await asyncio.wait_for(fill, 2)
    await alive(qemu.fe)


async def test_a_reply_with_no_request_waiting_breaks_the_channel(qemu: Qemu) -> None:
    await qemu.channel.reply(p.BackendRequest.IOTLB_MSG, 0)
    for _ in range(100):
        if qemu.conn.iotlb.channel is not None and qemu.conn.iotlb.channel.closed:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(IotlbUnavailable, match="no request is waiting"):
        await qemu.conn.iotlb.fill(IOVA, Access.READ)


# -- rings ----------------------------------------------------------------------------------------


async def test_rings_are_at_iovas_once_access_platform_is_negotiated(
        qemu: Qemu, guest: tuple[GuestMemory, int]) -> None:
    driver = FakeDriver(guest[0], DEFAULT_GPA, 8, span=0x10000)
    # No IOTLB-backed DMA space wired: the ring cannot start, and says why.
    rings = await qemu.fe.start_vring(0, driver, gpa_to_uaddr=0)  # addresses as the guest's
    try:
        rings.kick_ring()
        await rings.wait_err()
        await qemu.fe.call(R.GET_VRING_BASE, p.VRING_STATE.pack(0, 0))
        # With one (here identity: iova == gpa), the ring addresses go to it unconverted.
        qemu.conn.iova_dma = PhysicalDma(qemu.conn.memory)
        head = driver.add([], [16])
        driver.publish()
        rings.kick_ring()
        await rings.wait_call()
        assert [h for h, n in driver.used()] == [head]
        queue = qemu.conn.device.queues[0]
        assert (queue.desc, queue.avail, queue.used) == (driver.desc, driver.avail,
                                                        driver.used_ring)
    finally:
        rings.close()


# -- what a gone front-end leaves behind --------------------------------------------------------


def guest_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "fake-guest" in line)


@pytest.mark.parametrize("ending", ["idle", "miss outstanding", "miss refused",
                                    "miss timed out", "channel broken"])
async def test_a_gone_frontend_frees_its_iotlb_and_memory_without_the_collector(
        server: VhostUserServer, memfd: int, ending: str) -> None:
    gc.disable()
    try:
        mapped = guest_maps()
        fe = await FakeFrontend.connect(server.path)
        await fe.negotiate()
        channel = await fe.set_backend_channel()
        assert await fe.set_mem_table([(DEFAULT_GPA, MEM_SIZE, DEFAULT_UADDR, 0)],
                                      [memfd]) == 0
        assert guest_maps() == mapped + 1
        assert server.connection is not None
        conn = weakref.ref(server.connection)
        iotlb = server.connection.iotlb
        stage1 = Stage1({IOVA: DEFAULT_UADDR})
        channel.serve(stage1.on_miss(fe))
        await iotlb.resolve(IOVA, 4, Access.READ)
        pending = None
        if ending == "miss outstanding":
            channel.task.cancel()
            pending = asyncio.ensure_future(iotlb.fill(IOVA + PAGE, Access.READ))
            await asyncio.sleep(0.01)
        elif ending == "miss refused":
            with pytest.raises(IotlbMissRefused):
                await iotlb.fill(IOVA + PAGE, Access.READ)
        elif ending == "miss timed out":
            channel.task.cancel()
            with pytest.raises(IotlbTimeout):
                await iotlb.fill(IOVA + PAGE, Access.READ)
        elif ending == "channel broken":
            channel.task.cancel()
            await asyncio.get_running_loop().sock_sendall(channel.sock, b"\xff" * 12)
            with pytest.raises(IotlbUnavailable):
                await iotlb.fill(IOVA + PAGE, Access.READ)
        del iotlb
        fe.close()
        if pending is not None:
            with pytest.raises(IotlbUnavailable):
                await asyncio.wait_for(pending, 2)
            del pending
        for _ in range(200):
            if server.connection is None and conn() is None:
                break
            await asyncio.sleep(0.01)
        channel.close()
        assert conn() is None, gc.get_referrers(conn())
        assert guest_maps() == mapped
    finally:
        gc.enable()


async def test_a_prefetch_asks_only_when_the_channel_has_room(qemu: Qemu) -> None:
    qemu.map(IOVA, 0)
    qemu.map(IOVA + PAGE, PAGE)
    qemu.serve()
    iotlb = qemu.conn.iotlb
    await iotlb.prefetch(IOVA, Access.READ)  # asked: the channel is idle
    assert len(qemu.channel.misses) == 1
    await iotlb.prefetch(IOVA, Access.READ)  # at hand: nothing asked
    assert len(qemu.channel.misses) == 1
    iotlb.channel = None
    await iotlb.prefetch(IOVA + PAGE, Access.READ)  # no channel: skipped, no error
    assert qemu.conn.stats["iotlb_prefetch_skipped"] == 1


async def test_invalidated_since_says_which_ranges_went(qemu: Qemu) -> None:
    iotlb = qemu.conn.iotlb
    for i in range(3):
        qemu.map(IOVA + i * PAGE, i * PAGE)
    qemu.serve()
    for i in range(3):
        await iotlb.fill(IOVA + i * PAGE, Access.READ)
    gen = iotlb.generation
    assert iotlb.invalidated_since(gen) == []
    assert await qemu.fe.invalidate(IOVA + PAGE + 8, 16) == 0  # drops the whole entry
    assert await qemu.fe.invalidate(IOVA + 0x100000, PAGE) == 0  # nothing cached there
    assert iotlb.invalidated_since(gen) == [(IOVA + PAGE, IOVA + 2 * PAGE),
                                            (IOVA + 0x100000, IOVA + 0x100000 + PAGE)]
    later = iotlb.generation
    iotlb.clear()
    assert iotlb.invalidated_since(later) is None  # everything went
    assert iotlb.invalidated_since(iotlb.generation) == []
