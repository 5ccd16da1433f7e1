"""virtio-blk device model: requests through a real SplitQueue, with guest-physical DMA and
with an endpoint's DMA space behind the PV-IOMMU."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import random
import struct
from pathlib import Path

import pytest

from pviommu.devices import blk
from pviommu.devices.blk import (
    F_BLK_SIZE,
    F_FLUSH,
    F_RO,
    F_SEG_MAX,
    VirtioBlk,
)
from pviommu.dma import Access, DmaFault, PhysicalDma
from pviommu.iommu.dma_space import DomainDma
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import IommuConfig, PvIommu, Status
from pviommu.memory import RegionSpec
from pviommu.virtio.features import (
    F_ACCESS_PLATFORM,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    bit,
)
from pviommu.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from tests.fakes.dma import FakeRemote, RingsPhysical
from tests.fakes.virtio_driver import FakeDriver, RecordingTransport, memfd_memory

GPA = 0x40000000
MEM_SIZE = 1 << 21
RING_SPAN = 0x40000  # rings and the FakeDriver's buffers
DATA_GPA = GPA + 0x100000  # buffers reached through their own IOMMU mappings
IOVA = 0x10000000
REMOTE_GPA = GPA + MEM_SIZE  # a region without fd: only the "frontend" reaches it
REMOTE_SIZE = 0x10000
EP = 0x10
RW = MAP_F_READ | MAP_F_WRITE
SECTORS = 128
IN, OUT, FLUSH, GET_ID = 0, 1, 4, 8
OK, IOERR, UNSUPP = 0, 1, 2
POISON = 0xA5


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.fixture
def memory():
    mem, fd = memfd_memory(MEM_SIZE, GPA)
    mem.add_region(RegionSpec(REMOTE_GPA, REMOTE_SIZE, 0, 0), None)
    mem.remote = FakeRemote(REMOTE_GPA, REMOTE_SIZE)
    yield mem
    mem.clear()
    os.close(fd)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(4).randbytes(SECTORS * 512))
    return path


@pytest.fixture
def faults() -> list[DmaFault]:
    return []


@pytest.fixture
def iommu() -> PvIommu:
    iommu = PvIommu(IommuConfig(), endpoints=[EP])
    assert iommu.attach(1, EP, 0) == Status.OK
    return iommu


@pytest.fixture(params=["physical", "domain"])
def dma(request, memory, iommu, faults):
    """Guest-physical DMA, or the endpoint's domain with identity mappings of all memory
    (the remote region at IOVA as well)."""
    if request.param == "physical":
        return PhysicalDma(memory)
    assert iommu.map(1, GPA, GPA + MEM_SIZE - 1, GPA, RW) == Status.OK
    assert iommu.map(1, REMOTE_GPA, REMOTE_GPA + REMOTE_SIZE - 1, REMOTE_GPA, RW) == Status.OK
    return DomainDma(iommu, EP, memory, faults.append)


class Rig:
    """A VirtioBlk with its queue driven by a FakeDriver."""

    def __init__(self, dev: VirtioBlk, memory, dma, features: int | None = None,
                 event_idx: bool = False, qsize: int = 32) -> None:
        self.dev = dev
        self.memory = memory
        self.driver = FakeDriver(memory, GPA, qsize, span=RING_SPAN)
        self.transport = RecordingTransport()
        dev.transport = self.transport
        dev.set_driver_features(dev.offered_features() if features is None else features)
        self.queue = self.driver.queue(dma, event_idx=event_idx, indirect=True)
        dev.start_queue(0, self.queue)
        self.next_desc = 0

    # -- buffers and chains ------------------------------------------------------------

    def buf(self, data: bytes | int) -> int:
        """A readable buffer holding ``data``, or a writable one of that size, poisoned."""
        if isinstance(data, int):
            addr = self.driver.alloc(data)
            self.memory.write(addr, bytes([POISON]) * data)
            return addr
        return self.driver.buffer(data)

    def post(self, segs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Makes a chain of (addr, len, device-writable) descriptors available."""
        descs = [(a, n, DESC_F_WRITE if w else 0) for a, n, w in segs]
        if indirect:
            table = self.driver.alloc(16 * len(descs))
            for i, (a, n, f) in enumerate(descs):
                last = i == len(descs) - 1
                self.driver.write_desc(i, a, n, f | (0 if last else DESC_F_NEXT),
                                       0 if last else i + 1, table)
            descs = [(table, 16 * len(descs), DESC_F_INDIRECT)]
        idx = [(self.next_desc + i) % self.driver.size for i in range(len(descs))]
        self.next_desc = (self.next_desc + len(descs)) % self.driver.size
        for i, (a, n, f) in enumerate(descs):
            last = i == len(descs) - 1
            self.driver.write_desc(idx[i], a, n, f | (0 if last else DESC_F_NEXT),
                                   0 if last else idx[i + 1])
        self.driver.make_available(idx[0])
        return idx[0]

    async def run(self) -> list[tuple[int, int]]:
        """Publishes, kicks, waits for every request; returns the new used entries."""
        self.driver.publish()
        self.dev.kick(0)
        await idle(self.dev)
        return self.driver.used()

    async def read(self, sector: int, sizes: list[int] | int, rtype: int = IN
                   ) -> tuple[int, int, bytes]:
        """An IN request into writable buffers of ``sizes``: (used length, status, data)."""
        sizes = [sizes] if isinstance(sizes, int) else sizes
        bufs = [(self.buf(n), n, True) for n in sizes]
        status = self.buf(1)
        head = self.post([(self.buf(header(rtype, sector)), 16, False), *bufs,
                          (status, 1, True)])
        used = await self.run()
        assert [h for h, _ in used] == [head]
        data = b"".join(self.memory.read(a, n) for a, n, _ in bufs)
        return used[0][1], self.memory.read(status, 1)[0], data

    async def write(self, sector: int, parts: list[bytes] | bytes) -> tuple[int, int]:
        """An OUT request of readable ``parts``: (used length, status)."""
        parts = [parts] if isinstance(parts, bytes) else parts
        status = self.buf(1)
        head = self.post([(self.buf(header(OUT, sector)), 16, False),
                          *[(self.buf(p), len(p), False) for p in parts], (status, 1, True)])
        used = await self.run()
        assert [h for h, _ in used] == [head]
        return used[0][1], self.memory.read(status, 1)[0]


