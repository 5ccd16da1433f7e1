"""SMMUv3 event records for the faults the backend's stage 2 finds, and the host's queue.

A record is the architecture's 32-byte event queue entry (SMMUv3, IHI 0070;
the same layout as QEMU's hw/arm/smmuv3-internal.h and Linux's arm-smmu-v3.h),
four little-endian 64-bit words:

* word 0: [7:0] event number, [11] SSV, [31:12] SubstreamID, [63:32] StreamID;
* word 1: [15:0] STAG, [31] Stall, [33] PnU, [34] InD, [35] RnW, [39] S2,
  [41:40] CLASS;
* word 2: the input address (here the IOVA the device used);
* word 3: [51:12] the IPA (page-aligned), for a stage-2 fault.

A hypervisor reads such records for the faults of its own stage 2; the guest
never sees them (stock vhost-user has no path for them). They are kept in a
bounded :class:`SmmuEventQueue` and published as :class:`SmmuEventRecorded`.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass

from ..events import EventBus
from .faults import Access, FaultReason

RECORD_SIZE = 32
_RECORD = struct.Struct("<4Q")
_IPA_MASK = ((1 << 52) - 1) & ~0xFFF
DEFAULT_QUEUE_DEPTH = 256


class EventId(enum.IntEnum):
    """Event numbers of the translation faults."""

    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13


class EventClass(enum.IntEnum):
    """CLASS: what the faulting access was for."""

    CD = 0b00  # fetching a context descriptor
    TT = 0b01  # fetching a stage-1 translation table descriptor
    IN = 0b10  # the input address itself


@dataclass(frozen=True)
class SmmuEvent:
    """One event record, field by field."""

    event_id: int
    stream_id: int
    s2: bool
    event_class: EventClass
    rnw: bool  # 1: a read, 0: a write
    ind: bool  # 1: an instruction fetch
    pnu: bool  # 1: privileged
    input_address: int
    ipa: int = 0
    ssv: bool = False
    substream_id: int = 0
    stag: int = 0
    stall: bool = False

    def pack(self) -> bytes:
        """The 32 bytes of the record."""
        w0 = ((self.event_id & 0xFF) | int(self.ssv) << 11
              | (self.substream_id & 0xFFFFF) << 12 | (self.stream_id & 0xFFFFFFFF) << 32)
        w1 = ((self.stag & 0xFFFF) | int(self.stall) << 31 | int(self.pnu) << 33
              | int(self.ind) << 34 | int(self.rnw) << 35 | int(self.s2) << 39
              | (int(self.event_class) & 3) << 40)
        return _RECORD.pack(w0, w1, self.input_address & (1 << 64) - 1, self.ipa & _IPA_MASK)

    @classmethod
    def unpack(cls, record: bytes) -> SmmuEvent:
        """Decodes 32 bytes (ValueError otherwise)."""
        if len(record) != RECORD_SIZE:
            raise ValueError(f"an event record is {RECORD_SIZE} bytes, not {len(record)}")
        w0, w1, w2, w3 = _RECORD.unpack(record)
        return cls(event_id=w0 & 0xFF, stream_id=w0 >> 32, s2=bool(w1 >> 39 & 1),
                   event_class=EventClass(w1 >> 40 & 3), rnw=bool(w1 >> 35 & 1),
                   ind=bool(w1 >> 34 & 1), pnu=bool(w1 >> 33 & 1), input_address=w2,
                   ipa=w3 & _IPA_MASK, ssv=bool(w0 >> 11 & 1),
                   substream_id=w0 >> 12 & 0xFFFFF, stag=w1 & 0xFFFF,
                   stall=bool(w1 >> 31 & 1))

    @classmethod
    def stage2_fault(cls, reason: FaultReason, stream_id: int, iova: int, ipa: int,
                     access: Access) -> SmmuEvent:
        """The record of a stage-2 fault on a device's data access at ``iova`` whose
        stage-1 output ``ipa`` stage 2 refused (CLASS IN: the final access, not a walk
        of stage-1 tables, which are QEMU's here)."""
        return cls(event_id=EventId[reason.value], stream_id=stream_id, s2=True,
                   event_class=EventClass.IN, rnw=not access & Access.WRITE,
                   ind=bool(access & Access.EXEC), pnu=False, input_address=iova, ipa=ipa)

    @property
    def name(self) -> str:
        """The event's name (F_TRANSLATION ...), or its number in hex."""
        try:
            return EventId(self.event_id).name
        except ValueError:
            return f"{self.event_id:#x}"


@dataclass(frozen=True)
class SmmuEventRecorded:
    """A record went into the host's event queue (sequence number ``seq``)."""

    seq: int
    event: SmmuEvent
    level: int | None = None  # the table level of the fault, when known


class SmmuEventQueue:
    """The host-side event queue: the newest ``depth`` records; older ones are dropped
    and counted. Every record is also published on ``events``."""

    def __init__(self, events: EventBus | None = None, depth: int = DEFAULT_QUEUE_DEPTH
                 ) -> None:
        if depth <= 0:
            raise ValueError(f"event queue depth {depth} is not positive")
        self.events = events
        self.depth = depth
        self.records: deque[SmmuEventRecorded] = deque()
        self.dropped = 0
        self.total = 0

    def record(self, event: SmmuEvent, level: int | None = None) -> SmmuEventRecorded:
        """Queues ``event`` (dropping the oldest past the depth) and publishes it."""
        entry = SmmuEventRecorded(self.total, event, level)
        self.total += 1
        self.records.append(entry)
        if len(self.records) > self.depth:
            self.records.popleft()
            self.dropped += 1
        if self.events is not None:
            self.events.publish(entry)
        return entry
