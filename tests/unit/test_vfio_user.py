"""The vfio-user server through a fake QEMU 10.2 client, against a test-double PCI function.

The fake client (tests/fakes/vfio_user.py) sends what QEMU's vfio-user-pci sends,
with QEMU's sizes, and records in ``violations`` every reply that would break a
real QEMU (larger than its receive buffer, fds it does not expect, an answer to a
posted write). Every test ends by checking there were none, unless it provokes them.
The real client is exercised by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import mmap
import os
import random
import socket
import struct
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pviommu.memory import GuestMemory, MemoryAccessError, RemoteRange
from pviommu.pci.function import (
    NUM_REGIONS,
    IrqIndex,
    PciAccessError,
    RegionIndex,
    RegionInfo,
)
from pviommu.transport.unix_socket import SocketPathError
from pviommu.transport.vfio_user import protocol as p
from pviommu.transport.vfio_user.server import DEFAULT_MAX_DMA_MAPS, VfioUserServer
from tests.fakes import vfio_user as q
from tests.fakes.memfd import sealed_memfd
from tests.fakes.vfio_user import (
    CONFIG,
    DEFAULT_GPA,
    ERR,
    HDR,
    IRQ_BOOL,
    IRQ_EVENTFD,
    IRQ_MASK,
    IRQ_NONE,
    IRQ_TRIGGER,
    IRQ_UNMASK,
    MSIX,
    NO_REPLY,
    QEMU_VERSION_JSON,
    QEMU_VERSION_SIZE,
    FakeQemu,
    eventfd,
)

MEM_SIZE = 1 << 20
BAR0_SIZE = 0x1000
BAR4_SIZE = 0x4000
VECTORS = 4
REMOTE_GPA = 0x80000000


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeFunction:
    """A PCI function test double: plain bytes behind its regions, eventfds it signals."""

    def __init__(self) -> None:
        self.config = bytearray(256)
        self.config[0:4] = struct.pack("<HH", 0x1AF4, 0x1044)
        self.config[0x0E] = 0  # header type 0
        self.bars = {0: bytearray(BAR0_SIZE), 4: bytearray(BAR4_SIZE)}
        self.eventfds: dict[tuple[int, int], int] = {}
        self.irq_calls: list[tuple[int, int, int]] = []  # (index, start, count)
        self.deassigned: list[tuple[int, int]] = []
        self.disabled: list[int] = []
        self.resets = 0
        self.disconnects = 0

    def _mem(self, index: int) -> bytearray:
        if index == RegionIndex.CONFIG:
            return self.config
        if index in self.bars:
            return self.bars[index]
        raise PciAccessError(f"region {index} is not implemented")

    def regions(self) -> list[RegionInfo]:
        sizes = {0: BAR0_SIZE, 4: BAR4_SIZE, RegionIndex.CONFIG: 256}
        return [RegionInfo(i, sizes.get(i, 0), memory=i != RegionIndex.CONFIG)
                for i in range(NUM_REGIONS)]

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        mem = self._mem(index)
        if offset + size > len(mem):
            raise PciAccessError("outside the region")
        return bytes(mem[offset:offset + size])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == RegionIndex.CONFIG and offset == 0x30:
            return  # no expansion ROM: the ROM BAR reads back 0
        mem = self._mem(index)
        if offset + len(data) > len(mem):
            raise PciAccessError("outside the region")
        mem[offset:offset + len(data)] = data

    def irq_count(self, index: int) -> int:
        return VECTORS if index == IrqIndex.MSIX else 0

    def set_irq_eventfds(self, index: int, start: int, fds: list[int | None]) -> None:
        if index != IrqIndex.MSIX or start + len(fds) > VECTORS:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            raise ValueError("no such vectors")
        self.irq_calls.append((index, start, len(fds)))
        for i, fd in enumerate(fds, start):
            old = self.eventfds.pop((index, i), None)
            if old is not None:
                os.close(old)
            if fd is None:
                self.deassigned.append((index, i))
            else:
                self.eventfds[(index, i)] = fd

    def disable_irqs(self, index: int) -> None:
        self.disabled.append(index)
        for key in [k for k in self.eventfds if k[0] == index]:
            os.close(self.eventfds.pop(key))

    def reset(self) -> None:
        self.resets += 1

    def disconnect(self) -> None:
        self.disconnects += 1
        for fd in self.eventfds.values():
            os.close(fd)
        self.eventfds.clear()

    def fire(self, vector: int) -> None:
        os.write(self.eventfds[(IrqIndex.MSIX, vector)], (1).to_bytes(8, "little"))


class Memfd:
    """Guest RAM the fake QEMU shares: a memfd and the test's own mapping of it."""

    def __init__(self, size: int = MEM_SIZE) -> None:
        self.fd = sealed_memfd(size, "fake-ram")
        self.map = mmap.mmap(self.fd, size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def function() -> FakeFunction:
    return FakeFunction()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    yield mem
    mem.clear()


@pytest.fixture
async def server(sock_dir: Path, function: FakeFunction,
                 memory: GuestMemory) -> AsyncIterator[VfioUserServer]:
    srv = VfioUserServer(sock_dir / "ep.sock", function, memory, name="test-ep")
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
def ram() -> Iterator[Memfd]:
    m = Memfd()
    yield m
    m.close()


@pytest.fixture
async def qemu(server: VfioUserServer) -> AsyncIterator[FakeQemu]:
    client = await FakeQemu.connect(server.path)
    yield client
    await client.close()
    assert client.violations == []


async def negotiated(server: VfioUserServer) -> FakeQemu:
    client = await FakeQemu.connect(server.path)
    client.accept_version(await client.version())
    return client


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def assert_error(reply: q.Reply, err: int | None = None) -> None:
    """An error reply as the spec wants it: header only, REPLY|ERROR, a positive errno."""
    assert reply.size == 16 and reply.payload == b""
    assert reply.flags == 0x21
    assert reply.error > 0
    if err is not None:
        assert reply.error == err, f"errno {reply.error}, expected {err}"


# -- start-up ------------------------------------------------------------------------------


async def test_startup_as_qemu_does_it(server: VfioUserServer, qemu: FakeQemu,
                                       function: FakeFunction, memory: GuestMemory,
                                       ram: Memfd) -> None:
    learnt = await qemu.startup(ram.fd, MEM_SIZE)
    assert learnt["caps"] == {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20,
                              "pgsizes": 4096, "max_dma_maps": DEFAULT_MAX_DMA_MAPS}
    assert learnt["info"] == (16, 3, 9, 5)  # RESET|PCI, 9 regions, 5 IRQ kinds
    regions = learnt["regions"]
    assert regions[0] == (32, 3, 0, 0, BAR0_SIZE, 0)  # READ|WRITE, never MMAP
    assert regions[4] == (32, 3, 4, 0, BAR4_SIZE, 0)
    for absent in (1, 2, 3, 5):
        assert regions[absent] == (32, 0, absent, 0, 0, 0)
    assert regions[CONFIG] == (32, 3, CONFIG, 0, 256, 0)
    assert_error(learnt["err"])  # no ERR interrupt: QEMU stays silent on an error
    assert learnt["config"] == bytes(function.config)
    assert learnt["rom_size"] == 0
    assert learnt["msix"] == (16, 3, MSIX, VECTORS)  # EVENTFD|MASKABLE, no NORESIZE
    assert function.resets == 1
    assert memory.regions[0].gpa == DEFAULT_GPA and memory.regions[0].size == MEM_SIZE
    assert all(not r.fds for r in qemu.received)  # the server never passes fds
    assert server.stats["VERSION"] == 1 and server.stats["DEVICE_RESET"] == 1
    assert server.stats["DEVICE_GET_REGION_INFO"] == 7
    assert server.connections == 1


async def test_version_reply_fits_qemus_request(qemu: FakeQemu) -> None:
    request = struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON + b"\0"
    assert len(QEMU_VERSION_JSON) == 193 and 16 + len(request) == QEMU_VERSION_SIZE
    reply = await qemu.version()
    assert reply.flags == 1 and reply.command == 1 and reply.id == 0
    assert reply.size <= QEMU_VERSION_SIZE and not reply.fds
    assert reply.unpack("<HH") == (0, 0)
    assert reply.payload.endswith(b"\0")
    caps = json.loads(reply.payload[4:-1])["capabilities"]
    assert "write_multiple" not in caps and "twin_socket" not in caps
    assert "migration" not in caps


@pytest.mark.parametrize("offer, expected", [
    (b'{"capabilities": {"max_msg_fds": 4}}', {"max_msg_fds": 16}),
    (b'{"capabilities": {"max_data_xfer_size": 65536, "pgsizes": 12288}}',
     {"max_data_xfer_size": 65536, "pgsizes": 12288}),
    (b'{"capabilities": {"max_dma_maps": 10, "twin_socket": {"supported": true}}}',
     {"max_dma_maps": 10}),
    (b'{"capabilities": {}}', {}),
])
async def test_version_replies_a_subset_of_the_offer(qemu: FakeQemu, offer: bytes,
                                                     expected: dict[str, int]) -> None:
    reply = await qemu.version(offer)
    assert reply.ok and reply.size <= 16 + 4 + len(offer) + 1
    assert json.loads(reply.payload[4:-1]) == {"capabilities": expected}


@pytest.mark.parametrize("offer", [b"{}", b"", None])
async def test_version_reply_never_outgrows_a_short_request(qemu: FakeQemu,
                                                            offer: bytes | None) -> None:
    reply = await qemu.version(offer)
    request_size = 16 + 4 + (0 if offer is None else len(offer) + 1)
    assert reply.ok and reply.size <= request_size
    assert reply.unpack("<HH") == (0, 0)


async def test_negotiated_transfer_size_binds_region_access(server: VfioUserServer,
                                                            qemu: FakeQemu) -> None:
    reply = await qemu.version(b'{"capabilities": {"max_data_xfer_size": 256}}')
    assert qemu.accept_version(reply)["max_data_xfer_size"] == 256
    assert (await qemu.region_read(CONFIG, 0, 256)).ok
    assert_error(await qemu.region_read(0, 0, 512), errno.EINVAL)


async def test_an_incompatible_major_is_refused_and_closed(server: VfioUserServer,
                                                           qemu: FakeQemu) -> None:
    assert_error(await qemu.version(major=1), errno.ENOTSUP)
    assert await qemu.closed()
    client = await negotiated(server)  # the next client is served
    await client.close()
    assert server.connections == 2


@pytest.mark.parametrize("offer", [
    b"not json", b"[1, 2]", b'{"capabilities": 3}', b'{"capabilities": {"pgsizes": 2048}}',
    b'{"capabilities": {"max_msg_fds": -1}}', b'{"capabilities": {"max_data_xfer_size": 0}}',
    b'{"capabilities": {"max_dma_maps": true}}', b"\xff\xfe",
])
async def test_bad_version_data_is_refused(qemu: FakeQemu, offer: bytes) -> None:
    assert_error(await qemu.version(offer), errno.EINVAL)
    assert (await qemu.version()).ok  # the client may try again


async def test_commands_before_version_are_refused(qemu: FakeQemu) -> None:
    assert_error(await qemu.get_info(), errno.EINVAL)
    assert (await qemu.version()).ok
    assert (await qemu.get_info()).ok
    assert_error(await qemu.version(), errno.EINVAL)  # only once


# -- reply sizes (checklist T1) -----------------------------------------------------------


async def test_no_reply_outgrows_qemus_buffer(qemu: FakeQemu, ram: Memfd) -> None:
    """The fake checks every reply against QEMU's buffer; these are the exact sizes."""
    assert (await qemu.version()).size <= QEMU_VERSION_SIZE
    assert (await qemu.dma_map(DEFAULT_GPA, MEM_SIZE, ram.fd)).size == 16  # <= 48
    assert (await qemu.dma_unmap(DEFAULT_GPA, MEM_SIZE)).size == 40  # <= 40
    assert (await qemu.get_info()).size == 32  # <= 32 (not the kernel's 24-byte struct)
    assert (await qemu.region_info(0)).size == 48  # <= 16 + argsz
    assert (await qemu.irq_info(MSIX)).size == 32  # <= 32
    assert (await qemu.set_irqs(MSIX, 0, 0, IRQ_NONE | IRQ_TRIGGER)).size == 16  # <= 36
    assert (await qemu.region_read(0, 0, 8)).size == 32 + 8  # <= 32 + count
    assert (await qemu.region_write(0, 0, bytes(8))).size == 32  # <= 32 + count
    assert (await qemu.reset()).size == 16  # <= 16
    assert qemu.violations == []


async def test_region_info_follows_the_argsz_rule(qemu: FakeQemu) -> None:
    await qemu.version()
    short = await qemu.region_info(0, argsz=16)
    assert short.ok and short.size == 16 + 16  # only what fits
    assert short.unpack("<II") == (32, 3)  # argsz says how much a full reply needs
    full = await qemu.region_info(0, argsz=32)
    assert full.size == 16 + 32 and full.unpack("<IIIIQQ")[4] == BAR0_SIZE
    roomy = await qemu.region_info(0, argsz=4096)  # the payload size is the message's, 48
    assert roomy.size == 48 and roomy.unpack("<I")[0] == 32
    assert_error(await qemu.region_info(0, argsz=2), errno.EINVAL)


async def test_regions_never_offer_mmap_or_fds(qemu: FakeQemu) -> None:
    await qemu.version()
    for index in range(NUM_REGIONS):
        reply = await qemu.region_info(index)
        assert reply.ok and not reply.fds
        flags = reply.unpack("<II")[1]
        assert not flags & (p.REGION_FLAG_MMAP | p.REGION_FLAG_CAPS)
    assert (await qemu.region_info(RegionIndex.ROM)).unpack("<IIIIQQ")[4] == 0
    assert_error(await qemu.region_info(NUM_REGIONS), errno.EINVAL)
    assert_error(await qemu.region_info(0xFFFFFFFF), errno.EINVAL)


async def test_a_bar_size_that_would_abort_qemu_is_refused(server: VfioUserServer,
                                                           function: FakeFunction) -> None:
    function.regions = lambda: [RegionInfo(0, 0x3000)]  # type: ignore[method-assign]
    client = await negotiated(server)
    assert_error(await client.region_info(0), errno.EINVAL)
    await client.close()


async def test_device_info_is_16_bytes_with_reset_and_pci(qemu: FakeQemu) -> None:
    await qemu.version()
    reply = await qemu.get_info()
    assert reply.size == 32
    assert reply.unpack("<IIII") == (16, p.DEVICE_FLAGS_RESET | p.DEVICE_FLAGS_PCI, 9, 5)


async def test_irq_info(qemu: FakeQemu) -> None:
    await qemu.version()
    assert_error(await qemu.irq_info(ERR), errno.EINVAL)
    assert_error(await qemu.irq_info(IrqIndex.REQ), errno.EINVAL)
    assert (await qemu.irq_info(MSIX)).unpack("<IIII") == (16, 3, MSIX, VECTORS)
    assert (await qemu.irq_info(IrqIndex.INTX)).unpack("<IIII") == (16, 7, 0, 0)
    assert_error(await qemu.irq_info(5), errno.EINVAL)


# -- region access ---------------------------------------------------------------------------


async def test_posted_writes_are_never_answered_and_stay_in_order(
        server: VfioUserServer, qemu: FakeQemu, function: FakeFunction) -> None:
    await qemu.version()
    await qemu.region_write(4, 0x3000, b"\x01\x00", posted=True)
    await qemu.region_write(4, 0x3000, b"\x07\x00", posted=True)
    await qemu.region_write(4, BAR4_SIZE, b"\x01\x00", posted=True)  # refused: not answered
    assert await qemu.silent()
    reply = await qemu.region_read(4, 0x3000, 2)  # sees the posted writes, in order
    assert reply.payload == struct.pack("<QII", 0x3000, 4, 2) + b"\x07\x00"
    assert server.stats["refused"] == 1
    assert qemu.violations == []  # no reply to anything posted


async def test_a_posted_write_with_fds_is_not_answered_either(qemu: FakeQemu) -> None:
    await qemu.version()
    before = open_fds()
    fd = eventfd()
    await qemu.send(q.REGION_WRITE, struct.pack("<QII", 0, 0, 4) + bytes(4), [fd],
                    flags=NO_REPLY)
    os.close(fd)
    assert await qemu.silent()
    await until(lambda: open_fds() == before)


async def test_region_read_and_write_echo_their_header(qemu: FakeQemu,
                                                      function: FakeFunction) -> None:
    await qemu.version()
    reply = await qemu.region_write(0, 0x10, b"abcd")
    assert reply is not None and reply.payload == struct.pack("<QII", 0x10, 0, 4)
    assert function.bars[0][0x10:0x14] == b"abcd"
    reply = await qemu.region_read(0, 0x10, 4)
    assert reply.size == 36 and reply.payload == struct.pack("<QII", 0x10, 0, 4) + b"abcd"
    config = await qemu.region_read(CONFIG, 0, 256)  # QEMU's one read of all of config
    assert config.size == 32 + 256 and config.payload[16:] == bytes(function.config)


async def test_write_multi_applies_every_write_and_never_answers(
        server: VfioUserServer, qemu: FakeQemu, function: FakeFunction) -> None:
    await qemu.version()
    await qemu.write_multi([(0, 0, b"\x01"), (0, 0, b"\x02"), (0, 8, b"12345678"),
                            (4, BAR4_SIZE - 2, b"abc"),  # outside BAR4: skipped, logged
                            (0, 16, b"xy")])
    assert await qemu.silent()
    assert bytes(function.bars[0][0:1]) == b"\x02"
    assert bytes(function.bars[0][8:18]) == b"12345678xy"
    assert server.stats["REGION_WRITE_MULTI"] == 1 and server.stats["refused"] == 1
    bad = struct.pack("<Q", 300)  # too many writes: refused, still not answered
    await qemu.send(q.WRITE_MULTI, bad, flags=NO_REPLY)
    body = struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 0, 9, b"")  # count above 8
    await qemu.send_raw(HDR.pack(qemu.new_id(), q.WRITE_MULTI, 16 + len(body), 0, 0) + body)
    assert await qemu.silent()  # not even without NO_REPLY (any reply is a violation)
    assert (await qemu.region_read(0, 0, 1)).payload[16:] == b"\x02"
    assert server.stats["refused"] == 3


