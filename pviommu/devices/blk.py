"""virtio-blk (device id 2): a block device backed by an image file.

One request queue; each request runs in its own task and requests may
complete out of order. Supported: IN, OUT, FLUSH and GET_ID; every other type
is answered UNSUPP.

Framing is the driver's choice: the first 16 device-readable bytes are the
header, the last device-writable byte is the status, the data lies in between
(readable for OUT, writable for IN and GET_ID). Every buffer a request uses is
resolved in the queue's DMA space (for an endpoint: its PV-IOMMU domain)
before any byte is moved, so a request whose translation fails touches
neither guest memory nor the image: it is completed with VIRTIO_BLK_S_IOERR
(the DMA space has already reported the fault). A request whose status byte
cannot be reached is completed with used length 0 and an error in the log:
no request is ever left pending.

The capacity is the image size in 512-byte sectors, rounded down: the tail of
an image whose size is not a multiple of 512 cannot be addressed. Image I/O is
synchronous (``os.preadv``/``os.pwritev``, zero-copy into guest memory when
every piece is local, through a bounce buffer of at most :data:`CHUNK` bytes
otherwise); ``fdatasync`` runs in the loop's default executor.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..dma import (
    DMA_ERRORS,
    Access,
    DmaFault,
    DmaSpace,
    TranslationMiss,
    load,
    local_views,
    piece_len,
    store,
)
from ..memory import Piece
from ..virtio.device import VirtioDevice, resolve_segments, split_pieces
from ..virtio.features import F_EVENT_IDX, F_INDIRECT_DESC, bit
from ..virtio.queue import MAX_QUEUE_SIZE, Chain, SplitQueue
from .traced import Traced, TracedRequests

log = logging.getLogger(__name__)

DEVICE_ID = 2
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9

SECTOR = 512
HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
CONFIG_SIZE = 96
CONFIG_CAPACITY = 0x00
CONFIG_SEG_MAX = 0x0C
CONFIG_BLK_SIZE = 0x14
ID_BYTES = 20
CHUNK = 1 << 20
DEFAULT_SERIAL = "pviommu"

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - Linux always has it
    IOV_MAX = 1024


class RequestType(enum.IntEnum):
    """The virtio-blk request types this device implements."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8


_KINDS = {t.value: (t, t.name) for t in RequestType}


class Status(enum.IntEnum):
    """virtio-blk status byte values."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    if views and n:
        views = [views[0][n:], *views[1:]]
    return views


def _vectored(op: Callable[[int, list[memoryview], int], int], fd: int,
              views: list[memoryview], offset: int, stalled: str) -> None:
    """Runs ``op`` (os.preadv or os.pwritev) until every byte of ``views`` moved;
    OSError(EIO) with ``stalled`` (formatted with ``offset``) if a call moves nothing."""
    views = [v for v in views if len(v)]
    while views:
        n = op(fd, views[:IOV_MAX], offset)
        if n == 0:
            raise OSError(errno.EIO, stalled.format(offset=offset))
        offset += n
        views = _advance(views, n)


def preadv_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Fills ``views`` from ``fd`` at ``offset``; OSError(EIO) if the file ends first."""
    _vectored(os.preadv, fd, views, offset, "image ends at {offset}, before the request's end")


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Writes ``views`` to ``fd`` at ``offset``."""
    _vectored(os.pwritev, fd, views, offset, "image write at {offset} made no progress")


def _seen_kind(rtype: int) -> str:
    return RequestType(rtype).name if rtype in set(RequestType) else f"TYPE_{rtype}"


def _data_length(rtype: int, chain: Chain) -> int:
    """The data bytes a request of type ``rtype`` asks to move."""
    if rtype == RequestType.IN:
        return max(chain.writable_len - 1, 0)
    if rtype == RequestType.OUT:
        return chain.readable_len - HEADER.size
    if rtype == RequestType.GET_ID:
        return min(max(chain.writable_len - 1, 0), ID_BYTES)
    return 0


class _Refused(Exception):
    """A request that ends with ``status`` before any data moves."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.name)
        self.status = status