@pytest.fixture
def dev(image):
    d = VirtioBlk(image, serial="disk-0")
    yield d
    d.close()


@pytest.fixture
def rig(dev, memory, dma):
    return Rig(dev, memory, dma)


def sectors(image: Path, first: int, count: int = 1) -> bytes:
    return image.read_bytes()[first * 512:(first + count) * 512]


async def idle(dev) -> None:
    """Waits for the device's requests, failing instead of hanging."""
    await asyncio.wait_for(dev.wait_idle(), 5)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- features and config ---------------------------------------------------------------------


def test_features_and_config(image):
    dev = VirtioBlk(image)
    base = (bit(F_VERSION_1) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH)
            | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX))
    assert dev.offered_features() == base | bit(F_ACCESS_PLATFORM)
    assert dev.device_id == 2 and dev.num_queues == 1 and dev.queue_max_size == 256
    cfg = dev.config_bytes()
    assert len(cfg) == 96
    assert struct.unpack_from("<Q", cfg, 0)[0] == SECTORS
    assert struct.unpack_from("<I", cfg, 0x0C)[0] == 254
    assert struct.unpack_from("<I", cfg, 0x14)[0] == 512
    assert cfg[8:12] == bytes(4) and cfg[0x10:0x14] == bytes(4) and cfg[0x18:] == bytes(72)
    assert dev.read_config(0x14, 4) == struct.pack("<I", 512)
    dev.close()
    dev = VirtioBlk(image, read_only=True, access_platform=False, queue_size=64)
    assert dev.offered_features() == base | bit(F_RO)
    assert dev.queue_max_size == 64
    assert struct.unpack_from("<I", dev.config_bytes(), 0x0C)[0] == 62
    dev.close()


@pytest.mark.parametrize("kwargs", [{"queue_size": 100}, {"queue_size": 2},
                                    {"queue_size": 65536}, {"serial": "x" * 21},
                                    {"serial": "dísk"}])