# -- DMA maps --------------------------------------------------------------------------------


async def test_dma_map_with_an_fd_is_seen_through_memory_views(
        qemu: FakeQemu, memory: GuestMemory, ram: Memfd) -> None:
    await qemu.version()
    ram.map[0x2000:0x2004] = b"ping"
    assert (await qemu.dma_map(DEFAULT_GPA, MEM_SIZE // 2, ram.fd)).ok
    assert (await qemu.dma_map(DEFAULT_GPA + MEM_SIZE, MEM_SIZE // 2, ram.fd,
                               offset=MEM_SIZE // 2, flags=1)).ok  # read-only (ROM)
    assert bytes(memory.view(DEFAULT_GPA + 0x2000, 4)) == b"ping"
    memory.view(DEFAULT_GPA + 0x3000, 4)[:] = b"pong"  # shared with QEMU's RAM
    assert ram.map[0x3000:0x3004] == b"pong"
    ram.map[MEM_SIZE // 2:MEM_SIZE // 2 + 3] = b"rom"
    assert memory.read(DEFAULT_GPA + MEM_SIZE, 3) == b"rom"
    with pytest.raises(MemoryAccessError):
        memory.view(DEFAULT_GPA + MEM_SIZE, 3, write=True)
    assert_error(await qemu.dma_map(0x10000000, MEM_SIZE * 2, ram.fd), errno.EINVAL)  # > file


async def test_overlapping_dma_map_is_eexist_and_changes_nothing(
        qemu: FakeQemu, memory: GuestMemory, ram: Memfd) -> None:
    await qemu.version()
    assert (await qemu.dma_map(DEFAULT_GPA, 0x10000, ram.fd)).ok
    assert (await qemu.dma_map(REMOTE_GPA, 0x10000)).ok
    before = memory.regions
    fds = open_fds()
    assert_error(await qemu.dma_map(DEFAULT_GPA + 0xF000, 0x2000, ram.fd), errno.EEXIST)
    assert_error(await qemu.dma_map(REMOTE_GPA - 0x1000, 0x2000), errno.EEXIST)
    assert memory.regions == before
    await until(lambda: open_fds() == fds)  # the refused map's fd is closed


async def test_dma_unmap_ranges_and_all(qemu: FakeQemu, memory: GuestMemory,
                                        ram: Memfd) -> None:
    await qemu.version()
    baseline = open_fds()
    for i in range(3):
        assert (await qemu.dma_map(DEFAULT_GPA + i * 0x10000, 0x10000, ram.fd,
                                   offset=i * 0x10000)).ok
    assert (await qemu.dma_map(REMOTE_GPA, 0x10000)).ok
    assert open_fds() == baseline + 3  # one mapping each
    reply = await qemu.dma_unmap(DEFAULT_GPA - 0x1000, 0x21000)  # spans the first two
    assert reply.payload == struct.pack("<IIQQ", 24, 0, DEFAULT_GPA - 0x1000, 0x21000)
    assert [r.gpa for r in memory.regions] == [DEFAULT_GPA + 0x20000, REMOTE_GPA]
    assert open_fds() == baseline + 1  # released before the reply
    assert_error(await qemu.dma_unmap(DEFAULT_GPA + 0x20000, 0x1000), errno.EINVAL)  # cuts
    assert (await qemu.dma_unmap(0x1000, 0x1000)).ok  # nothing there: fine
    assert len(memory.regions) == 2
    assert_error(await qemu.dma_unmap(0, 0), errno.EINVAL)
    assert_error(await qemu.dma_unmap(0, 0x1000, flags=p.DMA_UNMAP_FLAG_ALL), errno.EINVAL)
    assert_error(await qemu.dma_unmap(0, 0x1000, flags=1), errno.EINVAL)  # dirty bitmap
    reply = await qemu.dma_unmap(0, 0, flags=p.DMA_UNMAP_FLAG_ALL)
    assert reply.ok and reply.size == 40
    assert memory.regions == [] and open_fds() == baseline


async def test_dma_map_limits(qemu: FakeQemu, memory: GuestMemory) -> None:
    qemu.accept_version(await qemu.version(b'{"capabilities": {"max_dma_maps": 2}}'))
    assert (await qemu.dma_map(0x1000, 0x1000)).ok
    assert (await qemu.dma_map(0x2000, 0x1000)).ok
    assert_error(await qemu.dma_map(0x3000, 0x1000), errno.ENOSPC)
    assert_error(await qemu.dma_map(0x4000, 0), errno.EINVAL)
    assert_error(await qemu.dma_map((1 << 64) - 0x1000, 0x2000), errno.EINVAL)
    assert_error(await qemu.dma_map(0x5000, 0x1000, flags=4), errno.EINVAL)
    assert len(memory.regions) == 2


async def test_dma_maps_with_fds_stop_at_the_limit_with_enospc(
        server: VfioUserServer, qemu: FakeQemu, memory: GuestMemory, ram: Memfd) -> None:
    """Each fd-backed map keeps an fd: a client past the limit would starve the process."""
    caps = qemu.accept_version(await qemu.version())
    assert caps["max_dma_maps"] == DEFAULT_MAX_DMA_MAPS < 65535
    baseline = open_fds()
    for i in range(DEFAULT_MAX_DMA_MAPS):
        assert (await qemu.dma_map(DEFAULT_GPA + i * 0x1000, 0x1000, ram.fd)).ok
    assert_error(await qemu.dma_map(0x1000, 0x1000, ram.fd), errno.ENOSPC)
    assert_error(await qemu.dma_map(0x1000, 0x1000), errno.ENOSPC)  # remote ones count too
    assert len(memory.regions) == DEFAULT_MAX_DMA_MAPS
    assert (await qemu.dma_unmap(0, 0, flags=p.DMA_UNMAP_FLAG_ALL)).ok
    assert open_fds() == baseline


async def test_the_dma_map_limit_is_a_server_parameter(
        sock_dir: Path, function: FakeFunction, memory: GuestMemory) -> None:
    srv = VfioUserServer(sock_dir / "few.sock", function, memory, max_dma_maps=3)
    await srv.start()
    try:
        client = await FakeQemu.connect(srv.path)
        assert client.accept_version(await client.version())["max_dma_maps"] == 3
        for i in range(3):
            assert (await client.dma_map(0x1000 * (i + 1), 0x1000)).ok
        assert_error(await client.dma_map(0x10000, 0x1000), errno.ENOSPC)
        await client.close()
        client = await FakeQemu.connect(srv.path)  # without the capability: the limit still
        client.accept_version(await client.version(b"{}"))
        for i in range(3):
            assert (await client.dma_map(0x1000 * (i + 1), 0x1000)).ok
        assert_error(await client.dma_map(0x10000, 0x1000), errno.ENOSPC)
        await client.close()
    finally:
        await srv.close()
    with pytest.raises(ValueError):
        VfioUserServer(sock_dir / "none.sock", function, memory, max_dma_maps=0)


@pytest.mark.parametrize("offset, size", [
    (1 << 63, 0x1000), ((1 << 64) - 0x1000, 0x1000), ((1 << 63) - 0x1000, 0x2000),
    (0, 1 << 63), (0, (1 << 64) - 0x1000),
])
async def test_offsets_and_sizes_past_2_63_are_einval_without_a_traceback(
        qemu: FakeQemu, memory: GuestMemory, ram: Memfd, caplog: pytest.LogCaptureFixture,
        offset: int, size: int) -> None:
    await qemu.version()
    assert_error(await qemu.dma_map(0, size, ram.fd, offset=offset), errno.EINVAL)
    assert_error(await qemu.dma_map(0, size, offset=offset), errno.EINVAL)
    assert memory.regions == []
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_deeply_nested_version_data_is_einval_without_a_traceback(
        qemu: FakeQemu, caplog: pytest.LogCaptureFixture) -> None:
    assert_error(await qemu.version(b"[" * 100_000), errno.EINVAL)
    assert_error(await qemu.version(b'{"capabilities": ' * 50_000), errno.EINVAL)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert (await qemu.version()).ok


# -- DMA through the client (maps without an fd) -----------------------------------------------


async def test_remote_memory_is_read_and_written_with_qemus_layout(
        server: VfioUserServer, qemu: FakeQemu, memory: GuestMemory) -> None:
    await qemu.version()
    size = 3 << 20
    bus = qemu.bus.add(REMOTE_GPA, size)
    bus[:] = random.Random(1).randbytes(size)
    assert (await qemu.dma_map(REMOTE_GPA, size)).ok
    piece = memory.piece(REMOTE_GPA + 0x10, size - 0x100 - 0x10, write=False)
    assert isinstance(piece, RemoteRange)
    assert await piece.read() == bytes(bus[0x10:size - 0x100])
    requests = [(r.command, *struct.unpack_from("<QI", r.payload), r.size)
                for r in qemu.dma_requests]
    assert [c for c, *_ in requests] == [q.DMA_READ] * 3  # chunks of at most 1 MiB
    assert all(n <= 1 << 20 and size_ == 32 for _, _, n, size_ in requests)
    assert sum(n for _, _, n, _ in requests) == size - 0x110
    qemu.dma_requests.clear()
    await memory.remote.write(REMOTE_GPA + 5, b"hello" * 300000)  # type: ignore[union-attr]
    assert bytes(bus[5:5 + 1500000]) == b"hello" * 300000
    assert [r.command for r in qemu.dma_requests] == [q.DMA_WRITE] * 2
    first = qemu.dma_requests[0]
    assert first.size == 32 + (1 << 20)  # data at message byte 28, then 4 bytes of padding
    assert first.payload[12:17] == b"hello" and first.payload[-4:] == bytes(4)
    assert server.stats["stray_replies"] == 0


async def test_remote_chunks_follow_the_negotiated_transfer_size(
        qemu: FakeQemu, memory: GuestMemory) -> None:
    qemu.accept_version(await qemu.version(b'{"capabilities": {"max_data_xfer_size": 4096}}'))
    qemu.bus.add(REMOTE_GPA, 0x10000)
    assert (await qemu.dma_map(REMOTE_GPA, 0x10000)).ok
    assert await memory.remote.read(REMOTE_GPA, 0x3000) == bytes(0x3000)  # type: ignore
    assert [struct.unpack_from("<QI", r.payload)[1] for r in qemu.dma_requests] == [4096] * 3
    assert qemu.violations == []  # nothing above max_data_xfer_size + 32


async def test_no_dma_outside_the_maps(qemu: FakeQemu, memory: GuestMemory) -> None:
    await qemu.version()
    qemu.bus.add(REMOTE_GPA, 0x2000)  # QEMU serves what the map does not cover: the server must not
    assert (await qemu.dma_map(REMOTE_GPA, 0x1000, flags=1)).ok  # read-only
    remote = memory.remote
    assert remote is not None
    with pytest.raises(MemoryAccessError):
        await remote.read(REMOTE_GPA + 0x1000, 4)
    with pytest.raises(MemoryAccessError):
        await remote.read(REMOTE_GPA + 0xFFE, 4)  # runs past the map
    with pytest.raises(MemoryAccessError):
        await remote.write(REMOTE_GPA, b"x")  # read-only map
    assert qemu.dma_requests == []
    assert await remote.read(REMOTE_GPA, 0) == b""


async def test_a_dma_error_reply_raises(qemu: FakeQemu, memory: GuestMemory) -> None:
    await qemu.version()
    assert (await qemu.dma_map(REMOTE_GPA, 0x1000)).ok  # but not on QEMU's bus
    with pytest.raises(MemoryAccessError, match="refused by the client"):
        await memory.remote.read(REMOTE_GPA, 8)  # type: ignore[union-attr]
    with pytest.raises(MemoryAccessError):
        await memory.remote.write(REMOTE_GPA, b"x")  # type: ignore[union-attr]


async def test_commands_are_answered_while_a_dma_request_is_outstanding(
        qemu: FakeQemu, memory: GuestMemory, function: FakeFunction) -> None:
    await qemu.version()
    qemu.bus.add(REMOTE_GPA, 0x1000)[:4] = b"data"
    assert (await qemu.dma_map(REMOTE_GPA, 0x1000)).ok
    qemu.hold_dma = True  # QEMU's main loop is busy (a vCPU waits on an MMIO reply)
    task = asyncio.create_task(memory.remote.read(REMOTE_GPA, 4))  # type: ignore[union-attr]
    await qemu.wait_dma_request()
    reply = await qemu.region_read(CONFIG, 0, 4)  # the deadlock rule: still answered
    assert reply.payload[16:] == bytes(function.config[:4])
    await qemu.region_write(0, 0, b"\x05", posted=True)
    assert (await qemu.region_read(0, 0, 1)).payload[16:] == b"\x05"
    assert not task.done()
    await qemu.release()
    assert await asyncio.wait_for(task, 5) == b"data"


async def test_outstanding_dma_fails_when_the_client_goes(
        server: VfioUserServer, qemu: FakeQemu, memory: GuestMemory) -> None:
    await qemu.version()
    assert (await qemu.dma_map(REMOTE_GPA, 0x1000)).ok
    qemu.hold_dma = True
    remote = memory.remote
    assert remote is not None
    task = asyncio.create_task(remote.read(REMOTE_GPA, 4))
    await qemu.wait_dma_request()
    await qemu.close()
    with pytest.raises(MemoryAccessError, match="disconnected"):
        await asyncio.wait_for(task, 5)
    await until(lambda: server.connection is None)
    assert memory.remote is None and memory.regions == []
    with pytest.raises(MemoryAccessError):
        await remote.read(REMOTE_GPA, 4)  # a stale handle fails too


async def test_a_dma_write_cut_by_a_disconnect_fails_instead_of_hanging(
        server: VfioUserServer, qemu: FakeQemu, memory: GuestMemory) -> None:
    await qemu.version()
    assert (await qemu.dma_map(REMOTE_GPA, 8 << 20)).ok
    await qemu.stop_reading()
    remote = memory.remote
    assert remote is not None
    task = asyncio.create_task(remote.write(REMOTE_GPA, bytes(4 << 20)))
    await asyncio.sleep(0.05)  # the socket buffer is full: the message is half sent
    assert not task.done()
    await qemu.close()
    with pytest.raises(MemoryAccessError):
        await asyncio.wait_for(task, 5)
    await until(lambda: server.connection is None)


async def test_a_dma_request_times_out(server: VfioUserServer, qemu: FakeQemu,
                                       memory: GuestMemory) -> None:
    await qemu.version()
    assert (await qemu.dma_map(REMOTE_GPA, 0x1000)).ok
    assert server.connection is not None
    server.connection.dma_timeout = 0.05
    qemu.hold_dma = True
    with pytest.raises(MemoryAccessError):
        await memory.remote.read(REMOTE_GPA, 4)  # type: ignore[union-attr]
    qemu.bus.add(REMOTE_GPA, 0x1000)
    await qemu.release()  # the late reply is dropped, the connection goes on
    await until(lambda: server.stats["stray_replies"] == 1)
    assert (await qemu.get_info()).ok


async def test_stray_replies_are_dropped(server: VfioUserServer, qemu: FakeQemu) -> None:
    await qemu.version()
    await qemu.send_raw(HDR.pack(77, q.DMA_READ, 16 + 16, 1, 0) + bytes(16))
    fd = eventfd()
    await qemu.send_raw(HDR.pack(78, q.DMA_WRITE, 16, 0x21, errno.EFAULT), [fd])
    os.close(fd)
    assert (await qemu.get_info()).ok
    assert server.stats["stray_replies"] == 2


# -- interrupts ------------------------------------------------------------------------------


async def test_set_irqs_eventfd_runs_reach_the_function(qemu: FakeQemu,
                                                        function: FakeFunction) -> None:
    await qemu.version()
    fds = [eventfd() for _ in range(VECTORS)]
    try:
        await qemu.enable_msix(fds[:1])
        assert function.irq_calls == [(MSIX, 0, 1), (MSIX, 0, 1)]
        assert function.deassigned == [(MSIX, 0)]  # "MSI-X on, vector 0 unassigned"
        reply = await qemu.set_irqs(MSIX, 1, 3, IRQ_EVENTFD | IRQ_TRIGGER, fds[1:])  # a run
        assert reply.ok and reply.size == 16
        for vector, fd in enumerate(fds):
            function.fire(vector)
            assert int.from_bytes(os.read(fd, 8), "little") == 1  # the client's eventfd
        assert (await qemu.set_irqs(MSIX, 2, 2, IRQ_EVENTFD | IRQ_TRIGGER)).ok  # de-assign
        assert function.deassigned[-2:] == [(MSIX, 2), (MSIX, 3)]
        assert set(function.eventfds) == {(MSIX, 0), (MSIX, 1)}
        assert (await qemu.set_irqs(MSIX, 0, 0, IRQ_NONE | IRQ_TRIGGER)).ok  # disable
        assert function.disabled == [MSIX] and function.eventfds == {}
    finally:
        for fd in fds:
            os.close(fd)


async def test_set_irqs_refusals_close_the_fds(qemu: FakeQemu, function: FakeFunction) -> None:
    await qemu.version()
    before = open_fds()
    a, b = eventfd(), eventfd()
    trigger = IRQ_EVENTFD | IRQ_TRIGGER
    assert_error(await qemu.set_irqs(MSIX, 0, 2, trigger, [a]), errno.EINVAL)  # 1 fd for 2
    assert_error(await qemu.set_irqs(MSIX, 3, 2, trigger, [a, b]), errno.EINVAL)  # past 4
    assert_error(await qemu.set_irqs(MSIX, 0, 0, trigger), errno.EINVAL)
    assert_error(await qemu.set_irqs(IrqIndex.MSI, 0, 1, trigger, [a]), errno.EINVAL)  # 0 MSI
    assert_error(await qemu.set_irqs(MSIX, 0, 1, IRQ_NONE | IRQ_TRIGGER, [a]), errno.EINVAL)
    assert_error(await qemu.set_irqs(MSIX, 0, 1, IRQ_NONE | IRQ_TRIGGER), errno.ENOTSUP)
    assert_error(await qemu.set_irqs(MSIX, 0, 1, IRQ_BOOL | IRQ_TRIGGER), errno.ENOTSUP)
    assert_error(await qemu.set_irqs(MSIX, 0, 1, IRQ_EVENTFD | IRQ_UNMASK, [a]), errno.EINVAL)
    assert_error(await qemu.set_irqs(MSIX, 0, 1, IRQ_NONE | IRQ_EVENTFD | IRQ_TRIGGER),
                 errno.EINVAL)
    assert_error(await qemu.set_irqs(MSIX, 0, 1, IRQ_NONE), errno.EINVAL)  # no action
    assert_error(await qemu.set_irqs(9, 0, 0, IRQ_NONE | IRQ_TRIGGER), errno.EINVAL)
    os.close(a)
    os.close(b)
    await until(lambda: open_fds() == before)
    assert function.eventfds == {}


async def test_intx_mask_and_unmask_are_accepted(qemu: FakeQemu) -> None:
    await qemu.version()
    before = open_fds()
    assert (await qemu.set_irqs(IrqIndex.INTX, 0, 1, IRQ_NONE | IRQ_UNMASK)).ok  # EOI
    assert (await qemu.set_irqs(IrqIndex.INTX, 0, 1, IRQ_NONE | IRQ_MASK)).ok
    fd = eventfd()
    assert (await qemu.set_irqs(IrqIndex.INTX, 0, 1, IRQ_EVENTFD | IRQ_UNMASK, [fd])).ok
    os.close(fd)
    assert (await qemu.set_irqs(IrqIndex.INTX, 0, 0, IRQ_NONE | IRQ_TRIGGER)).ok  # disable
    await until(lambda: open_fds() == before)  # the resample fd is not kept


async def test_more_eventfds_than_max_msg_fds_are_refused(qemu: FakeQemu,
                                                          function: FakeFunction) -> None:
    await qemu.version()
    function.irq_count = lambda index: 32  # type: ignore[method-assign]
    fds = [eventfd() for _ in range(17)]
    before = open_fds()
    assert_error(await qemu.set_irqs(MSIX, 0, 17, IRQ_EVENTFD | IRQ_TRIGGER, fds), errno.EINVAL)
    for fd in fds:
        os.close(fd)
    await until(lambda: open_fds() == before - 17)


# -- reset and the connection's life ---------------------------------------------------------


async def test_device_reset_keeps_the_dma_maps(qemu: FakeQemu, function: FakeFunction,
                                               memory: GuestMemory, ram: Memfd) -> None:
    await qemu.version()
    assert (await qemu.dma_map(DEFAULT_GPA, MEM_SIZE, ram.fd)).ok
    reply = await qemu.reset()
    assert reply.ok and reply.size == 16 and reply.payload == b""
    assert function.resets == 1 and len(memory.regions) == 1


async def test_disconnect_releases_everything_and_the_next_client_is_served(
        server: VfioUserServer, function: FakeFunction, memory: GuestMemory) -> None:
    baseline = open_fds()
    ram = Memfd()
    client = await FakeQemu.connect(server.path)
    await client.startup(ram.fd, MEM_SIZE, extra_maps=[(REMOTE_GPA, 0x1000)])
    fds = [eventfd() for _ in range(VECTORS)]
    await client.enable_msix(fds)
    assert memory.remote is not None and len(function.eventfds) == VECTORS
    await client.close()
    for fd in fds:
        os.close(fd)
    ram.close()
    await until(lambda: server.connection is None)
    assert function.disconnects == 1 and function.resets == 1  # no reset beyond QEMU's
    assert memory.regions == [] and memory.remote is None
    await until(lambda: open_fds() == baseline)
    assert client.violations == []
    again = await FakeQemu.connect(server.path)  # a restarted QEMU
    ram = Memfd()
    try:
        learnt = await again.startup(ram.fd, MEM_SIZE)
        assert learnt["config"] == bytes(function.config)  # device state kept
        assert server.connections == 2 and again.violations == []
    finally:
        await again.close()
        ram.close()


async def test_a_second_client_is_refused(server: VfioUserServer, qemu: FakeQemu) -> None:
    await qemu.version()
    second = await FakeQemu.connect(server.path)
    assert await second.closed()
    await second.close()
    assert (await qemu.get_info()).ok
    assert server.stats["refused_clients"] == 1 and server.connections == 1


async def test_quick_reconnects_are_not_refused(server: VfioUserServer) -> None:
    for _ in range(20):
        client = await negotiated(server)
        await client.close()  # and the next one connects at once
    assert server.connections == 20 and server.stats["refused_clients"] == 0


async def test_a_reset_connection_is_survived(server: VfioUserServer) -> None:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(server.path))
    body = struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON + b"\0"
    raw.sendall(HDR.pack(0, q.VERSION, 16 + len(body), 0, 0) + body)
    await asyncio.sleep(0.05)
    raw.close()  # with the reply unread: ECONNRESET on the server's side
    await until(lambda: server.connection is None)
    client = await negotiated(server)
    await client.close()


async def test_a_client_gone_before_its_replies_is_one_log_line(
        server: VfioUserServer, caplog: pytest.LogCaptureFixture) -> None:
    body = struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON + b"\0"
    reads = b"".join(HDR.pack(i + 1, q.REGION_READ, 32, 0, 0) + struct.pack("<QII", 0, 7, 256)
                     for i in range(300))
    for i in range(5):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(server.path))
        raw.sendall(HDR.pack(0, q.VERSION, 16 + len(body), 0, 0) + body + reads)
        raw.close()  # everything unread: EPIPE or ECONNRESET on the server's side
        await until(lambda n=i + 1: server.connections == n and server.connection is None)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    lost = [r for r in caplog.records if "pipe" in r.getMessage().lower()
            or "reset" in r.getMessage().lower()]
    assert len(lost) <= 5, [r.getMessage() for r in lost]
    client = await negotiated(server)
    await client.close()


async def test_eof_in_the_middle_of_a_message(server: VfioUserServer) -> None:
    client = await negotiated(server)
    await client.send_raw(HDR.pack(1, q.REGION_WRITE, 16 + 16 + 8, 0, 0) + bytes(10))
    await client.close()
    await until(lambda: server.connection is None)
    again = await negotiated(server)
    await again.close()


async def test_close_removes_the_socket_and_replaces_a_stale_one(
        sock_dir: Path, function: FakeFunction, memory: GuestMemory) -> None:
    path = sock_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    srv = VfioUserServer(path, function, memory)
    await srv.start()
    client = await negotiated(srv)
    await srv.close()
    assert not path.exists()
    assert await client.closed()
    await client.close()
    assert function.disconnects == 1


async def test_a_file_or_a_live_server_at_the_path_is_never_taken_over(
        server: VfioUserServer, sock_dir: Path, function: FakeFunction,
        memory: GuestMemory) -> None:
    path = sock_dir / "file"
    path.write_text("the user's")
    with pytest.raises(SocketPathError, match="exists and is not a socket"):
        await VfioUserServer(path, function, memory).start()
    assert path.read_text() == "the user's"
    second = VfioUserServer(server.path, function, memory)
    with pytest.raises(SocketPathError, match="already listening there"):
        await second.start()
    await second.close()  # never started: must not remove the live server's socket
    client = await negotiated(server)
    await client.close()


async def test_close_leaves_a_socket_file_it_did_not_create(
        sock_dir: Path, function: FakeFunction, memory: GuestMemory) -> None:
    path = sock_dir / "ep.sock"
    srv = VfioUserServer(path, function, memory)
    await srv.start()
    path.unlink()
    path.write_text("someone else's")
    await srv.close()
    assert path.read_text() == "someone else's"


# -- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize("command, size", [
    (q.VERSION, 2), (q.DMA_MAP, 31), (q.DMA_UNMAP, 23), (q.GET_INFO, 15), (q.REGION_INFO, 31),
    (q.IRQ_INFO, 15), (q.SET_IRQS, 19), (q.REGION_READ, 15), (q.REGION_WRITE, 15),
])
async def test_short_payloads_are_refused(server: VfioUserServer, command: int,
                                          size: int) -> None:
    client = await negotiated(server) if command != q.VERSION else \
        await FakeQemu.connect(server.path)
    reply = await client.call(command, bytes(size))
    assert_error(reply, errno.EINVAL)
    assert server.stats["refused"] == 1
    await client.close()
    assert client.violations == []


async def test_a_short_write_multi_is_refused_silently(server: VfioUserServer,
                                                        qemu: FakeQemu) -> None:
    await qemu.version()
    await qemu.send(q.WRITE_MULTI, bytes(7), flags=NO_REPLY)
    assert await qemu.silent()
    assert server.stats["refused"] == 1


@pytest.mark.parametrize("command", [99, 0, 6, 14, 16, 17, q.DMA_READ, q.DMA_WRITE])
async def test_unknown_commands_get_enosys(server: VfioUserServer, qemu: FakeQemu,
                                           command: int) -> None:
    await qemu.version()
    assert_error(await qemu.call(command, bytes(64)), errno.ENOSYS)
    assert (await qemu.get_info()).ok


@pytest.mark.parametrize("region, offset, count", [
    (9, 0, 4), (0xFFFFFFFF, 0, 4), (1, 0, 4),  # no such region; region not implemented
    (0, BAR0_SIZE - 2, 4), (0, 1 << 63, 4), (0, 0, 0), (CONFIG, 0, (1 << 20) + 1),
    (RegionIndex.ROM, 0, 4),
])
async def test_bad_region_accesses_are_refused(qemu: FakeQemu, region: int, offset: int,
                                               count: int) -> None:
    await qemu.version()
    assert_error(await qemu.call(q.REGION_READ, struct.pack("<QII", offset, region, count),
                                 rsize=32), errno.EINVAL)
    assert_error(await qemu.call(q.REGION_WRITE, struct.pack("<QII", offset, region, count)
                                 + bytes(min(count, 64))), errno.EINVAL)


async def test_write_count_must_match_the_data(qemu: FakeQemu) -> None:
    await qemu.version()
    assert_error(await qemu.call(q.REGION_WRITE, struct.pack("<QII", 0, 0, 8) + bytes(4)),
                 errno.EINVAL)


async def test_fds_on_a_command_without_fds_are_refused_and_closed(qemu: FakeQemu,
                                                                    ram: Memfd) -> None:
    await qemu.version()
    before = open_fds()
    a, b = eventfd(), eventfd()
    assert_error(await qemu.call(q.REGION_READ, struct.pack("<QII", 0, 0, 4), [a, b],
                                 rsize=36), errno.EINVAL)
    assert_error(await qemu.call(q.RESET, b"", [a]), errno.EINVAL)
    assert_error(await qemu.call(99, b"", [a]), errno.ENOSYS)
    assert_error(await qemu.call(q.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0x1000),
                                 [ram.fd, a]), errno.EINVAL)  # one map, two fds
    os.close(a)
    os.close(b)
    await until(lambda: open_fds() == before)


