"""In-flight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split rings.

The back-end marks in a shared-memory region every descriptor chain it took
from the available ring and has not yet returned in the used ring. The region
belongs to the frontend: QEMU asks for it once (GET_INFLIGHT_FD, answered here
with a sealed memfd), hands it to every back-end that connects afterwards
(SET_INFLIGHT_FD), and keeps it when the back-end dies. So a restarted back-end
finds the requests its predecessor had in flight, and submits them again in the
order they were taken, whatever order the old one completed them in
(docs/interop/vhost-user.rst, "Inflight I/O tracking"; libvhost-user's
``vu_check_queue_inflights``).

Layout, per queue, :func:`queue_region_size` bytes apart::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    DescStateSplit desc[desc_num];   # u8 inflight; u8 pad[5]; u16 next; u64 counter

The region's content is the frontend's (and a dead back-end's): it is read as
untrusted; a head it names is only a head, walked and checked like any other.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct

log = logging.getLogger(__name__)

VERSION = 1
ALIGNMENT = 64
HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<B5xHQ")    # inflight, pad, next, counter
_U16 = struct.Struct("<H")
_U8_U64 = struct.Struct("<B7xQ")  # a descriptor's inflight and counter (next: 0, unused
assert HEADER.size == DESC.size == 16   # by batches of one); the offsets below use 16
_VERSION_AT, _DESC_NUM_AT, _LAST_BATCH_AT, _USED_IDX_AT = 8, 10, 12, 14
MAX_QUEUE_SIZE = 32768


def _store(view: memoryview, at: int, value: int) -> None:
    """A u16 field of the region written as one copy: ``Struct.pack_into`` zeroes its
    destination first, and a back-end killed in between would leave 0 where QEMU
    hands the next back-end the field (the queue's virtqueue rings are written the
    same way, for the same reason)."""
    view[at:at + 2] = _U16.pack(value)


def check_geometry(num_queues: int, queue_size: int) -> None:
    """ValueError unless a region for ``num_queues`` queues of ``queue_size`` makes sense:
    at least one queue, a queue size that is a power of 2 up to MAX_QUEUE_SIZE."""
    if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise ValueError(f"in-flight queue size {queue_size} is not a power of 2 up to "
                         f"{MAX_QUEUE_SIZE}")
    if num_queues < 1:
        raise ValueError("in-flight region for no queue")


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region (libvhost-user's ``vu_inflight_queue_size``)."""
    need = HEADER.size + DESC.size * queue_size
    return -(-need // ALIGNMENT) * ALIGNMENT


def create_region(num_queues: int, queue_size: int) -> tuple[int, int]:
    """A fresh zeroed region for ``num_queues`` queues of ``queue_size``: a memfd sealed
    against resizing, and its size (GET_INFLIGHT_FD's answer)."""
    size = queue_region_size(queue_size) * num_queues
    fd = os.memfd_create("pviommu-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return fd, size


class InflightQueue:
    """One queue's part of the region: marks taken and returned chains, finds those
    left in flight."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.size = queue_size
        self.counter = 0

    def _desc(self, head: int) -> int:
        return HEADER.size + DESC.size * head

    # The hot path (each request): precompiled structs, offsets inlined.

    def take(self, head: int) -> None:
        """``head`` was taken from the available ring."""
        counter = self.counter
        at = 16 + 16 * head  # one copy, not pack_into (see _store)
        self.view[at:at + 16] = _U8_U64.pack(1, counter)
        self.counter = counter + 1

    def before_used(self, head: int) -> None:
        """``head`` is about to be put in the used ring (a batch of one)."""
        _store(self.view, _LAST_BATCH_AT, head)

    def after_used(self, head: int, used_idx: int) -> None:
        """``head`` is in the used ring, whose index is now ``used_idx``."""
        view = self.view
        view[16 + 16 * head] = 0
        _store(view, _USED_IDX_AT, used_idx)

    def in_flight(self) -> int:
        """How many descriptors are marked in flight."""
        return sum(self.view[self._desc(h)] == 1 for h in range(self.size))

    def recover(self, used_idx: int) -> list[int] | None:
        """At a queue's start: the heads left in flight, oldest first, and the counter
        set past them; None for a fresh region (then marked as in use). ``used_idx``
        is the used ring's index in guest memory: if the last completion reached it
        but its mark was not cleared, it is cleared now."""
        view = self.view
        if _U16.unpack_from(view, _VERSION_AT)[0] == 0:
            _store(view, _VERSION_AT, VERSION)
            _store(view, _DESC_NUM_AT, self.size)
            return None
        _store(view, _DESC_NUM_AT, self.size)
        if _U16.unpack_from(view, _USED_IDX_AT)[0] != used_idx:
            last = _U16.unpack_from(view, _LAST_BATCH_AT)[0]
            if last < self.size:
                view[self._desc(last)] = 0
            _store(view, _USED_IDX_AT, used_idx)
        found = []
        for head in range(self.size):
            inflight, _next, counter = DESC.unpack_from(view, self._desc(head))
            if inflight == 1:
                found.append((counter, head))
        found.sort()
        self.counter = found[-1][0] + 1 if found else 0
        return [head for _, head in found]


class InflightRegion:
    """The region SET_INFLIGHT_FD hands over, mapped; :meth:`queue` gives each queue's
    part. ``fd`` is the back-end's to close (it is mapped, then closed here)."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int) -> None:
        check_geometry(num_queues, queue_size)
        per_queue = queue_region_size(queue_size)
        if mmap_size < per_queue * num_queues:
            raise ValueError(f"inflight region of {mmap_size} bytes is smaller than "
                             f"{num_queues} queues of {per_queue}")
        if mmap_offset % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"inflight region offset {mmap_offset:#x} is not page-aligned")
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
        self.size = mmap_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._view = memoryview(self._map)
        self._queues = [InflightQueue(self._view[i * per_queue:(i + 1) * per_queue], queue_size)
                        for i in range(num_queues)]

    def queue(self, index: int) -> InflightQueue | None:
        """Queue ``index``'s part, if the region has one."""
        return self._queues[index] if 0 <= index < self.num_queues else None

    def close(self) -> None:
        """Unmaps the region (the frontend keeps it); a queue still holding its part
        marks a scratch buffer from now on."""
        for q in self._queues:
            old, q.view = q.view, memoryview(bytearray(len(q.view)))
            old.release()
        self._queues = []
        self._view.release()
        self._map.close()