def test_bad_parameters_are_refused(image, kwargs):
    with pytest.raises(ValueError):
        VirtioBlk(image, **kwargs)


def test_an_image_not_a_multiple_of_512_has_an_unaddressable_tail(tmp_path, caplog):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(3 * 512 + 100))
    with caplog.at_level(logging.WARNING):
        dev = VirtioBlk(path)
    assert dev.capacity == 3
    assert struct.unpack_from("<Q", dev.config_bytes())[0] == 3
    assert "100 bytes cannot be addressed" in caplog.text
    dev.close()


async def test_the_tail_of_an_odd_image_is_not_readable(tmp_path, memory, dma):
    path = tmp_path / "odd.img"
    content = random.Random(5).randbytes(3 * 512 + 100)
    path.write_bytes(content)
    dev = VirtioBlk(path)
    rig = Rig(dev, memory, dma)
    assert await rig.read(2, 512) == (513, OK, content[1024:1536])
    n, status, data = await rig.read(3, 512)
    assert (n, status, data) == (1, IOERR, bytes([POISON]) * 512)
    dev.close()


# -- reads, writes, flush, get-id --------------------------------------------------------------


async def test_read(rig, image):
    assert await rig.read(5, 1024) == (1025, OK, sectors(image, 5, 2))
    assert rig.transport.notified == [0]
    assert rig.dev.stats["bytes_read"] == 1024
    assert rig.dev.stats["requests"] == {"IN": 1}


async def test_write_then_read_back(rig, image):
    data = random.Random(6).randbytes(1024)
    assert await rig.write(7, data) == (1, OK)
    assert sectors(image, 7, 2) == data
    assert await rig.read(7, 1024) == (1025, OK, data)
    assert rig.dev.stats["bytes_written"] == 1024


async def test_multi_segment_read_and_write(rig, image):
    n, status, data = await rig.read(3, [512, 1024, 512])
    assert (n, status) == (2049, OK) and data == sectors(image, 3, 4)
    parts = [random.Random(i).randbytes(s) for i, s in enumerate([1024, 512, 2048])]
    assert await rig.write(20, parts) == (1, OK)
    assert sectors(image, 20, 7) == b"".join(parts)


async def test_segments_not_sector_sized_are_fine(rig, image):
    n, status, data = await rig.read(0, [100, 700, 224])
    assert (n, status) == (1025, OK) and data == sectors(image, 0, 2)


async def test_read_at_the_last_sector(rig, image):
    assert await rig.read(SECTORS - 1, 512) == (513, OK, sectors(image, SECTORS - 1))


async def test_zero_length_read_and_write(rig, image):
    before = image.read_bytes()
    assert await rig.read(SECTORS, []) == (1, OK, b"")
    assert await rig.write(0, []) == (1, OK)
    assert image.read_bytes() == before


async def test_get_id(rig):
    assert await rig.read(0, 20, rtype=GET_ID) == (21, OK, b"disk-0".ljust(20, b"\0"))
    assert rig.dev.stats["requests"] == {"GET_ID": 1}


async def test_get_id_of_a_20_byte_serial_has_no_nul(image, memory, dma):
    dev = VirtioBlk(image, serial="S" * 20)
    rig = Rig(dev, memory, dma)
    assert await rig.read(0, 20, rtype=GET_ID) == (21, OK, b"S" * 20)
    n, status, data = await rig.read(0, 8, rtype=GET_ID)  # a short buffer gets a prefix
    assert (n, status, data) == (9, OK, b"S" * 8)
    dev.close()


async def test_flush_syncs_after_completed_writes(rig, image, monkeypatch):
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append((fd, rig.driver.used_idx())))
    data = bytes([7]) * 512
    assert await rig.write(1, data) == (1, OK)
    assert calls == []  # FLUSH negotiated: writes are not synced one by one
    assert sectors(image, 1) == data  # but they reached the image before completing
    n, status, _ = await rig.read(0, [], rtype=FLUSH)
    assert (n, status) == (1, OK)
    assert calls == [(rig.dev.fd, 1)]  # synced before the flush completed
    assert rig.dev.stats["requests"] == {"OUT": 1, "FLUSH": 1}