async def test_a_header_below_16_bytes_closes_only_that_connection(
        server: VfioUserServer, qemu: FakeQemu) -> None:
    await qemu.version()
    await qemu.send_raw(HDR.pack(5, q.GET_INFO, 8, 0, 0))
    assert await qemu.closed()
    assert server.stats["protocol_errors"] == 1
    client = await negotiated(server)
    await client.close()


async def test_an_oversized_message_is_answered_and_closes(server: VfioUserServer,
                                                           qemu: FakeQemu) -> None:
    await qemu.version()
    future = qemu.expect(200, q.REGION_WRITE, rsize=16)
    await qemu.send_raw(HDR.pack(200, q.REGION_WRITE, (2 << 20) + 32, 0, 0) + bytes(16))
    assert_error(await asyncio.wait_for(future, 5), errno.E2BIG)
    assert await qemu.closed()
    assert server.stats["protocol_errors"] == 1
    client = await negotiated(server)
    await client.close()


async def test_an_unknown_message_type_closes(server: VfioUserServer, qemu: FakeQemu) -> None:
    await qemu.version()
    await qemu.send_raw(HDR.pack(1, q.GET_INFO, 32, 0x2, 0) + bytes(16))
    assert await qemu.closed()
    assert server.stats["protocol_errors"] == 1


