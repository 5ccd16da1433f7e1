"""virtio-iommu requests through the request queue of a VirtioIommu over a PvIommu.

The input chooses the negotiated features, then a list of requests: each a type
(ATTACH, DETACH, MAP, UNMAP, PROBE or any other byte), a body, and a layout of its
chain (the body whole or cut short, split over two descriptors, a tail of the right
size or not, a writable part in an address outside guest memory). They are posted
on a real split queue and the device is kicked, on the loop's path or the kick
thread's (MAP and UNMAP). Then event buffers are posted and a fault reported.

Checks, per virtio-iommu 1.3 (5.13.6): a request without a 4-byte head or tail is
used with 0 bytes written; an unknown type, or PROBE without F_PROBE, too; a body or
a writable part of the wrong size answers S_INVAL; every other answer is a defined
status other than S_DEVERR (which this device writes only for a bug of its own),
with the tail written at the end of the writable part; an unwritable tail breaks
the device (NEEDS_RESET), nothing else does. Afterwards the PV-IOMMU's state holds
together: every domain's mappings sorted and disjoint, the mapping count their sum,
each attached endpoint in exactly the domain it is recorded in.
"""

from __future__ import annotations

from ..devices.viommu import (
    EVENT_QUEUE,
    F_PROBE,
    REQUEST_QUEUE,
    TAIL_SIZE,
    VirtioIommu,
)
from ..dma import Access
from ..iommu.faults import Fault, FaultReason
from ..iommu.pv import IommuConfig, PvIommu, ResvRegion, Status
from ..virtio.features import F_VERSION_1, bit
from ..virtio.queue import SplitQueue
from .common import Bytes, Ram, check
from .driver import RingDriver

GPA = 0x40000000
RAM_SIZE = 1 << 16
QUEUE_SIZE = 64
ENDPOINTS = (0x10, 0x18)
BODY = {1: 16, 2: 16, 3: 32, 4: 24, 5: 68}  # bytes after the 4-byte head
OUTSIDE = 1 << 40
_VALID = {int(s) for s in Status} - {int(Status.DEVERR)}

_ram: Ram | None = None


class Transport:
    """Counts interrupts and device errors."""

    def __init__(self) -> None:
        self.notified = 0
        self.errors: list[str] = []

    def notify(self, queue: int) -> None:
        self.notified += 1

    def device_error(self, queue: int, reason: str) -> None:
        self.errors.append(reason)


def ram() -> Ram:
    """The guest RAM (made once, rewritten per input)."""
    global _ram
    if _ram is None:
        _ram = Ram(RAM_SIZE, GPA)
    return _ram


class Request:
    """One posted request and what the spec says its answer must be."""

    def __init__(self, head: int, code: int, readable: int, writable: int,
                 tail_addr: int | None, unreadable: bool) -> None:
        self.head, self.code = head, code
        self.readable, self.writable, self.tail_addr = readable, writable, tail_addr
        self.unreadable = unreadable


def _post(drv: RingDriver, inp: Bytes, probe: bool, probe_size: int) -> Request | None:
    choice = inp.u8()
    code = (1, 2, 3, 4, 5, 3, 4)[choice % 7] if choice < 0xF0 else inp.u8()
    layout = inp.u8()
    body_len = BODY.get(code, 16)
    if layout & 1:
        body_len = inp.u8() % (body_len + 8)  # short or long
    body = bytes([code, 0, 0, 0]) + inp.take(body_len)
    if layout & 2:  # reserved head bytes set
        body = body[:1] + inp.take(3) + body[4:]
    if layout & 4:
        body = body[:inp.u8() % 6]  # no complete head
    writable = TAIL_SIZE + (probe_size if code == 5 else 0)
    if layout & 8:
        writable = inp.u8() % (writable + 12)
    bufs: list[tuple[int, int, bool]] = []
    cut = len(body) // 2 if layout & 16 else len(body)
    for part in (body[:cut], body[cut:]):
        if part:
            addr = drv.alloc(part)
            if addr is None:
                return None
            bufs.append((addr, len(part), False))
    tail_addr: int | None = None
    if writable:
        if layout & 32:
            tail_addr = OUTSIDE  # the reply cannot be written
        else:
            tail_addr = drv.alloc(bytes([0xEE]) * writable)
            if tail_addr is None:
                return None
        bufs.append((tail_addr, writable, True))
    unreadable = bool(layout & 64 and body)
    if unreadable:  # the readable part outside guest memory
        bufs[0] = (OUTSIDE + 0x1000, bufs[0][1], bufs[0][2])
    head = drv.post(bufs)
    if head is None:
        return None
    return Request(head, code, len(body), writable, tail_addr, unreadable)


