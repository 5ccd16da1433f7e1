"""The virtio-iommu request queue served on a kick thread under the loop's lock.

MAP and UNMAP are handled on the thread; everything else (other request types,
ring errors, tracing, starting the ring) goes to the loop in order; stopping,
replacing and closing end the thread; the polling option serves without kicks.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pviommu import loop_lock
from pviommu.devices.viommu import VirtioIommu
from pviommu.events import EventListener, IommuRequestDone
from pviommu.iommu.pv import IommuConfig, PvIommu
from pviommu.transport.vhost_user import protocol as p
from pviommu.transport.vhost_user.backend import VhostUserServer
from pviommu.transport.vhost_user.protocol import Request as R
from pviommu.virtio.features import STATUS_NEEDS_RESET
from tests.fakes.vhost_user import FakeFrontend
from tests.unit.test_vhost_user import EP, Guest, attach

IOVA = 0x1_0000_0000


def map_req(domain: int, iova: int = IOVA) -> bytes:
    return struct.pack("<B3xIQQQI", 3, domain, iova, iova + 0xFFF, 0x40000000, 3)


def unmap_req(domain: int, iova: int = IOVA) -> bytes:
    return struct.pack("<B3xIQQ4x", 4, domain, iova, iova + 0xFFF)


def make_server(sock_dir: Path, **kwargs: int | bool) -> VhostUserServer:
    return VhostUserServer(sock_dir / "viommu.sock", VirtioIommu(PvIommu(IommuConfig(), [EP])),
                           **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[VhostUserServer]:
    srv = make_server(sock_dir)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def fe(server: VhostUserServer) -> AsyncIterator[FakeFrontend]:
    frontend = await FakeFrontend.connect(server.path)
    yield frontend
    frontend.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def threads_of(server: VhostUserServer) -> dict[int, object]:
    assert server.connection is not None
    return dict(server.connection._threads)


async def test_map_and_unmap_are_served_on_the_kick_thread(server: VhostUserServer,
                                                           fe: FakeFrontend,
                                                           guest: Guest) -> None:
    await guest.plug(fe)
    assert list(threads_of(server)) == [0]  # the request queue only, not the event queue
    device = server.device
    assert isinstance(device, VirtioIommu)
    on_thread: list[bool] = []
    real = device._map_unmap

    def spy(*args: object) -> bool:
        on_thread.append(threading.current_thread() is not threading.main_thread())
        return real(*args)  # type: ignore[arg-type]

    device._map_unmap = spy  # type: ignore[method-assign]
    assert (await guest.request(attach(1, EP)))[1] == bytes(4)  # handed to the loop
    for _ in range(3):
        assert (await guest.request(map_req(1)))[1] == bytes(4)
        assert (await guest.request(unmap_req(1)))[1] == bytes(4)
    assert (await guest.request(map_req(2)))[1][0] == 6  # NOENT: no domain 2
    assert on_thread and all(on_thread)
    assert device.requests[("MAP", "OK")] == 3
    assert device.requests[("UNMAP", "OK")] == 3
    assert device.requests[("MAP", "NOENT")] == 1
    assert device.iommu.mapping_count == 0
    assert guest.rings[0].errors() == 0


async def test_a_batch_keeps_its_order_across_the_hand_off(server: VhostUserServer,
                                                           fe: FakeFrontend,
                                                           guest: Guest) -> None:
    await guest.plug(fe)
    await guest.request(unmap_req(9))  # starts the ring (on the loop)
    heads = [guest.req.add([r], [4]) for r in (attach(1, EP), map_req(1), unmap_req(1),
                                                 map_req(1))]
    for h in heads:
        guest.req.fill_writable(h)
    guest.req.used_event = guest.req.used_idx() + len(heads) - 1
    guest.req.publish()
    guest.rings[0].kick_ring()
    await guest.rings[0].wait_call()
    for _ in range(100):
        if len(guest.req.used()) >= len(heads):
            break
        await asyncio.sleep(0.01)
    assert [guest.req.read_writable(h) for h in heads] == [bytes(4)] * 4  # ATTACH first
    device = server.device
    assert isinstance(device, VirtioIommu)
    assert device.iommu.mapping_count == 1


async def test_a_malicious_ring_breaks_the_device_on_the_loop(server: VhostUserServer,
                                                              fe: FakeFrontend,
                                                              guest: Guest) -> None:
    await guest.plug(fe)
    await guest.request(attach(1, EP))
    guest.req.make_available(200)  # a head beyond the ring
    guest.req.publish()
    guest.rings[0].kick_ring()
    await guest.rings[0].wait_err()
    assert (await fe.call(R.GET_STATUS)).u64 & STATUS_NEEDS_RESET


async def test_tracing_sends_every_request_to_the_loop(server: VhostUserServer,
                                                       fe: FakeFrontend, guest: Guest) -> None:
    device = server.device
    assert isinstance(device, VirtioIommu)
    seen: list[tuple[str, bool]] = []
    device.events.register(EventListener(
        lambda e: seen.append((e.kind, threading.current_thread() is threading.main_thread())),
        (IommuRequestDone,)))
    await guest.plug(fe)
    await guest.request(attach(1, EP))
    await guest.request(map_req(1))
    assert seen == [("ATTACH", True), ("MAP", True)]


async def test_replacing_the_kick_fd_ends_the_old_thread(server: VhostUserServer,
                                                         fe: FakeFrontend, guest: Guest) -> None:
    await guest.plug(fe)
    old = threads_of(server)[0]
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    assert await fe.ack(R.SET_VRING_KICK, p.U64.pack(0), [kick]) == 0
    os.close(guest.rings[0].kick)
    guest.rings[0].kick = kick
    new = threads_of(server)[0]
    assert new is not old
    old.join(2.0)  # type: ignore[attr-defined]
    assert not old.alive  # type: ignore[attr-defined]
    assert (await guest.request(attach(1, EP)))[1] == bytes(4)
    assert (await guest.request(map_req(1)))[1] == bytes(4)


async def test_a_hang_up_ends_the_thread_and_closes_its_fds(server: VhostUserServer,
                                                            fe: FakeFrontend,
                                                            guest: Guest) -> None:
    before = len(os.listdir("/proc/self/fd"))
    await guest.plug(fe)
    await guest.request(attach(1, EP))
    thread = threads_of(server)[0]
    fe.close()
    for _ in range(200):
        if server.device.transport is None:
            break
        await asyncio.sleep(0.01)
    assert not thread.alive  # type: ignore[attr-defined]
    assert len(os.listdir("/proc/self/fd")) == before + 6 - 2  # as without the thread


async def test_without_kick_threads_the_loop_serves(sock_dir: Path, guest: Guest) -> None:
    srv = make_server(sock_dir, kick_threads=False)
    await srv.start()
    try:
        fe = await FakeFrontend.connect(srv.path)
        try:
            await guest.plug(fe)
            assert threads_of(srv) == {}
            await guest.request(attach(1, EP))
            assert (await guest.request(map_req(1)))[1] == bytes(4)
        finally:
            fe.close()
    finally:
        await srv.close()


async def test_polling_serves_a_request_without_a_kick(sock_dir: Path, guest: Guest) -> None:
    srv = make_server(sock_dir, poll_us=2_000_000)
    await srv.start()
    try:
        fe = await FakeFrontend.connect(srv.path)
        try:
            await guest.plug(fe)
            await guest.request(attach(1, EP))
            await guest.request(map_req(1))  # the thread now polls for 2 s
            head = guest.req.add([unmap_req(1)], [4])
            guest.req.used_event = guest.req.used_idx()
            guest.req.publish()  # no kick
            await guest.rings[0].wait_call()
            assert guest.req.used()[-1][0] == head
            assert guest.req.read_writable(head) == bytes(4)
        finally:
            fe.close()
    finally:
        await srv.close()


async def test_the_loop_holds_its_lock_except_while_it_waits() -> None:
    loop = asyncio.get_running_loop()
    lock = loop_lock.install(loop)
    assert lock is not None and loop_lock.install(loop) is lock
    assert not lock.acquire(blocking=False)  # the loop runs this task: it holds the lock

    def take_and_give_back() -> bool:
        if not lock.acquire(timeout=2.0):
            return False
        lock.release()  # before the loop, woken by this thread's result, takes it back
        return True

    assert await asyncio.to_thread(take_and_give_back)  # the loop waits meanwhile