async def test_without_flush_negotiated_every_write_is_synced_before_completing(
        dev, memory, dma, image, monkeypatch):
    rig = Rig(dev, memory, dma, features=dev.offered_features() & ~bit(F_FLUSH))
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append((fd, rig.driver.used_idx())))
    assert await rig.write(2, bytes(512)) == (1, OK)
    assert calls == [(dev.fd, 0)]


async def test_a_failing_sync_is_an_ioerr(rig, monkeypatch, caplog):
    def broken(fd):
        raise OSError(errno.EIO, "disk gone")
    monkeypatch.setattr(os, "fdatasync", broken)
    with caplog.at_level(logging.ERROR):
        n, status, _ = await rig.read(0, [], rtype=FLUSH)
    assert (n, status) == (1, IOERR)
    assert "disk gone" in caplog.text
    assert rig.dev.stats["io_errors"] == 1 and rig.dev.stats["errors"] == 1


async def test_event_idx_ring(dev, memory, dma, image):
    rig = Rig(dev, memory, dma, event_idx=True)
    rig.driver.used_event = 0
    assert await rig.read(1, 512) == (513, OK, sectors(image, 1))
    assert rig.transport.notified == [0]
    assert rig.driver.avail_event == 1


# -- framing ----------------------------------------------------------------------------------


async def test_header_split_over_three_descriptors(rig, image):
    hdr = header(IN, 9)
    data = rig.buf(1024)
    status = rig.buf(1)
    head = rig.post([(rig.buf(hdr[:5]), 5, False), (rig.buf(hdr[5:12]), 7, False),
                     (rig.buf(hdr[12:]), 4, False), (data, 1024, True), (status, 1, True)])
    assert await rig.run() == [(head, 1025)]
    assert rig.memory.read(status, 1) == bytes([OK])
    assert rig.memory.read(data, 1024) == sectors(image, 9, 2)


async def test_header_and_data_in_one_descriptor(rig, image):
    payload = random.Random(8).randbytes(512)
    status = rig.buf(1)
    head = rig.post([(rig.buf(header(OUT, 4) + payload), 528, False), (status, 1, True)])
    assert await rig.run() == [(head, 1)]
    assert rig.memory.read(status, 1) == bytes([OK])
    assert sectors(image, 4) == payload


async def test_status_sharing_a_descriptor_with_data(rig, image):
    both = rig.buf(513)
    head = rig.post([(rig.buf(header(IN, 6)), 16, False), (both, 513, True)])
    assert await rig.run() == [(head, 513)]
    assert rig.memory.read(both, 513) == sectors(image, 6) + bytes([OK])


async def test_extra_writable_bytes_of_a_write_are_left_alone(rig, image):
    tail = rig.buf(4)
    head = rig.post([(rig.buf(header(OUT, 0)), 16, False), (rig.buf(bytes(512)), 512, False),
                     (tail, 4, True)])
    assert await rig.run() == [(head, 1)]
    assert rig.memory.read(tail, 4) == bytes([POISON] * 3 + [OK])
    assert sectors(image, 0) == bytes(512)


async def test_indirect_chain(rig, image):
    data = rig.buf(512)
    status = rig.buf(1)
    head = rig.post([(rig.buf(header(IN, 11)), 16, False), (data, 512, True),
                     (status, 1, True)], indirect=True)
    assert await rig.run() == [(head, 513)]
    assert rig.memory.read(data, 512) == sectors(image, 11)
    assert rig.memory.read(status, 1) == bytes([OK])


async def test_readable_bytes_are_never_written(rig):
    hdr = rig.buf(header(IN, 0) + bytes([POISON]) * 32)  # readable bytes past the header
    status = rig.buf(1)
    head = rig.post([(hdr, 48, False), (rig.buf(512), 512, True), (status, 1, True)])
    assert await rig.run() == [(head, 513)]
    assert rig.memory.read(hdr, 48) == header(IN, 0) + bytes([POISON]) * 32


# -- refused requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("sector,size", [(SECTORS, 512), (SECTORS - 1, 1024), (0, 100),
                                         (3, 600), ((1 << 64) - 1, 512), (SECTORS + 1, 0)])