def one_input(data: bytes) -> None:
    """Posts the requests ``data`` describes and checks every answer."""
    inp = Bytes(data)
    cfg = inp.u8()
    config = IommuConfig(reserved=[ResvRegion(0x9000000, 0x90FFFFF)],
                         probe_size=(64, 128, 512)[cfg % 3], max_domains=8,
                         max_mappings=64, bypass=bool(cfg & 4))
    iommu = PvIommu(config, ENDPOINTS)
    dev = VirtioIommu(iommu)
    transport = Transport()
    dev.transport = transport
    dev.set_driver_features(dev.offered_features() & (inp.u64() | bit(F_VERSION_1)))
    mem = ram()
    mem.clear()
    req = RingDriver(mem, GPA, QUEUE_SIZE, GPA + 0x4000, GPA + 0xC000)
    evt = RingDriver(mem, GPA + 0x2000, 8, GPA + 0xC000, GPA + RAM_SIZE)
    dma = dev.bind_memory(mem.memory)
    dev.start_queue(REQUEST_QUEUE, SplitQueue(dma, QUEUE_SIZE, req.desc, req.avail, req.used,
                                              event_idx=bool(cfg & 8)))
    dev.start_queue(EVENT_QUEUE, SplitQueue(dma, 8, evt.desc, evt.avail, evt.used))
    probe = dev.has_feature(F_PROBE)
    threaded = bool(cfg & 16)
    for _ in range(inp.u8() % 8 + 1):  # kicks
        posted = {}
        for _ in range(inp.u8() % 8 + 1):
            r = _post(req, inp, probe, config.probe_size)
            if r is not None:
                posted[r.head] = r
        if not threaded or not dev.kick_threaded(REQUEST_QUEUE):
            dev.kick(REQUEST_QUEUE)
        used = req.completed()
        if dev.needs_reset:
            check(any(r.tail_addr == OUTSIDE for r in posted.values()),
                  f"the device broke on requests it can answer: {dev.broken_reason}")
            break
        check(len(used) == len(posted), f"{len(posted)} requests posted, {len(used)} used")
        for head, written in used:
            _check_answer(req, posted[head], written, probe, config.probe_size)
        _check_state(iommu)
    # Event buffers, then a fault to report into them.
    for _ in range(inp.u8() % 3):
        n = inp.u8() % 40
        addr = evt.alloc(n) if not inp.u8() & 1 else OUTSIDE
        if addr is not None and n:
            evt.post([(addr, n, bool(inp.u8() & 1))])
    dev.report_fault(Fault(ENDPOINTS[0], inp.u64(), Access.READ, FaultReason.MAPPING))
    _check_state(iommu)


def _check_answer(drv: RingDriver, r: Request, written: int, probe: bool,
                  probe_size: int) -> None:
    size = 4 + BODY.get(r.code, 0)
    if r.readable < 4 or r.writable < TAIL_SIZE:
        check(written == 0, f"a request of {r.readable} readable, {r.writable} writable "
                            f"bytes answered with {written} bytes, not 0")
        return
    if r.unreadable:
        check(written == r.writable, f"unreadable request: used length {written}")
        if r.tail_addr != OUTSIDE:
            tail = drv.read(r.tail_addr + r.writable - TAIL_SIZE, 1)  # type: ignore[operator]
            check(tail[0] == Status.IOERR, f"unreadable request answered {tail[0]}, not "
                                           "S_IOERR")
        return
    if r.code not in BODY or (r.code == 5 and not probe):
        check(written == 0, f"request type {r.code} ({r.readable} readable, {r.writable} "
                            f"writable bytes) answered with {written} bytes, not 0")
        return
    check(written == r.writable, f"used length {written}, the writable part is {r.writable}")
    if r.tail_addr is None or r.tail_addr == OUTSIDE:
        return
    tail = drv.read(r.tail_addr + r.writable - TAIL_SIZE, TAIL_SIZE)
    status = tail[0]
    check(tail[1:] == bytes(3), f"tail reserved bytes {tail[1:].hex()} are not zero")
    check(status in _VALID, f"request type {r.code} answered with status {status}")
    expected_writable = TAIL_SIZE + (probe_size if r.code == 5 else 0)
    if r.readable < size or r.writable != expected_writable:
        check(status == Status.INVAL,
              f"malformed request type {r.code} ({r.readable} readable, {r.writable} "
              f"writable) answered {status}, not S_INVAL")


def _check_state(iommu: PvIommu) -> None:
    total = 0
    for dom_id, dom in iommu.domains.items():
        check(dom.id == dom_id, f"domain {dom_id} is recorded as {dom.id}")
        maps = list(dom.mappings)
        total += len(maps)
        for m in maps:
            check(m.virt_start <= m.virt_end, f"mapping {m} ends before it starts")
        for a, b in zip(maps, maps[1:], strict=False):
            check(a.virt_end < b.virt_start, f"mappings {a} and {b} overlap or are unsorted")
        for ep in dom.endpoints:
            check(iommu.attached.get(ep) == dom_id,
                  f"endpoint {ep:#x} in domain {dom_id} but attached to "
                  f"{iommu.attached.get(ep)}")
    check(total == iommu.mapping_count,
          f"mapping count {iommu.mapping_count}, the domains hold {total}")
    for ep, dom_id in iommu.attached.items():
        owner = iommu.domains.get(dom_id)
        check(owner is not None and ep in owner.endpoints,
              f"endpoint {ep:#x} attached to domain {dom_id}, which does not list it")

