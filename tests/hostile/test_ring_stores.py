"""A driver polling the rings from another CPU never sees a ring index the device did
not publish.

The driver reads the used index (and, with EVENT_IDX, avail_event) at any moment,
while the device writes it. A store that zeroes the field before writing the
value (``struct.pack_into`` does: it clears its destination first) lets a driver
see 0 for an instant: Linux then takes the stale used entry at its own index for
a completion, frees a request the device has not read yet, and from then on runs
ahead of the device (a virtio-iommu request queue read freed requests and broke
within a minute of the benchmark's fio jobs).

A child process (its own CPU, no GIL shared) spins on the field in the memfd
while the device stores into it as fast as it can; every value it sees must be
one the device published.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from pviommu.dma import PhysicalDma
from pviommu.memory import GuestMemory
from tests.fakes.virtio_driver import DEFAULT_GPA, FakeDriver, memfd_memory

SIZE = 8
SECONDS = 1.0

_WATCHER = r"""
import mmap, os, struct, sys, time
fd, off, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ)
u16 = struct.Struct("<H").unpack_from
first = u16(m, off)[0]
print("ready", flush=True)
last, bad, seen = first, [], 0
deadline = time.monotonic() + float(sys.argv[4])
while time.monotonic() < deadline and len(bad) < 5:
    for _ in range(1000):
        v = u16(m, off)[0]
        if v != last:
            seen += 1
            # "range": the device stores values in [0x100, 0x8000] only;
            # "fixed": the same value is stored again and again.
            ok = 0x100 <= v <= 0x8000 if mode == "range" else v == first
            if not ok:
                bad.append((last, v))
            last = v
print(seen, bad, flush=True)
"""


def _watch(fd: int, offset: int, mode: str, store: Callable[[], object]
           ) -> tuple[int, list[tuple[int, int]]]:
    """Runs ``store`` (a no-argument callable) in a loop while a child process watches
    the 16-bit field at ``offset`` of the memfd; returns what the child saw."""
    child = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(fd), str(offset), mode, str(SECONDS + 0.3)],
        pass_fds=[fd], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline and child.poll() is None:
            for _ in range(500):
                store()
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    seen, bad = out.strip().split(" ", 1)
    return int(seen), ast.literal_eval(bad)


@pytest.fixture
def ring() -> Iterator[tuple[GuestMemory, int, FakeDriver]]:
    memory, fd = memfd_memory(1 << 20)
    driver = FakeDriver(memory, DEFAULT_GPA, queue_size=SIZE)
    yield memory, fd, driver
    memory.clear()
    os.close(fd)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the watcher needs a CPU of its own")
def test_used_index_never_shows_a_value_the_device_did_not_publish(
        ring: tuple[GuestMemory, int, FakeDriver]) -> None:
    memory, fd, driver = ring
    queue = driver.queue(PhysicalDma(memory))

    # Every index published stays in [0x100, 0x8000] (the cached used index is reset
    # when it gets there): a value outside was never published.
    queue._used_idx = 0x100

    def push() -> None:
        if queue.used_idx >= 0x8000:
            queue._used_idx = 0x100
        queue.push(0, 4)
    seen, bad = _watch(fd, driver.used_ring + 2 - DEFAULT_GPA, "range", push)
    assert seen > 0, "the watcher never saw the device store"
    assert bad == [], f"the driver saw used indexes the device never published: {bad}"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the watcher needs a CPU of its own")
def test_avail_event_never_shows_a_value_the_device_did_not_publish(
        ring: tuple[GuestMemory, int, FakeDriver]) -> None:
    memory, fd, driver = ring
    queue = driver.queue(PhysicalDma(memory), event_idx=True)
    driver.set_avail_idx(0x1234)
    queue.next_avail = 0x1234  # an empty ring: each pop re-arms avail_event to 0x1234
    assert queue.pop() is None
    seen, bad = _watch(fd, driver.used_ring + 4 + 8 * SIZE - DEFAULT_GPA, "fixed",
                       queue.pop)
    assert bad == [], f"the driver saw avail_event values the device never published: {bad}"