async def test_out_of_range_or_misaligned_requests_are_ioerr_and_touch_nothing(
        rig, image, sector, size):
    before = image.read_bytes()
    n, status, data = await rig.read(sector, size)
    assert (n, status, data) == (1, IOERR, bytes([POISON]) * size)
    assert await rig.write(sector, bytes([1]) * size) == (1, IOERR)
    assert image.read_bytes() == before
    assert rig.dev.stats["errors"] == 2


async def test_read_only_device(image, memory, dma):
    dev = VirtioBlk(image, read_only=True)
    assert fcntl.fcntl(dev.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    rig = Rig(dev, memory, dma)
    before = image.read_bytes()
    assert await rig.write(0, bytes(512)) == (1, IOERR)
    assert image.read_bytes() == before
    assert dev.stats["errors"] == 1 and dev.stats["io_errors"] == 0  # refused, not tried
    assert await rig.read(0, 512) == (513, OK, before[:512])
    n, status, _ = await rig.read(0, [], rtype=FLUSH)
    assert (n, status) == (1, OK)
    dev.close()


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 11, 13, 14, 15, 99, 0xFFFFFFFF])
async def test_unsupported_types_are_unsupp(rig, image, rtype):
    before = image.read_bytes()
    n, status, data = await rig.read(0, 512, rtype=rtype)
    assert (n, status, data) == (1, UNSUPP, bytes([POISON]) * 512)
    assert image.read_bytes() == before
    assert rig.dev.stats["unsupported"] == 1
    assert rig.dev.stats["requests"] == {f"TYPE_{rtype}": 1}


async def test_a_chain_without_status_byte_is_completed_unwritten(rig, caplog):
    hdr = rig.buf(header(IN, 0))
    with caplog.at_level(logging.ERROR):
        head = rig.post([(hdr, 16, False)])
        assert await rig.run() == [(head, 0)]
    assert "no writable status byte" in caplog.text
    assert not rig.dev.needs_reset
    assert rig.dev.stats["malformed"] == 1


@pytest.mark.parametrize("readable", [[], [8], [10, 5]])
async def test_a_short_header_is_ioerr(rig, readable):
    status = rig.buf(1)
    segs = [(rig.buf(header(IN, 0)[:n]), n, False) for n in readable]
    head = rig.post([*segs, (rig.buf(512), 512, True), (status, 1, True)])
    assert await rig.run() == [(head, 1)]
    assert rig.memory.read(status, 1) == bytes([IOERR])
    assert not rig.dev.needs_reset


async def test_a_data_address_outside_guest_memory_is_ioerr(dev, memory, image):
    rig = Rig(dev, memory, PhysicalDma(memory))
    status = rig.buf(1)
    head = rig.post([(rig.buf(header(IN, 0)), 16, False), (rig.buf(512), 512, True),
                     (GPA + MEM_SIZE + REMOTE_SIZE, 512, True), (status, 1, True)])
    assert await rig.run() == [(head, 1)]
    assert rig.memory.read(status, 1) == bytes([IOERR])
    assert dev.stats["memory_errors"] == 1 and dev.stats["faults"] == 0


async def test_image_io_errors_are_ioerr(rig, image, monkeypatch, caplog):
    def broken(*args):
        raise OSError(errno.EIO, "medium error")
    monkeypatch.setattr(os, "pwritev", broken)
    with caplog.at_level(logging.ERROR):
        assert await rig.write(0, bytes(512)) == (1, IOERR)
    assert "medium error" in caplog.text
    assert rig.dev.stats["io_errors"] == 1


async def test_an_image_shrunk_behind_the_devices_back_reads_ioerr(rig, image):
    os.truncate(image, 10 * 512)
    n, status, _ = await rig.read(SECTORS - 1, 512)
    assert (n, status) == (1, IOERR)