class VirtioBlk(TracedRequests, VirtioDevice):
    """A virtio-blk device over the image file ``image``.

    ``serial`` (at most 20 ASCII bytes) answers GET_ID. ``queue_size`` is the
    largest queue the driver may configure; ``seg_max`` is two less, so that
    header, data and status fit one ring. ``access_platform`` offers
    VIRTIO_F_ACCESS_PLATFORM (an endpoint behind the PV-IOMMU).

    ``stats`` (for QMP): ``requests`` by type name (unknown ones as
    ``TYPE_n``), ``bytes_read``/``bytes_written`` (image side), ``errors``
    (IOERR answers), ``unsupported`` (UNSUPP answers), ``faults`` (failed
    translations), ``memory_errors`` (addresses outside guest memory),
    ``io_errors`` (image I/O errors) and ``malformed`` (chains without header or
    status byte).
    """

    device_id = DEVICE_ID
    num_queues = 1
    name = "virtio-blk"
    resubmittable = True  # a request done again writes or reads the same blocks

    def __init__(self, image: Path, *, read_only: bool = False, serial: str = DEFAULT_SERIAL,
                 access_platform: bool = True, queue_size: int = 256) -> None:
        super().__init__()
        if not 4 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of 2 in 4..{MAX_QUEUE_SIZE}")
        try:
            ident = serial.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"serial {serial!r} is not ASCII") from None
        if len(ident) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        self.image = Path(image)
        self.read_only = read_only
        self.serial = serial
        self.access_platform = access_platform
        self.queue_max_size = queue_size
        self.seg_max = queue_size - 2
        self._id = ident.ljust(ID_BYTES, b"\0")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.image, flags)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)  # block devices too
        except OSError:
            os.close(self.fd)
            raise
        self.capacity = size // SECTOR
        if size % SECTOR:
            log.warning("%s: %d bytes are not a multiple of %d; the last %d bytes cannot be "
                        "addressed", self.image, size, SECTOR, size % SECTOR)
        self.stats: dict[str, Any] = {
            "requests": {}, "bytes_read": 0, "bytes_written": 0, "errors": 0,
            "unsupported": 0, "faults": 0, "memory_errors": 0, "io_errors": 0, "malformed": 0}

    def close(self) -> None:
        """Cancels the requests in flight and closes the image."""
        self.cancel_requests()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- features and config ------------------------------------------------------------

    def offered_features(self) -> int:
        features = (super().offered_features() | bit(F_SEG_MAX) | bit(F_BLK_SIZE)
                    | bit(F_FLUSH) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX))
        if self.read_only:
            features |= bit(F_RO)
        return features

    def config_bytes(self) -> bytes:
        """``struct virtio_blk_config``: capacity, seg_max and blk_size; the rest 0."""
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", cfg, CONFIG_CAPACITY, self.capacity)
        struct.pack_into("<I", cfg, CONFIG_SEG_MAX, self.seg_max)
        struct.pack_into("<I", cfg, CONFIG_BLK_SIZE, SECTOR)
        return bytes(cfg)

    # -- requests -----------------------------------------------------------------------

    def process(self, index: int, queue: SplitQueue) -> None:
        self.serve(index, queue, self._traced if self.tracing() else self._request)

    async def _traced(self, queue: SplitQueue, chain: Chain) -> int:
        return await self.timed(queue, chain, lambda seen: self._request(queue, chain, seen))

    async def _request(self, queue: SplitQueue, chain: Chain, seen: Traced | None = None
                       ) -> int:
        """Executes one request; returns the used length (data written + 1, or 0).
        ``seen``, when the request is traced, gets its type, sector, length and status.

        A translation miss (nothing moved yet) goes up widened to every buffer of
        the chain that misses, so that one fill fetches them all."""
        try:
            return await self._request_once(queue, chain, seen)
        except TranslationMiss as miss:
            widen = getattr(queue.dma, "widen", None)
            if widen is None:
                raise
            ranges = [(a, n, Access.READ) for a, n in chain.readable]
            ranges += [(a, n, Access.WRITE) for a, n in chain.writable]
            raise widen(miss, ranges) from None

    async def _request_once(self, queue: SplitQueue, chain: Chain, seen: Traced | None
                            ) -> int:
        dma = queue.dma
        if seen is not None:
            seen.kind, seen.status = "UNKNOWN", Status.IOERR.name
        writable_len = chain.writable_len
        if writable_len < 1:
            log.error("request %d has no writable status byte (%d readable bytes); completed "
                      "unwritten", chain.head, chain.readable_len)
            self.stats["malformed"] += 1
            return 0
        try:
            status_at = resolve_segments(dma, chain.writable, writable_len - 1, 1,
                                         Access.WRITE)
        except DMA_ERRORS as e:
            self._dma_error(e, chain, "status byte")
            log.error("request %d: status byte unreachable; completed unwritten", chain.head)
            return 0
        try:
            data = await self._execute(dma, chain, seen)
            status = Status.OK
        except _Refused as r:
            data, status = 0, r.status
            self.stats["unsupported" if status == Status.UNSUPP else "errors"] += 1
        if seen is not None:
            seen.status = status.name
        try:
            await store(status_at, bytes([status]))
        except (*DMA_ERRORS, OSError) as e:
            log.error("request %d: status byte cannot be written: %s", chain.head, e)
            self.stats["memory_errors"] += 1
            return 0
        return data + 1

    async def _execute(self, dma: DmaSpace, chain: Chain, seen: Traced | None = None) -> int:
        """Runs the request; returns the data bytes written or raises _Refused."""
        if chain.readable_len < HEADER.size:
            log.error("request %d: header of %d bytes, %d expected", chain.head,
                      chain.readable_len, HEADER.size)
            self.stats["malformed"] += 1
            raise _Refused(Status.IOERR)
        try:
            header = await load(resolve_segments(dma, chain.readable, 0, HEADER.size,
                                                 Access.READ))
        except (*DMA_ERRORS, OSError) as e:
            self._dma_error(e, chain, "header")
            raise _Refused(Status.IOERR) from None
        rtype, _ioprio, sector = HEADER.unpack(header)
        if seen is not None:
            seen.kind, seen.sector = _seen_kind(rtype), sector
            seen.length = _data_length(rtype, chain)
        known = _KINDS.get(rtype)  # a dict, not RequestType(rtype): this is per request
        if known is None:
            self._count(f"TYPE_{rtype}")
            log.debug("request %d: type %d unsupported", chain.head, rtype)
            raise _Refused(Status.UNSUPP)
        kind, name = known
        self._count(name)
        try:
            if kind == RequestType.IN:
                return await self._read(dma, chain, sector)
            if kind == RequestType.OUT:
                return await self._write(dma, chain, sector)
            if kind == RequestType.FLUSH:
                if not self.read_only:
                    await self._sync()
                return 0
            return await self._get_id(dma, chain)
        except DMA_ERRORS as e:
            self._dma_error(e, chain, f"{kind.name} data")
        except OSError as e:
            log.error("request %d: %s at sector %d: I/O error: %s", chain.head, kind.name,
                      sector, e)
            self.stats["io_errors"] += 1
        raise _Refused(Status.IOERR)

    def _check_range(self, chain: Chain, sector: int, length: int) -> None:
        if length % SECTOR or sector + length // SECTOR > self.capacity:
            log.warning("request %d: %d bytes at sector %d are not whole sectors inside the "
                        "capacity of %d sectors", chain.head, length, sector, self.capacity)
            raise _Refused(Status.IOERR)

    async def _read(self, dma: DmaSpace, chain: Chain, sector: int) -> int:
        length = chain.writable_len - 1
        self._check_range(chain, sector, length)
        pieces = resolve_segments(dma, chain.writable, 0, length, Access.WRITE)
        offset = sector * SECTOR
        for batch in split_pieces(pieces, CHUNK):
            views = local_views(batch)
            n = sum(piece_len(p) for p in batch)
            if views is not None:
                preadv_all(self.fd, views, offset)
            else:
                buf = bytearray(n)
                preadv_all(self.fd, [memoryview(buf)], offset)
                await store(batch, buf)
            offset += n
        self.stats["bytes_read"] += length
        return length

    async def _write(self, dma: DmaSpace, chain: Chain, sector: int) -> int:
        if self.read_only:
            log.warning("request %d: write to a read-only device", chain.head)
            raise _Refused(Status.IOERR)
        length = chain.readable_len - HEADER.size
        self._check_range(chain, sector, length)
        pieces = resolve_segments(dma, chain.readable, HEADER.size, length, Access.READ)
        offset = sector * SECTOR
        for batch in split_pieces(pieces, CHUNK):
            views = local_views(batch)
            data = views if views is not None else [memoryview(await load(batch))]
            pwritev_all(self.fd, data, offset)
            offset += sum(piece_len(p) for p in batch)
        if not self.has_feature(F_FLUSH):
            await self._sync()  # write-through: no FLUSH will ever come
        self.stats["bytes_written"] += length
        return 0

    async def _get_id(self, dma: DmaSpace, chain: Chain) -> int:
        n = min(chain.writable_len - 1, ID_BYTES)
        pieces: list[Piece] = resolve_segments(dma, chain.writable, 0, n, Access.WRITE)
        await store(pieces, self._id[:n])
        return n

    async def _sync(self) -> None:
        """Makes every write that reached the image durable."""
        await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.fd)

    def _count(self, name: str) -> None:
        requests = self.stats["requests"]
        requests[name] = requests.get(name, 0) + 1

    def _dma_error(self, e: Exception, chain: Chain, what: str) -> None:
        if isinstance(e, DmaFault):
            self.stats["faults"] += 1
            log.warning("request %d: %s: %s", chain.head, what, e)
        else:
            self.stats["memory_errors"] += 1
            log.error("request %d: %s: %s", chain.head, what, e)
