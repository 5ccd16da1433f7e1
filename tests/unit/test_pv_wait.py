"""The PV scenario's waits end as soon as the backend says a device needs a reset."""

import asyncio
import time

import pytest
from qemu.qmp import EventListener
from qemu.qmp.message import Message

from pviommu.backend import EVENT_NEEDS_RESET
from pviommu.machine.console import Console, GuestFailed
from pviommu.scenarios.runner import wait_step


def _console():
    return Console(child=None)  # lines are fed by the test, no reader


async def test_a_needs_reset_event_ends_the_wait_at_once():
    console, resets = _console(), EventListener(EVENT_NEEDS_RESET)
    event = Message({"event": EVENT_NEEDS_RESET,
                     "data": {"endpoint": 16, "kind": "blk", "queue": 0,
                              "reason": "MAPPING fault"}})
    asyncio.get_running_loop().call_later(
        0.05, lambda: asyncio.ensure_future(resets.put(event)))
    t0 = time.monotonic()
    with pytest.raises(GuestFailed, match=r"blk endpoint 0x10 needs a reset \(queue 0: "
                                          r"MAPPING fault\) while waiting for the guest's READY"):
        await wait_step(console, resets, "READY", 30)
    assert time.monotonic() - t0 < 5


async def test_the_marker_is_returned_when_no_device_breaks():
    console, resets = _console(), EventListener(EVENT_NEEDS_RESET)
    console._add_line("@@PVIOMMU READY a=1")
    marker = await wait_step(console, resets, "READY", 5)
    assert marker.fields == {"a": "1"}
    await resets.put(Message({"event": EVENT_NEEDS_RESET,
                              "data": {"kind": "iommu", "queue": 1, "reason": "x"}}))
    with pytest.raises(GuestFailed, match="PV-IOMMU needs a reset"):
        await wait_step(console, resets, "DONE", 5)