async def test_short_transfers_and_iov_max_are_handled(rig, image, monkeypatch):
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short(real):
        def call(fd, views, offset):
            assert len(views) <= 2
            first = memoryview(views[0])[:100]  # at most 100 bytes a call
            return real(fd, [first], offset)
        return call
    monkeypatch.setattr(blk, "IOV_MAX", 2)
    monkeypatch.setattr(os, "preadv", short(real_preadv))
    monkeypatch.setattr(os, "pwritev", short(real_pwritev))
    n, status, data = await rig.read(2, [512, 256, 256, 1024])
    assert (n, status) == (2049, OK) and data == sectors(image, 2, 4)
    parts = [random.Random(i).randbytes(512) for i in range(3)]
    assert await rig.write(40, parts) == (1, OK)
    assert sectors(image, 40, 3) == b"".join(parts)


async def test_stats(rig):
    await rig.read(0, 512)
    await rig.write(0, bytes(1024))
    await rig.read(0, [], rtype=GET_ID)
    await rig.read(SECTORS, 512)
    await rig.read(0, 0, rtype=77)
    s = rig.dev.stats
    assert s["requests"] == {"IN": 2, "OUT": 1, "GET_ID": 1, "TYPE_77": 1}
    assert (s["bytes_read"], s["bytes_written"], s["errors"], s["unsupported"]) == (
        512, 1024, 1, 1)


# -- translation through the PV-IOMMU ---------------------------------------------------------


@pytest.fixture
def ep(dev, memory, iommu, faults):
    """A rig whose rings and driver buffers are identity-mapped; DATA_GPA is reachable at
    IOVA only through mappings a test adds."""
    assert iommu.map(1, GPA, GPA + RING_SPAN - 1, GPA, RW) == Status.OK
    memory.write(DATA_GPA, bytes([POISON]) * 0x4000)
    return Rig(dev, memory, DomainDma(iommu, EP, memory, faults.append))


def changed(before: bytes, after: bytes) -> set[int]:
    return {GPA + i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}


def ring_bytes(rig: Rig) -> set[int]:
    """What a request may change besides its status byte: the used ring (and avail_event),
    and the available index the test publishes."""
    d = rig.driver
    return set(range(d.used_ring, d.used_ring + 6 + 8 * d.size + 2)) | {d.avail + 2, d.avail + 3}


async def test_read_and_write_through_mappings(ep, iommu, image, faults):
    assert iommu.map(1, IOVA, IOVA + 0xFFF, DATA_GPA + 0x2000, RW) == Status.OK
    assert iommu.map(1, IOVA + 0x1000, IOVA + 0x1FFF, DATA_GPA, RW) == Status.OK
    status = ep.buf(1)
    head = ep.post([(ep.buf(header(IN, 8)), 16, False), (IOVA + 0xE00, 1024, True),
                    (status, 1, True)])
    assert await ep.run() == [(head, 1025)]
    assert ep.memory.read(DATA_GPA + 0x2E00, 512) == sectors(image, 8)
    assert ep.memory.read(DATA_GPA, 512) == sectors(image, 9)
    ep.memory.write(DATA_GPA, bytes([3]) * 512)
    head = ep.post([(ep.buf(header(OUT, 0)), 16, False), (IOVA + 0x1000, 512, False),
                    (status, 1, True)])
    assert await ep.run() == [(head, 1)]
    assert sectors(image, 0) == bytes([3]) * 512
    assert faults == []


async def test_a_write_from_a_write_only_mapping_faults(ep, iommu, image, faults):
    assert iommu.map(1, IOVA, IOVA + 0xFFF, DATA_GPA, MAP_F_WRITE) == Status.OK
    ep.memory.write(DATA_GPA, bytes([9]) * 512)
    status = ep.buf(1)
    head = ep.post([(ep.buf(header(OUT, 0)), 16, False), (IOVA, 512, False),
                    (status, 1, True)])
    before_img = image.read_bytes()
    before = ep.memory.read(GPA, MEM_SIZE)
    assert await ep.run() == [(head, 1)]
    assert ep.memory.read(status, 1) == bytes([IOERR])
    assert [(f.address, f.access, f.reason, f.endpoint) for f in faults] == [
        (IOVA, Access.READ, "MAPPING", EP)]
    assert image.read_bytes() == before_img
    assert changed(before, ep.memory.read(GPA, MEM_SIZE)) <= ring_bytes(ep) | {status}
    assert ep.dev.stats["faults"] == 1 and ep.dev.stats["errors"] == 1
    assert ep.transport.notified == [0] and not ep.dev.needs_reset


