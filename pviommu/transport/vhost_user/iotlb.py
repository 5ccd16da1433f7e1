"""The device IOTLB of a vhost-user back-end with VIRTIO_F_ACCESS_PLATFORM.

With ACCESS_PLATFORM negotiated, every address the device sees (ring
addresses included) is an I/O virtual address that only the front-end can
translate (QEMU's vIOMMU holds the guest's stage 1). The back-end caches
translations here:

- a miss sends IOTLB MISS (need-reply) on the back-end channel; the front-end
  answers with IOTLB UPDATE on the *main* socket (acked there) and only then
  acks the MISS: 0 when it sent the entry, 1 when the guest's tables refuse
  the access, which raises :class:`IotlbMissRefused` (a guest stage-1 fault);
- an UPDATE's ``uaddr`` is the front-end's virtual address, converted to a
  guest-physical address through the memory table; its ``perm`` is the guest's
  stage-1 permission of the page (QEMU's SMMUv3 reports the table entry's, and
  ``vhost_device_iotlb_miss`` forwards it): an entry keeps what ``perm`` grants,
  so a read-write page asked for reading also serves the request's later write
  (never more than ``perm`` said), and an UPDATE no MISS asked for is
  acknowledged but not cached;
- INVALIDATE drops every entry that overlaps its range (size 0: everything);
- the front-end sends no INVALIDATE once the device stops, so the owner
  clears the IOTLB on stop, reset, new memory table and disconnect.

``generation`` changes on every invalidation and clear, so views cached from
earlier lookups can be dropped.

Once the wiring gave it an event bus (:meth:`DeviceIotlb.trace_to`), each MISS
round trip is published as :class:`~pviommu.events.IotlbMissDone` and each
UPDATE or INVALIDATE as :class:`~pviommu.events.IotlbMessage`, when a listener
wants them.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from ...dma import Access
from ...events import EventBus, IotlbMessage, IotlbMissDone
from ...memory import GuestMemory
from . import protocol as p
from .backend_channel import (
    MAX_OUTSTANDING,
    BackendChannel,
    BackendChannelError,
    BackendChannelTimeout,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 0x1000  # the smallest stage-1 granule: UPDATE alignment, MISS sharing
ADDRESS_LIMIT = 1 << 64
_RW = int(Access.READ | Access.WRITE)
PREFETCH_ROOM = 64
DROP_LOG = 64
"""Removals remembered for :meth:`DeviceIotlb.invalidated_since`."""
"""Back-end channel replies a prefetch leaves for the misses requests need first."""


class IotlbError(Exception):
    """Root of the device IOTLB's errors: a translation could not be obtained."""


class IotlbMissRefused(IotlbError):
    """The front-end acked a MISS with failure: the guest's stage 1 refuses the access."""

    def __init__(self, iova: int, access: Access) -> None:
        super().__init__(f"stage-1 fault at {iova:#x} ({access.name}): the frontend "
                         "refused the IOTLB miss")
        self.iova = iova
        self.access = access


class IotlbUnavailable(IotlbError):
    """The miss could not be asked or answered: no back-end channel, channel broken,
    too many misses outstanding."""


class IotlbTimeout(IotlbUnavailable):
    """The front-end did not answer a MISS in time."""


class IotlbProtocolError(IotlbError):
    """The front-end acked a MISS without sending an UPDATE that grants it."""


@dataclass(frozen=True, slots=True)
class IotlbEntry:
    """One cached translation: ``[iova, iova+size)`` -> ``gpa``, for ``access``."""

    iova: int
    size: int
    gpa: int
    access: int  # Access bits, as the UPDATE's perm granted them

    @property
    def end(self) -> int:
        """The first iova past the entry."""
        return self.iova + self.size


@dataclass(slots=True)
class _Miss:
    iova: int
    page: int
    access: int
    granted: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def _access(access: Access | int) -> int:
    bits = int(access) & _RW
    if not bits:
        raise ValueError(f"access {access!r} is neither read nor write")
    return bits


def _perm(access: int) -> p.IotlbPerm:
    # Access.READ/WRITE have the values of VHOST_ACCESS_RO/WO.
    return p.IotlbPerm(access)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # the callers that waited have it; nobody else needs a warning