async def test_same_id_twice_is_answered_twice_in_order(qemu: FakeQemu) -> None:
    await qemu.version()
    first = await qemu.send(q.REGION_READ, struct.pack("<QII", 0, CONFIG, 2), rsize=34,
                            msg_id=9)
    second = await qemu.send(q.REGION_READ, struct.pack("<QII", 2, CONFIG, 2), rsize=34,
                             msg_id=9)
    assert first is not None and second is not None
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert (a.id, b.id) == (9, 9)
    assert a.payload[16:] == struct.pack("<H", 0x1AF4) and b.payload[16:] == b"\x44\x10"


async def test_fuzzed_payloads_never_break_the_server(server: VfioUserServer,
                                                      qemu: FakeQemu, ram: Memfd) -> None:
    await qemu.startup(ram.fd, MEM_SIZE)
    rng = random.Random(4)
    commands = [q.DMA_MAP, q.DMA_UNMAP, q.GET_INFO, q.REGION_INFO, q.IRQ_INFO, q.SET_IRQS,
                q.REGION_READ, q.REGION_WRITE, q.RESET, q.VERSION, 42]
    for _ in range(400):
        command = rng.choice(commands)
        size = rng.choice([0, 1, 4, 8, 16, 20, 24, 32, 40, rng.randrange(0, 300)])
        payload = bytearray(rng.randbytes(size))
        if size >= 16 and command in (q.REGION_READ, q.REGION_WRITE) and rng.random() < 0.5:
            struct.pack_into("<QII", payload, 0, rng.randrange(0, 0x5000),
                             rng.choice([0, 4, 7, 9]), rng.choice([1, 2, 4, 8, 256]))
        reply = await qemu.call(command, bytes(payload), rsize=1 << 21)
        assert reply.ok or (reply.size == 16 and reply.error > 0 and reply.flags == 0x21)
        if command == q.REGION_READ and reply.ok:
            assert reply.size == 32 + struct.unpack_from("<QII", payload)[2]
    assert (await qemu.region_read(CONFIG, 0, 4)).ok  # still serving
    assert server.stats["protocol_errors"] == 0 and server.connections == 1