async def test_a_read_into_a_read_only_mapping_faults(ep, iommu, image, faults):
    assert iommu.map(1, IOVA, IOVA + 0xFFF, DATA_GPA, MAP_F_READ) == Status.OK
    status = ep.buf(1)
    head = ep.post([(ep.buf(header(IN, 0)), 16, False), (IOVA, 512, True),
                    (status, 1, True)])
    before = ep.memory.read(GPA, MEM_SIZE)
    assert await ep.run() == [(head, 1)]
    assert ep.memory.read(status, 1) == bytes([IOERR])
    assert [(f.address, f.access, f.reason) for f in faults] == [
        (IOVA, Access.WRITE, "MAPPING")]
    assert changed(before, ep.memory.read(GPA, MEM_SIZE)) <= ring_bytes(ep) | {status}
    assert ep.memory.read(DATA_GPA, 512) == bytes([POISON]) * 512


async def test_a_fault_in_a_later_segment_leaves_the_earlier_ones_untouched(
        ep, iommu, faults):
    assert iommu.map(1, IOVA, IOVA + 0xFFF, DATA_GPA, RW) == Status.OK
    assert iommu.map(1, IOVA + 0x1000, IOVA + 0x1FFF, DATA_GPA + 0x1000, MAP_F_READ) \
        == Status.OK
    status = ep.buf(1)
    head = ep.post([(ep.buf(header(IN, 0)), 16, False), (IOVA, 512, True),
                    (IOVA + 0x1000, 512, True), (status, 1, True)])
    before = ep.memory.read(GPA, MEM_SIZE)
    assert await ep.run() == [(head, 1)]
    assert ep.memory.read(status, 1) == bytes([IOERR])
    assert [f.address for f in faults] == [IOVA + 0x1000]
    assert changed(before, ep.memory.read(GPA, MEM_SIZE)) <= ring_bytes(ep) | {status}


async def test_an_unmapped_header_is_ioerr(ep, faults):
    status = ep.buf(1)
    head = ep.post([(IOVA, 16, False), (ep.buf(512), 512, True), (status, 1, True)])
    assert await ep.run() == [(head, 1)]
    assert ep.memory.read(status, 1) == bytes([IOERR])
    assert [(f.address, f.access) for f in faults] == [(IOVA, Access.READ)]


async def test_an_unmapped_status_byte_completes_with_zero_and_touches_nothing(
        ep, iommu, image, faults, caplog):
    assert iommu.map(1, IOVA, IOVA + 0xFFF, DATA_GPA, RW) == Status.OK
    ep.memory.write(DATA_GPA, bytes([1]) * 512)
    w = ep.post([(ep.buf(header(OUT, 0)), 16, False), (IOVA, 512, False),
                 (IOVA + 0x2000, 1, True)])
    r = ep.post([(ep.buf(header(IN, 0)), 16, False), (IOVA, 512, True),
                 (IOVA + 0x2000, 1, True)])
    before_img = image.read_bytes()
    before = ep.memory.read(GPA, MEM_SIZE)
    with caplog.at_level(logging.ERROR):
        assert sorted(await ep.run()) == sorted([(w, 0), (r, 0)])
    assert "status byte unreachable" in caplog.text
    assert [(f.address, f.access) for f in faults] == [(IOVA + 0x2000, Access.WRITE)] * 2
    assert image.read_bytes() == before_img
    assert changed(before, ep.memory.read(GPA, MEM_SIZE)) <= ring_bytes(ep)


async def test_an_unattached_endpoint_faults_with_domain(dev, memory, faults):
    iommu = PvIommu(IommuConfig(), endpoints=[EP])
    rig = Rig(dev, memory, RingsPhysical(memory, DomainDma(iommu, EP, memory, faults.append)))
    status = rig.buf(1)
    data = rig.buf(512)
    head = rig.post([(rig.buf(header(IN, 0)), 16, False), (data, 512, True),
                     (status, 1, True)])
    assert await rig.run() == [(head, 0)]
    assert [(f.reason, f.access) for f in faults] == [("DOMAIN", Access.WRITE)]
    assert rig.memory.read(status, 1) == bytes([POISON])
    assert rig.memory.read(data, 512) == bytes([POISON]) * 512
    assert rig.transport.notified == [0]


