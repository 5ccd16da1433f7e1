"""virtio-iommu (device id 23): the request queue's wire format and the event queue.

The semantics live in :class:`~pviommu.iommu.pv.PvIommu`; this module parses
requests out of descriptor chains, writes status tails and PROBE properties,
and writes fault records into the driver's event buffers.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections import Counter

from ..dma import DMA_ERRORS, DmaSpace, TranslationMiss
from ..events import EventBus, FaultRecorded, IommuRequestDone
from ..iommu.faults import Fault, FaultReason
from ..iommu.pv import Negotiated, PvIommu, Status
from ..virtio.device import VirtioDevice
from ..virtio.features import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, bit
from ..virtio.queue import Chain, SplitQueue, VirtqueueError, gather, scatter

log = logging.getLogger(__name__)

DEVICE_ID = 23
REQUEST_QUEUE = 0
EVENT_QUEUE = 1

F_INPUT_RANGE = 0
F_DOMAIN_RANGE = 1
F_MAP_UNMAP = 2
F_BYPASS = 3
F_PROBE = 4
F_MMIO = 5
F_BYPASS_CONFIG = 6

CONFIG = struct.Struct("<QQQIIIB3x")
BYPASS_OFFSET = 36
PROBE_T_RESV_MEM = 1
RESV_MEM = struct.Struct("<HHB3xQQ")
FAULT = struct.Struct("<B3xIIIQ")
FAULT_F_ADDRESS = 0x100
FAULT_SIZE = FAULT.size
TAIL_SIZE = 4

_ATTACH = struct.Struct("<4xIII4s")
_DETACH = struct.Struct("<4xII8x")
_MAP = struct.Struct("<4xIQQQI")
_UNMAP = struct.Struct("<4xIQQ4s")
_PROBE = struct.Struct("<4xI64x")


class RequestType(enum.IntEnum):
    """virtio-iommu request types."""

    ATTACH = 1
    DETACH = 2
    MAP = 3
    UNMAP = 4
    PROBE = 5


_READABLE = {RequestType.ATTACH: _ATTACH.size, RequestType.DETACH: _DETACH.size,
             RequestType.MAP: _MAP.size, RequestType.UNMAP: _UNMAP.size,
             RequestType.PROBE: _PROBE.size}
_MAX_READABLE = max(_READABLE.values())

# Hot-path lookups: enum construction and ``.name`` cost more than the request's parsing.
_TYPES = {int(t): t for t in RequestType}
_TYPE_NAMES = {t: t.name for t in RequestType}
_STATUS_NAMES = {s: s.name for s in Status}
_TAILS = {s: bytes([s, 0, 0, 0]) for s in Status}
_OK = Status.OK
_ATTACH_CODE, _DETACH_CODE, _MAP_CODE, _UNMAP_CODE = (
    int(RequestType.ATTACH), int(RequestType.DETACH), int(RequestType.MAP),
    int(RequestType.UNMAP))
_PROBE_CODE = int(RequestType.PROBE)


# virtio-iommu fault record reasons (VIRTIO_IOMMU_FAULT_R_*); the PV-IOMMU reports
# no other reason.
FAULT_R_UNKNOWN = 0
FAULT_R_DOMAIN = 1
FAULT_R_MAPPING = 2
_FAULT_R = {FaultReason.UNKNOWN: FAULT_R_UNKNOWN, FaultReason.DOMAIN: FAULT_R_DOMAIN,
            FaultReason.MAPPING: FAULT_R_MAPPING}


class _Seen:
    """What a traced request turned out to be (filled in as it is executed)."""

    __slots__ = ("body", "name", "rtype", "status")

    def __init__(self) -> None:
        self.rtype: RequestType | None = None
        self.body = b""
        self.name = "MALFORMED"
        self.status = "NONE"

    def event(self, start_ns: int, end_ns: int, mappings: int) -> IommuRequestDone:
        """The request as an :class:`IommuRequestDone`."""
        fields: dict[str, int] = {}
        body, rtype = self.body, self.rtype
        if rtype == RequestType.ATTACH and body:
            fields["domain"], fields["endpoint"], fields["flags"], _ = _ATTACH.unpack(body)
        elif rtype == RequestType.DETACH and body:
            fields["domain"], fields["endpoint"] = _DETACH.unpack(body)
        elif rtype == RequestType.MAP and body:
            (fields["domain"], fields["virt_start"], fields["virt_end"], fields["phys_start"],
             fields["flags"]) = _MAP.unpack(body)
        elif rtype == RequestType.UNMAP and body:
            fields["domain"], fields["virt_start"], fields["virt_end"], _ = _UNMAP.unpack(body)
        elif rtype == RequestType.PROBE and body:
            (fields["endpoint"],) = _PROBE.unpack(body)
        return IommuRequestDone(self.name, self.status, start_ns, end_ns, mappings=mappings,
                                **fields)


def fault_record(fault: Fault) -> bytes:
    """The 24-byte ``virtio_iommu_fault`` record of ``fault``."""
    flags = int(fault.access) | FAULT_F_ADDRESS
    return FAULT.pack(_FAULT_R.get(fault.reason, FAULT_R_UNKNOWN), flags, fault.endpoint, 0,
                      fault.address)


class VirtioIommu(VirtioDevice):
    """The virtio-iommu device model over a :class:`PvIommu`.

    Every fault it reports is published on ``events`` (by default the IOMMU's) as
    :class:`~pviommu.events.FaultRecorded`.
    """

    device_id = DEVICE_ID
    num_queues = 2
    name = "virtio-iommu"

    def __init__(self, iommu: PvIommu, events: EventBus | None = None) -> None:
        super().__init__()
        self.iommu = iommu
        self.events = events if events is not None else iommu.events
        self.requests: Counter[tuple[str, str]] = Counter()
        self.faults_reported = 0
        self.faults_dropped = 0
        self._seen: _Seen | None = None  # the request being traced, if any

    # -- features and config --------------------------------------------------------

    def offered_features(self) -> int:
        cfg = self.iommu.config
        features = (bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX)
                    | bit(F_INPUT_RANGE) | bit(F_DOMAIN_RANGE) | bit(F_MAP_UNMAP)
                    | bit(F_PROBE))
        if cfg.bypass_config:
            features |= bit(F_BYPASS_CONFIG)
        if cfg.mmio:
            features |= bit(F_MMIO)
        return features

    def set_driver_features(self, features: int) -> None:
        super().set_driver_features(features)
        self.iommu.negotiated = Negotiated(
            map_unmap=self.has_feature(F_MAP_UNMAP),
            bypass_config=self.has_feature(F_BYPASS_CONFIG),
            mmio=self.has_feature(F_MMIO),
            domain_range=self.has_feature(F_DOMAIN_RANGE),
            input_range=self.has_feature(F_INPUT_RANGE))

    def config_bytes(self) -> bytes:
        cfg = self.iommu.config
        return CONFIG.pack(cfg.page_size_mask, cfg.input_start, cfg.input_end,
                           cfg.domain_start, cfg.domain_end, cfg.probe_size,
                           int(self.iommu.bypass))

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``bypass`` is writable, and only with BYPASS_CONFIG negotiated."""
        current = self.config_bytes()
        if offset < 0 or offset + len(data) > len(current):
            raise ValueError(f"config write {offset}+{len(data)} outside {len(current)} bytes")
        new = bytearray(current)
        new[offset:offset + len(data)] = data
        changed = [i for i in range(len(new)) if new[i] != current[i]]
        if any(i != BYPASS_OFFSET for i in changed):
            raise ValueError("driver wrote read-only virtio-iommu config fields")
        if not changed:
            return
        if not self.has_feature(F_BYPASS_CONFIG):
            raise ValueError("bypass written without VIRTIO_IOMMU_F_BYPASS_CONFIG")
        value = new[BYPASS_OFFSET]
        if value not in (0, 1):
            raise ValueError(f"bypass value {value} is neither 0 nor 1")
        self.iommu.bypass = bool(value)
        log.info("global bypass %s", "on" if value else "off")

    # -- queues ----------------------------------------------------------------------

    def process(self, index: int, queue: SplitQueue) -> None:
        if index != REQUEST_QUEUE:
            return  # event buffers are consumed when a fault is reported
        if self.events.wants(IommuRequestDone):
            self._process_traced(queue)
        else:
            while (chain := queue.pop()) is not None:
                queue.push(chain, self._request(queue.dma, chain))
        self.interrupt(index)

    thread_queues = frozenset({REQUEST_QUEUE})

    def kick_threaded(self, index: int) -> bool:
        """MAP and UNMAP requests on the kick thread; anything else (another request
        type, a malformed or unreadable one, a ring error, tracing) goes to the loop,
        from that request on (ATTACH, DETACH and NEEDS_RESET publish events)."""
        queue = self.queues.get(index)
        if queue is None or index != REQUEST_QUEUE or self.needs_reset:
            return True
        if queue in self._ring_fills or self.events.wants(IommuRequestDone):
            return False
        dma = queue.dma
        try:
            while (chain := queue.pop()) is not None:
                try:
                    done = self._map_unmap(dma, queue, chain)
                except Exception:  # a bug of ours: the loop's path makes it S_DEVERR
                    log.exception("internal error on the kick thread")
                    done = False
                if not done:
                    queue.unpop()
                    return False
            self.interrupt(index)
        except (VirtqueueError, TranslationMiss, *DMA_ERRORS):
            return False  # restartable: the loop meets it again and fails the device
        return True

    def _map_unmap(self, dma: DmaSpace, queue: SplitQueue, chain: Chain) -> bool:
        """Executes and completes ``chain`` if it is a well-formed MAP or UNMAP whose
        buffers are all readable and writable; else False, with nothing changed.

        (If only the tail write fails, after the request took effect, False too: the
        loop executes it again, the tail write fails again and breaks the device,
        as it would have.)
        """
        readable_len = chain.readable_len
        if chain.writable_len != TAIL_SIZE or readable_len < _UNMAP.size:
            return False
        try:
            data = gather(dma, chain.readable, 0, min(readable_len, _MAX_READABLE))
        except DMA_ERRORS:
            return False
        code = data[0]
        if code == _MAP_CODE:
            if readable_len < _MAP.size:
                return False
            name = "MAP"
            domain, vstart, vend, pstart, flags = _MAP.unpack_from(data)
            status = self.iommu.map(domain, vstart, vend, pstart, flags)
        elif code == _UNMAP_CODE:
            name = "UNMAP"
            domain, vstart, vend, _reserved = _UNMAP.unpack_from(data)
            status = self.iommu.unmap(domain, vstart, vend)
        else:
            return False
        try:
            scatter(dma, chain.writable, _TAILS[status])
        except DMA_ERRORS:
            return False
        if status != _OK:
            log.debug("%s -> %s", name, _STATUS_NAMES[status])
        self.requests[(name, _STATUS_NAMES[status])] += 1
        queue.push(chain, TAIL_SIZE)
        return True

    def _process_traced(self, queue: SplitQueue) -> None:
        """:meth:`process`, publishing each request as an IommuRequestDone."""
        while (chain := queue.pop()) is not None:
            start = time.monotonic_ns()
            self._seen = seen = _Seen()
            try:
                queue.push(chain, self._request(queue.dma, chain))
            finally:
                self._seen = None
            self.events.publish(seen.event(start, time.monotonic_ns(),
                                           self.iommu.mapping_count))

    def _request(self, dma: DmaSpace, chain: Chain) -> int:
        """Executes one request; returns the number of bytes written."""
        readable_len, writable_len = chain.readable_len, chain.writable_len
        if readable_len < 4 or writable_len < TAIL_SIZE:
            log.warning("request without a head or a tail (%d readable, %d writable bytes)",
                        readable_len, writable_len)
            self.requests[("MALFORMED", "NONE")] += 1
            return 0
        # One read for the head and the body; if it fails, the head and then the
        # body are read apart below, for the status and the log line they each get.
        data: bytes | None
        try:
            data = gather(dma, chain.readable, 0, min(readable_len, _MAX_READABLE))
        except DMA_ERRORS:
            data = None
        if data is not None:
            code = data[0]
        else:
            try:
                code = gather(dma, chain.readable, 0, 1)[0]
            except DMA_ERRORS as e:
                log.error("request head cannot be read: %s", e)
                return self._complete(dma, chain, "UNREADABLE", Status.IOERR)
        rtype = _TYPES.get(code)
        if rtype is None:
            log.warning("unknown request type %d", code)
            self.requests[(f"TYPE_{code}", "NONE")] += 1
            if self._seen is not None:
                self._seen.name = f"TYPE_{code}"
            return 0
        name = _TYPE_NAMES[rtype]
        if code == _PROBE_CODE and not self.has_feature(F_PROBE):
            self.requests[(name, "NONE")] += 1
            if self._seen is not None:
                self._seen.name = name
            return 0
        props = b""
        expected_writable = TAIL_SIZE
        if code == _PROBE_CODE:
            expected_writable += self.iommu.config.probe_size
        size = _READABLE[rtype]
        if readable_len < size or writable_len != expected_writable:
            status = Status.INVAL
        else:
            if data is not None:
                body = data[:size]
            else:
                try:
                    body = gather(dma, chain.readable, 0, size)
                except DMA_ERRORS as e:
                    log.error("%s request cannot be read: %s", name, e)
                    return self._complete(dma, chain, name, Status.IOERR)
            if self._seen is not None:
                self._seen.rtype, self._seen.body = rtype, body
            try:
                status, props = self._execute(code, body)
            except Exception:  # a bug of ours must not take the device down
                log.exception("internal error executing %s", name)
                status = Status.DEVERR
        return self._complete(dma, chain, name, status, props)

    def _complete(self, dma: DmaSpace, chain: Chain, name: str, status: Status,
                  props: bytes = b"") -> int:
        """Writes the properties (on success) and the tail; returns the used length.

        If the writable part cannot be written whole, only the tail is tried,
        with S_IOERR; if even that fails the error breaks the device.
        """
        if status != _OK:
            log.debug("%s -> %s", name, _STATUS_NAMES[status])
        size = chain.writable_len
        out: bytes | bytearray
        if size == TAIL_SIZE:
            out = _TAILS[status]
        else:
            out = bytearray(size)
            if status == _OK and props:
                out[:len(props)] = props
            out[-TAIL_SIZE] = status
        try:
            scatter(dma, chain.writable, out)
        except DMA_ERRORS as e:
            if size == TAIL_SIZE:
                raise
            log.error("%s reply cannot be written: %s", name, e)
            status = Status.IOERR
            scatter(dma, chain.writable, _TAILS[status], size - TAIL_SIZE)
        status_name = _STATUS_NAMES[status]
        self.requests[(name, status_name)] += 1
        if self._seen is not None:
            self._seen.name, self._seen.status = name, status_name
        return size

    def _execute(self, code: int, body: bytes) -> tuple[Status, bytes]:
        iommu = self.iommu
        if code == _MAP_CODE:
            domain, vstart, vend, pstart, flags = _MAP.unpack(body)
            return iommu.map(domain, vstart, vend, pstart, flags), b""
        if code == _UNMAP_CODE:
            domain, vstart, vend, _reserved = _UNMAP.unpack(body)
            return iommu.unmap(domain, vstart, vend), b""
        if code == _ATTACH_CODE:
            domain, endpoint, flags, reserved = _ATTACH.unpack(body)
            return iommu.attach(domain, endpoint, flags, reserved == bytes(4)), b""
        if code == _DETACH_CODE:
            domain, endpoint = _DETACH.unpack(body)
            return iommu.detach(domain, endpoint), b""
        (endpoint,) = _PROBE.unpack(body)
        status, regions = iommu.probe(endpoint)
        props = b"".join(RESV_MEM.pack(PROBE_T_RESV_MEM, RESV_MEM.size - 4, r.subtype,
                                       r.start, r.end) for r in regions)
        return status, props

    # -- faults ------------------------------------------------------------------------

    def report_fault(self, fault: Fault) -> bool:
        """Writes ``fault`` into the next event buffer and interrupts the driver.

        Returns False, and counts the fault as dropped, when the driver has no
        usable event buffer posted.
        """
        delivered = self._deliver(fault)
        if delivered:
            self.faults_reported += 1
        else:
            self.faults_dropped += 1
        log.info("fault %s from endpoint %#x at %#x (%s): %s", fault.reason.name,
                 fault.endpoint, fault.address, fault.access.name,
                 "reported" if delivered else "dropped")
        self.events.publish(FaultRecorded(fault, delivered))
        return delivered

    def _deliver(self, fault: Fault) -> bool:
        queue = self.queues.get(EVENT_QUEUE)
        if queue is None or self.needs_reset:
            return False
        try:
            chain = queue.pop()
            if chain is None:
                return False
            if chain.readable or chain.writable_len < FAULT_SIZE:
                log.error("event buffer of %d writable bytes cannot hold a fault record",
                          chain.writable_len)
                queue.push(chain, 0)
                self.interrupt(EVENT_QUEUE)
                return False
            scatter(queue.dma, chain.writable, fault_record(fault))
            queue.push(chain, FAULT_SIZE)
        except Exception as e:  # noqa: BLE001 - any ring error breaks the device, not us
            self.fail(EVENT_QUEUE, str(e))
            return False
        self.interrupt(EVENT_QUEUE)
        return True

    def on_reset(self, system: bool = False) -> None:
        self.iommu.reset(system=system)
        self.iommu.negotiated = Negotiated(mmio=self.iommu.config.mmio,
                                           bypass_config=self.iommu.config.bypass_config)