class DeviceIotlb:
    """IOVA -> guest-physical translations of one vhost-user device.

    ``stats`` counts ``iotlb_miss``, ``iotlb_update``, ``iotlb_invalidate`` (the
    front-end round trips) and the rarer outcomes. ``channel`` is set when the
    front-end sends SET_BACKEND_REQ_FD.
    """

    def __init__(self, memory: GuestMemory, stats: Counter[str] | None = None, *,
                 miss_timeout: float = 10.0, max_entries: int = 65536) -> None:
        self.memory = memory
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.miss_timeout = miss_timeout
        self.max_entries = max_entries
        self.channel: BackendChannel | None = None
        self.generation = 0
        self.events: EventBus | None = None
        self.endpoint = -1
        # (generation, iova, end) of the latest removals: what invalidated_since() knows
        self._dropped: deque[tuple[int, int, int]] = deque()
        self._known_from = 0
        self._starts: list[int] = []
        self._entries: list[IotlbEntry] = []
        self._misses: dict[tuple[int, int], _Miss] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def trace_to(self, events: EventBus, endpoint: int) -> None:
        """Publishes the round trips and QEMU's messages on ``events`` (when wanted), as
        those of ``endpoint`` (the StreamID)."""
        self.events = events
        self.endpoint = endpoint

    def entries(self) -> list[IotlbEntry]:
        """The cached entries, by iova."""
        return list(self._entries)

    # -- the fast path ------------------------------------------------------------------

    def lookup(self, iova: int, length: int, access: Access | int
               ) -> list[tuple[int, int]] | None:
        """The guest-physical ``(gpa, length)`` pieces behind ``[iova, iova+length)``
        for ``access``, contiguous pieces merged; None if any byte misses."""
        pieces, _ = self._walk(iova, length, _access(access))
        return pieces

    def first_miss(self, iova: int, length: int, access: Access | int) -> int | None:
        """The first iova of the range that has no entry granting ``access``."""
        _, miss = self._walk(iova, length, _access(access))
        return miss

    def _walk(self, iova: int, length: int, access: int
              ) -> tuple[list[tuple[int, int]] | None, int | None]:
        if length <= 0 or iova < 0 or iova + length > ADDRESS_LIMIT:
            raise ValueError(f"IOVA range {iova:#x}+{length:#x} is empty or outside 64 bits")
        end = iova + length
        entries = self._entries
        i = bisect.bisect_right(self._starts, iova) - 1
        addr = iova
        pieces: list[tuple[int, int]] = []
        while addr < end:
            if i < 0 or i >= len(entries):
                return None, addr
            e = entries[i]
            if not e.iova <= addr < e.iova + e.size or e.access & access != access:
                return None, addr
            n = min(end, e.iova + e.size) - addr
            gpa = e.gpa + (addr - e.iova)
            if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
            else:
                pieces.append((gpa, n))
            addr += n
            i += 1
        return pieces, None

    # -- misses --------------------------------------------------------------------------

    async def resolve(self, iova: int, length: int, access: Access | int
                      ) -> list[tuple[int, int]]:
        """Like :meth:`lookup`, filling every miss from the front-end first."""
        bits = _access(access)
        # Each fill brings at least one page unless an INVALIDATE races with it.
        budget = length // PAGE_SIZE + 8
        while True:
            pieces, miss = self._walk(iova, length, bits)
            if pieces is not None:
                return pieces
            assert miss is not None
            budget -= 1
            if budget < 0:
                raise IotlbUnavailable(f"IOVA {iova:#x}+{length:#x} keeps being invalidated "
                                       "while it is filled")
            await self.fill(miss, bits)

    async def fill(self, iova: int, access: Access | int) -> None:
        """Asks the front-end for the translation of ``iova`` (one MISS round trip).

        Concurrent fills of the same page share one MISS. Raises
        :class:`IotlbMissRefused` when the front-end acks with failure,
        :class:`IotlbUnavailable` / :class:`IotlbTimeout` when it cannot be asked
        or does not answer, :class:`IotlbProtocolError` when it acks without an
        UPDATE granting the access.
        """
        bits = _access(access)
        page = iova & ~(PAGE_SIZE - 1)
        miss = self._shared_miss(page, bits)
        if miss is None:
            if self.channel is None or self.channel.closed:
                reason = "no backend channel (SET_BACKEND_REQ_FD)" if self.channel is None \
                    else self.channel.error
                raise IotlbUnavailable(f"cannot fill IOVA {iova:#x}: {reason}")
            miss = _Miss(iova, page, bits)
            self._misses[(page, bits)] = miss
            miss.task = asyncio.get_running_loop().create_task(self._miss(miss, self.channel))
            miss.task.add_done_callback(_retrieve)
        else:
            self.stats["iotlb_miss_shared"] += 1
        assert miss.task is not None
        await asyncio.shield(miss.task)

    async def prefetch(self, iova: int, access: Access | int) -> None:
        """:meth:`fill` for a page asked ahead of its access (the rest of a request's
        buffers): nothing is asked when the page is at hand, and when the back-end
        channel is missing or busy (the fills a request needs first keep
        :data:`PREFETCH_ROOM` of its replies)."""
        channel = self.channel
        # Misses created but not sent yet count too: a request's prefetches start at once.
        if channel is None or channel.closed or max(len(self._misses), channel.outstanding) \
                >= MAX_OUTSTANDING - PREFETCH_ROOM:
            self.stats["iotlb_prefetch_skipped"] += 1
            return
        if self._walk(iova, 1, _access(access))[1] is not None:
            await self.fill(iova, access)

    def _shared_miss(self, page: int, access: int) -> _Miss | None:
        for miss in self._misses.values():
            if miss.page == page and miss.access & access == access:
                return miss
        return None

    async def _miss(self, miss: _Miss, channel: BackendChannel) -> None:
        events = self.events
        if events is None or not events.wants(IotlbMissDone):
            await self._round_trip(miss, channel)
            return
        start, result = time.monotonic_ns(), "cancelled"
        try:
            await self._round_trip(miss, channel)
            result = "ok"
        except IotlbMissRefused:
            result = "refused"
            raise
        except IotlbTimeout:
            result = "timeout"
            raise
        except IotlbProtocolError:
            result = "unanswered"
            raise
        except IotlbUnavailable:
            result = "unavailable"
            raise
        finally:
            # A flag's name is None only for 0, which _access refuses.
            access = Access(miss.access).name or "NONE"
            events.publish(IotlbMissDone(self.endpoint, miss.iova, access, result, start,
                                         time.monotonic_ns()))

    async def _round_trip(self, miss: _Miss, channel: BackendChannel) -> None:
        self.stats["iotlb_miss"] += 1
        msg = p.IotlbMsg(miss.iova, 0, 0, _perm(miss.access), p.IotlbType.MISS)
        access = Access(miss.access)
        try:
            status = await channel.request(p.BackendRequest.IOTLB_MSG, msg.pack(),
                                           self.miss_timeout)
        except BackendChannelTimeout as e:
            self.stats["iotlb_miss_timeout"] += 1
            raise IotlbTimeout(f"IOTLB miss at {miss.iova:#x} ({access.name}): {e}") from None
        except BackendChannelError as e:
            raise IotlbUnavailable(f"IOTLB miss at {miss.iova:#x} ({access.name}): {e}") \
                from None
        finally:
            if self._misses.get((miss.page, miss.access)) is miss:
                del self._misses[(miss.page, miss.access)]
            miss.task = None  # the task's exception would otherwise hold it in a cycle
        if status != 0:
            self.stats["iotlb_miss_refused"] += 1
            raise IotlbMissRefused(miss.iova, access)
        if miss.granted & miss.access != miss.access:
            self.stats["iotlb_miss_unanswered"] += 1
            got = Access(miss.granted).name if miss.granted else "no UPDATE"
            raise IotlbProtocolError(f"the frontend acked the IOTLB miss at {miss.iova:#x} "
                                     f"({access.name}) with success but sent {got}")

    # -- what the front-end sends on the main socket ----------------------------------------

    def handle_message(self, msg: p.IotlbMsg) -> None:
        """Applies an IOTLB_MSG from the front-end; ValueError (or a memory error for a
        uaddr outside guest memory) when it must be refused."""
        if msg.type == p.IotlbType.UPDATE:
            self.stats["iotlb_update"] += 1
            gpa = self.update(msg.iova, msg.size, msg.uaddr, msg.perm)
            self._published("UPDATE", msg, gpa)
        elif msg.type == p.IotlbType.INVALIDATE:
            self.stats["iotlb_invalidate"] += 1
            if msg.size and msg.iova + msg.size > ADDRESS_LIMIT:
                self.clear()  # never keep what might be stale
                raise ValueError(f"INVALIDATE {msg.iova:#x}+{msg.size:#x} wraps past 2^64 "
                                 "(everything was invalidated)")
            self.invalidate(msg.iova, msg.size)
            self._published("INVALIDATE", msg)
        else:
            kind = p.IotlbType(msg.type).name if msg.type in set(p.IotlbType) \
                else str(msg.type)
            raise ValueError(f"IOTLB message type {kind} is not one a frontend sends")

    def _published(self, kind: str, msg: p.IotlbMsg, gpa: int | None = None) -> None:
        events = self.events
        if events is not None and events.wants(IotlbMessage):
            events.publish(IotlbMessage(self.endpoint, kind, msg.iova, msg.size,
                                        time.monotonic_ns(), gpa))

    def update(self, iova: int, size: int, uaddr: int, perm: int) -> int:
        """Caches the UPDATE ``[iova, iova+size) -> uaddr`` for the misses it answers;
        returns the guest-physical address ``uaddr`` is."""
        if perm & ~int(p.IotlbPerm.RW) or not perm:
            raise ValueError(f"UPDATE permission {perm:#x} is not RO, WO or RW")
        if not size or iova % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"UPDATE {iova:#x}+{size:#x} is empty or not aligned to "
                             f"{PAGE_SIZE:#x}")
        if iova + size > ADDRESS_LIMIT or uaddr + size > ADDRESS_LIMIT:
            raise ValueError(f"UPDATE {iova:#x}+{size:#x} (uaddr {uaddr:#x}) wraps past 2^64")
        gpa = self.memory.uaddr_to_gpa(uaddr, size)  # MemoryAccessError outside memory
        end = iova + size
        answered = [m for m in self._misses.values() if iova <= m.iova < end]
        if not answered:
            # QEMU pushes one for the used ring; its perm was never checked for us.
            self.stats["iotlb_update_unsolicited"] += 1
            log.debug("IOTLB UPDATE %#x+%#x no MISS asked for: not cached", iova, size)
            return gpa
        perm = int(perm)
        useful = 0
        for m in answered:
            m.granted |= perm & m.access
            useful |= perm & m.access
        if useful:  # one that grants nothing asked is the frontend's error: nothing kept
            self._insert(IotlbEntry(iova, size, gpa, perm))
        return gpa

    def _insert(self, entry: IotlbEntry) -> None:
        lo = bisect.bisect_right(self._starts, entry.iova) - 1
        if lo < 0 or self._entries[lo].end <= entry.iova:
            lo += 1
        hi = bisect.bisect_left(self._starts, entry.end)
        if hi - lo == 1:
            old = self._entries[lo]
            if (old.iova, old.size, old.gpa) == (entry.iova, entry.size, entry.gpa):
                # The same translation asked for another access: both are granted.
                self._entries[lo] = IotlbEntry(old.iova, old.size, old.gpa,
                                               old.access | entry.access)
                return
        if hi > lo:
            self._drop(lo, hi)
        if len(self._entries) >= self.max_entries:
            self.stats["iotlb_overflow"] += 1
            self.clear()
            lo = 0
        self._starts.insert(lo, entry.iova)
        self._entries.insert(lo, entry)

    def invalidate(self, iova: int, size: int) -> None:
        """Drops every entry overlapping ``[iova, iova+size)``; size 0 drops everything."""
        if size == 0:
            self.clear()
            return
        end = min(iova + size, ADDRESS_LIMIT)
        lo = bisect.bisect_right(self._starts, iova) - 1
        if lo < 0 or self._entries[lo].end <= iova:
            lo += 1
        hi = bisect.bisect_left(self._starts, end)
        if hi > lo:
            self._drop(lo, hi)
        else:
            self._moved(iova, end)  # nothing cached there; the generation moves all the same

    def _drop(self, lo: int, hi: int) -> None:
        first, last = self._entries[lo], self._entries[hi - 1]
        del self._starts[lo:hi]
        del self._entries[lo:hi]
        self._moved(first.iova, last.end)

    def _moved(self, iova: int, end: int) -> None:
        self.generation += 1
        log = self._dropped
        log.append((self.generation, iova, end))
        if len(log) > DROP_LOG:
            self._known_from = log.popleft()[0]

    def clear(self) -> None:
        """Drops every entry (device stop, reset, new memory table, disconnect)."""
        self._starts.clear()
        self._entries.clear()
        self.generation += 1
        self._dropped.clear()
        self._known_from = self.generation

    def invalidated_since(self, generation: int) -> list[tuple[int, int]] | None:
        """The ``[iova, end)`` ranges whose entries went since ``generation`` (so that a
        cache built over this IOTLB can drop just those), or None when that is not
        known (everything went since, or too long ago)."""
        if generation < self._known_from or generation > self.generation:
            return None
        return [(iova, end) for g, iova, end in self._dropped if g > generation]

    # -- the channel ------------------------------------------------------------------------

    def set_channel(self, channel: BackendChannel | None) -> None:
        """Uses ``channel`` for misses from now on (the previous one is closed)."""
        old, self.channel = self.channel, channel
        if old is not None and old is not channel:
            old.close("replaced by a new SET_BACKEND_REQ_FD")

    def close(self) -> None:
        """Clears the IOTLB and closes the channel: waiting misses fail."""
        self.clear()
        self.set_channel(None)