# -- memory only the frontend reaches --------------------------------------------------------


async def test_read_into_remote_memory(rig, image, memory, monkeypatch):
    monkeypatch.setattr(blk, "CHUNK", 1024)  # several bounce buffers
    remote = memory.remote
    local = rig.buf(512)
    status = rig.buf(1)
    head = rig.post([(rig.buf(header(IN, 4)), 16, False), (local, 512, True),
                     (REMOTE_GPA + 0x100, 2048, True), (status, 1, True)])
    assert await rig.run() == [(head, 2561)]
    assert memory.read(local, 512) == sectors(image, 4)
    assert bytes(remote.mem[0x100:0x900]) == sectors(image, 5, 4)
    assert remote.writes and all(n <= 1024 for _, n in remote.writes)
    assert memory.read(status, 1) == bytes([OK])


async def test_write_from_remote_memory(rig, image, memory):
    remote = memory.remote
    payload = random.Random(9).randbytes(1024)
    remote.mem[0:1024] = payload
    status = rig.buf(1)
    head = rig.post([(rig.buf(header(OUT, 12)), 16, False), (REMOTE_GPA, 1024, False),
                     (status, 1, True)])
    assert await rig.run() == [(head, 1)]
    assert sectors(image, 12, 2) == payload
    assert remote.reads == [(REMOTE_GPA, 1024)]


async def test_remote_header_and_status(rig, image, memory):
    remote = memory.remote
    remote.mem[0:16] = header(IN, 2)
    head = rig.post([(REMOTE_GPA, 16, False), (REMOTE_GPA + 0x200, 512, True),
                     (REMOTE_GPA + 0x400, 1, True)])
    assert await rig.run() == [(head, 513)]
    assert bytes(remote.mem[0x200:0x400]) == sectors(image, 2)
    assert remote.mem[0x400] == OK


async def test_remote_memory_without_a_frontend_is_ioerr(rig, memory):
    memory.remote = None
    status = rig.buf(1)
    head = rig.post([(rig.buf(header(IN, 0)), 16, False), (REMOTE_GPA, 512, True),
                     (status, 1, True)])
    assert await rig.run() == [(head, 1)]
    assert memory.read(status, 1) == bytes([IOERR])


@pytest.mark.parametrize("rtype", [IN, OUT])
async def test_reset_while_awaiting_remote_dma_leaves_the_ring_alone(rig, image, memory,
                                                                     rtype):
    remote = memory.remote
    remote.gate = asyncio.Event()
    remote.mem[0:512] = bytes([0x42]) * 512
    status = rig.buf(1)
    head = rig.post([(rig.buf(header(rtype, 0)), 16, False),
                     (REMOTE_GPA, 512, rtype == IN), (status, 1, True)])
    rig.driver.publish()
    rig.dev.kick(0)
    await settle()
    assert remote.reads or remote.writes  # the request is waiting for the frontend
    before_img = image.read_bytes()
    rig.dev.reset()
    remote.gate.set()
    await idle(rig.dev)
    assert rig.driver.used_idx() == 0
    assert rig.transport.notified == []
    assert memory.read(status, 1) == bytes([POISON])
    assert image.read_bytes() == before_img
    assert head not in [h for h, _ in rig.driver.used()]


async def test_requests_complete_out_of_order(rig, image, memory):
    remote = memory.remote
    remote.gate = asyncio.Event()
    slow_status = rig.buf(1)
    slow = rig.post([(rig.buf(header(OUT, 0)), 16, False), (REMOTE_GPA, 512, False),
                     (slow_status, 1, True)])
    fast_status = rig.buf(1)
    fast = rig.post([(rig.buf(header(IN, 1)), 16, False), (rig.buf(512), 512, True),
                     (fast_status, 1, True)])
    rig.driver.publish()
    rig.dev.kick(0)
    await settle()
    assert rig.driver.used() == [(fast, 513)]
    remote.gate.set()
    await idle(rig.dev)
    assert rig.driver.used() == [(slow, 1)]
    assert sectors(image, 0) == bytes(512)