async def test_a_failing_function_never_takes_the_server_down(
        server: VfioUserServer, function: FakeFunction) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("bug in the function")
    function.region_read = broken  # type: ignore[assignment]
    function.disconnect = broken  # type: ignore[assignment]
    client = await negotiated(server)
    assert_error(await client.region_read(CONFIG, 0, 4), errno.EIO)
    assert (await client.get_info()).ok
    await client.close()
    await until(lambda: server.connection is None)
    again = await negotiated(server)  # the next client is still served
    await again.close()


# -- what a gone client leaves behind ------------------------------------------------------


@pytest.mark.parametrize("ending", ["hang-up", "garbage", "mid-message"])
async def test_a_gone_client_is_freed_at_once_without_the_collector(
        server: VfioUserServer, memory: GuestMemory, ram: Memfd, ending: str) -> None:
    gc.disable()
    try:
        client = await negotiated(server)
        assert (await client.dma_map(DEFAULT_GPA, MEM_SIZE, ram.fd)).ok
        assert server.connection is not None
        conn = weakref.ref(server.connection)
        if ending == "garbage":
            await client.send_raw(b"\xff" * 64)
        elif ending == "mid-message":
            await client.send_raw(q.HDR.pack(client.new_id(), p.Command.DMA_UNMAP, 64, 0, 0))
        await client.close()
        await until(lambda: server.connection is None)
        assert conn() is None, gc.get_referrers(conn())
        assert memory.regions == []
    finally:
        gc.enable()
