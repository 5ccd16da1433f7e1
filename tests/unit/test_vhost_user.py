"""The vhost-user back-end through a fake front-end: negotiation, rings, refusals, reconnects.

The real front-end (QEMU) is exercised by the end-to-end tests; these tests
send what QEMU sends and what it never should.
"""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pviommu.devices.viommu import VirtioIommu
from pviommu.iommu.pv import IommuConfig, PvIommu
from pviommu.transport.vhost_user import protocol as p
from pviommu.transport.vhost_user.backend import VhostUserServer
from pviommu.transport.vhost_user.protocol import ProtocolFeature as PF
from pviommu.transport.vhost_user.protocol import Request as R
from pviommu.virtio.features import STATUS_NEEDS_RESET
from tests.fakes.vhost_user import FakeFrontend, RingFds
from tests.fakes.virtio_driver import DEFAULT_GPA, DEFAULT_UADDR, FakeDriver, memfd_memory

EP = 0x8
MEM_SIZE = 1 << 20
OFFERED_PROTOCOL = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.CONFIG) \
    | (1 << PF.RESET_DEVICE) | (1 << PF.STATUS)
CONFIG_SIZE = 40


def attach(domain: int, endpoint: int) -> bytes:
    return struct.pack("<B3xIII4s", 1, domain, endpoint, 0, bytes(4))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def server(sock_dir: Path) -> AsyncIterator[VhostUserServer]:
    device = VirtioIommu(PvIommu(IommuConfig(), [EP]))
    srv = VhostUserServer(sock_dir / "viommu.sock", device)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def fe(server: VhostUserServer) -> AsyncIterator[FakeFrontend]:
    frontend = await FakeFrontend.connect(server.path)
    yield frontend
    frontend.close()


class Guest:
    """Guest memory shared with the back-end, and the driver side of both queues."""

    def __init__(self) -> None:
        self.memory, self.fd = memfd_memory(MEM_SIZE)
        self.req = FakeDriver(self.memory, DEFAULT_GPA, 16, span=0x10000)
        self.evt = FakeDriver(self.memory, DEFAULT_GPA + 0x10000, 8, span=0x10000)
        self.rings: list[RingFds] = []

    async def plug(self, fe: FakeFrontend) -> None:
        """Negotiates everything, shares the memory, starts both vrings."""
        await fe.negotiate()
        assert await fe.set_mem_table([(DEFAULT_GPA, MEM_SIZE, DEFAULT_UADDR, 0)],
                                      [self.fd]) == 0
        self.rings = [await fe.start_vring(0, self.req), await fe.start_vring(1, self.evt)]

    async def request(self, data: bytes, writable: int = 4) -> tuple[int, bytes]:
        """Posts one request, kicks, waits for the interrupt; returns (used len, reply)."""
        head = self.req.add([data], [writable])
        self.req.fill_writable(head)
        self.req.used_event = self.req.used_idx()  # as Linux does: interrupt on the next one
        self.req.publish()
        self.rings[0].kick_ring()
        await self.rings[0].wait_call()
        used = self.req.used()
        assert [h for h, _ in used] == [head]
        return used[0][1], self.req.read_writable(head)

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.memory.clear()
        os.close(self.fd)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


# -- negotiation ---------------------------------------------------------------------


async def test_negotiation_as_qemu_does_it(server: VhostUserServer, fe: FakeFrontend) -> None:
    device = server.device
    offered, protocol = await fe.negotiate()
    assert offered == device.offered_features() | (1 << p.F_PROTOCOL_FEATURES)
    assert protocol == OFFERED_PROTOCOL
    assert (await fe.call(R.GET_QUEUE_NUM)).u64 == 2
    assert await fe.silent()  # SET_* without NEED_REPLY are not answered
    assert device.driver_features == device.offered_features()
    assert server.connection is not None
    assert server.connection.acked_protocol_features == OFFERED_PROTOCOL


async def test_features_never_offered_are_refused(server: VhostUserServer,
                                                  fe: FakeFrontend) -> None:
    await fe.negotiate(features=0)
    assert await fe.ack(R.SET_FEATURES, p.U64.pack(1 << 63)) != 0
    assert await fe.ack(R.SET_PROTOCOL_FEATURES, p.U64.pack(1 << 40)) != 0
    assert server.device.driver_features == 0


async def test_reply_ack_reports_success_and_failure(fe: FakeFrontend) -> None:
    await fe.negotiate()
    assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 64)) == 0
    assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 3)) != 0  # not a power of 2
    assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(7, 64)) != 0  # no such vring
    assert await fe.ack(R.SET_VRING_NUM, p.U64.pack(64)[:4]) != 0  # short payload


async def test_without_reply_ack_a_refusal_sends_nothing(fe: FakeFrontend) -> None:
    await fe.negotiate(protocol=1 << PF.MQ)
    await fe.send(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 3), need_reply=True)
    assert await fe.silent()
    assert (await fe.call(R.GET_QUEUE_NUM)).u64 == 2  # and the session goes on


async def test_messages_before_set_owner_are_refused(server: VhostUserServer,
                                                     fe: FakeFrontend) -> None:
    await fe.send(R.SET_PROTOCOL_FEATURES, p.U64.pack(OFFERED_PROTOCOL))
    assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 64)) != 0
    assert await fe.ack(R.SET_OWNER) == 0
    assert await fe.ack(R.SET_OWNER) != 0  # only once
    assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 64)) == 0
    assert server.stats["refused"] == 2


async def test_get_queue_num_needs_mq(fe: FakeFrontend) -> None:
    await fe.negotiate(protocol=1 << PF.REPLY_ACK)
    reply = await fe.call(R.GET_QUEUE_NUM)
    assert reply.payload == b""  # a refused request that always has a reply: empty


async def test_unknown_and_unsupported_requests_are_refused(server: VhostUserServer,
                                                            fe: FakeFrontend) -> None:
    await fe.negotiate()
    assert await fe.ack(999) != 0
    assert await fe.ack(R.SEND_RARP, bytes(8)) != 0
    assert await fe.ack(R.SET_LOG_BASE, bytes(16)) != 0
    assert (await fe.call(R.GET_QUEUE_NUM)).u64 == 2
    assert server.stats["refused"] == 3


async def test_unexpected_fds_are_refused_and_closed(fe: FakeFrontend) -> None:
    await fe.negotiate()
    before = open_fds()
    r, w = os.pipe()
    try:
        assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 64), [r, w]) != 0
        assert await fe.ack(999, b"", [r]) != 0
    finally:
        os.close(r)
        os.close(w)
    assert open_fds() == before  # the back-end's received copies are closed


# -- config space ----------------------------------------------------------------------


async def test_get_config(server: VhostUserServer, fe: FakeFrontend) -> None:
    await fe.negotiate()
    reply = await fe.call(R.GET_CONFIG, p.CONFIG_HEADER.pack(0, CONFIG_SIZE, 0)
                          + bytes(CONFIG_SIZE))
    assert len(reply.payload) == 12 + CONFIG_SIZE  # 52 bytes, as QEMU expects
    assert reply.payload[:12] == p.CONFIG_HEADER.pack(0, CONFIG_SIZE, 0)
    device = server.device
    assert isinstance(device, VirtioIommu)
    assert reply.payload[12:] == device.config_bytes()
    page_size_mask, = struct.unpack_from("<Q", reply.payload, 12)
    assert page_size_mask == device.iommu.config.page_size_mask


async def test_config_needs_the_protocol_feature(fe: FakeFrontend) -> None:
    await fe.negotiate(protocol=(1 << PF.REPLY_ACK))
    reply = await fe.call(R.GET_CONFIG, p.CONFIG_HEADER.pack(0, CONFIG_SIZE, 0)
                          + bytes(CONFIG_SIZE))
    assert reply.payload == b""


async def test_get_config_with_inconsistent_sizes(fe: FakeFrontend) -> None:
    await fe.negotiate()
    reply = await fe.call(R.GET_CONFIG, p.CONFIG_HEADER.pack(0, CONFIG_SIZE, 0) + bytes(8))
    assert reply.payload == b""
    reply = await fe.call(R.GET_CONFIG, p.CONFIG_HEADER.pack(0, 4096, 0))
    assert reply.payload == b""


async def test_set_config_writes_bypass(server: VhostUserServer, fe: FakeFrontend) -> None:
    # QEMU's vub_set_config sends the whole config space with the changed byte.
    await fe.negotiate()
    device = server.device
    assert isinstance(device, VirtioIommu)
    config = bytearray(device.config_bytes())
    config[36] = 1
    assert await fe.ack(R.SET_CONFIG, p.CONFIG_HEADER.pack(0, CONFIG_SIZE, 0)
                        + bytes(config)) == 0
    assert device.iommu.bypass
    config[36] = 2
    assert await fe.ack(R.SET_CONFIG, p.CONFIG_HEADER.pack(0, CONFIG_SIZE, 0)
                        + bytes(config)) != 0
    config[36] = 0
    config[0] ^= 1  # page_size_mask is read-only
    assert await fe.ack(R.SET_CONFIG, p.CONFIG_HEADER.pack(0, CONFIG_SIZE, 0)
                        + bytes(config)) != 0
    assert device.iommu.bypass


# -- memory ---------------------------------------------------------------------------


async def test_mem_table_errors_are_refused_and_fds_closed(fe: FakeFrontend,
                                                           guest: Guest) -> None:
    await fe.negotiate()
    region = (DEFAULT_GPA, MEM_SIZE, DEFAULT_UADDR, 0)
    before = open_fds()
    assert await fe.set_mem_table([], []) != 0
    assert await fe.set_mem_table([region], []) != 0  # no fd
    assert await fe.set_mem_table([region, region], [guest.fd]) != 0  # one fd short
    assert await fe.set_mem_table([region], [guest.fd, guest.fd]) != 0  # one fd too many
    assert await fe.set_mem_table([(DEFAULT_GPA, MEM_SIZE * 2, DEFAULT_UADDR, 0)],
                                  [guest.fd]) != 0  # larger than the memfd
    assert await fe.ack(R.SET_MEM_TABLE, p.MEM_HEADER.pack(9, 0)) != 0
    assert open_fds() == before
    assert await fe.set_mem_table([region], [guest.fd]) == 0
    assert open_fds() == before + 1  # the mapping's fd, until the next table or hang-up


async def test_ring_outside_guest_memory_is_a_vring_error(fe: FakeFrontend,
                                                          guest: Guest) -> None:
    await guest.plug(fe)
    await fe.call(R.GET_VRING_BASE, p.VRING_STATE.pack(0, 0))
    # Point the request ring past the end of the only region, then kick.
    assert await fe.ack(R.SET_VRING_ADDR, p.VRING_ADDR.pack(
        0, 0, DEFAULT_UADDR + MEM_SIZE, DEFAULT_UADDR, DEFAULT_UADDR, 0)) == 0
    guest.rings[0].kick_ring()
    await guest.rings[0].wait_err()


# -- rings -------------------------------------------------------------------------------


async def test_requests_flow_through_the_vrings(server: VhostUserServer, fe: FakeFrontend,
                                                guest: Guest) -> None:
    await guest.plug(fe)
    n, reply = await guest.request(attach(1, EP))
    assert (n, reply) == (4, bytes(4))
    device = server.device
    assert isinstance(device, VirtioIommu)
    assert device.iommu.attached[EP] == 1
    n, reply = await guest.request(attach(1, EP + 1))  # not declared: NOENT
    assert (n, reply[0]) == (4, 6)
    assert guest.rings[0].errors() == 0


async def test_get_vring_base_stops_the_ring(fe: FakeFrontend, guest: Guest) -> None:
    await guest.plug(fe)
    await guest.request(attach(1, EP))
    await guest.request(attach(2, EP))
    assert await fe.ack(R.SET_VRING_ADDR, p.VRING_ADDR.pack(
        0, 0, DEFAULT_UADDR, DEFAULT_UADDR, DEFAULT_UADDR, 0)) != 0  # the ring runs
    reply = await fe.call(R.GET_VRING_BASE, p.VRING_STATE.pack(0, 0))
    assert p.VRING_STATE.unpack(reply.payload) == (0, 2)
    # Stopped: it can be reconfigured, and QEMU restores the base it read.
    assert await fe.ack(R.SET_VRING_BASE, p.VRING_STATE.pack(0, 2)) == 0
    assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 16)) == 0
    n, _ = await guest.request(attach(3, EP))  # a kick starts it again where it stopped
    assert n == 4
    assert guest.req.used_idx() == 3


async def test_disabled_ring_is_not_processed(fe: FakeFrontend, guest: Guest) -> None:
    await guest.plug(fe)
    assert await fe.ack(R.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 0)) == 0
    guest.req.add([attach(1, EP)], [4])  # used_event 0: the first buffer interrupts
    guest.req.publish()
    guest.rings[0].kick_ring()
    await asyncio.sleep(0.05)
    assert guest.req.used_idx() == 0
    assert await fe.ack(R.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 1)) == 0
    await guest.rings[0].wait_call()
    assert guest.req.used_idx() == 1


async def test_malicious_chain_sets_needs_reset(server: VhostUserServer, fe: FakeFrontend,
                                                guest: Guest) -> None:
    await guest.plug(fe)
    guest.req.make_available(200)  # head index beyond the 16-entry ring
    guest.req.publish()
    guest.rings[0].kick_ring()
    await guest.rings[0].wait_err()
    status = (await fe.call(R.GET_STATUS)).u64
    assert status & STATUS_NEEDS_RESET
    assert server.stats["device_errors"] == 1
    # The device stays broken until reset: a valid request is not processed.
    guest.req.add([attach(1, EP)], [4])
    guest.req.publish()
    guest.rings[0].kick_ring()
    await asyncio.sleep(0.05)
    assert guest.req.used_idx() == 0
    assert EP not in server.device.iommu.attached
    # The driver's status writes keep the device's NEEDS_RESET; only 0 clears it.
    assert await fe.ack(R.SET_STATUS, p.U64.pack(0xF)) == 0
    assert (await fe.call(R.GET_STATUS)).u64 == 0xF | STATUS_NEEDS_RESET
    assert await fe.ack(R.SET_STATUS, p.U64.pack(0)) == 0
    assert (await fe.call(R.GET_STATUS)).u64 == 0


async def test_status_round_trip(fe: FakeFrontend) -> None:
    await fe.negotiate()
    assert await fe.ack(R.SET_STATUS, p.U64.pack(0xF)) == 0
    assert (await fe.call(R.GET_STATUS)).u64 == 0xF
    assert await fe.ack(R.SET_STATUS, p.U64.pack(0x100)) != 0


async def test_reset_device(server: VhostUserServer, fe: FakeFrontend, guest: Guest) -> None:
    await guest.plug(fe)
    await guest.request(attach(1, EP))
    device = server.device
    assert isinstance(device, VirtioIommu)
    assert await fe.ack(R.RESET_DEVICE) == 0
    assert device.iommu.domains == {}
    assert device.driver_features == 0
    assert device.queues == {}
    assert (await fe.call(R.GET_STATUS)).u64 == 0


# -- the connection ---------------------------------------------------------------------------


async def test_oversized_message_closes_only_that_connection(server: VhostUserServer,
                                                             fe: FakeFrontend) -> None:
    await fe.negotiate()
    await fe.send_raw(p.HEADER.pack(R.SET_CONFIG, p.VERSION, p.MAX_PAYLOAD + 1))
    assert await fe.closed()
    assert server.stats["protocol_errors"] == 1
    again = await FakeFrontend.connect(server.path)
    try:
        offered, _ = await again.negotiate()
        assert offered & (1 << p.F_PROTOCOL_FEATURES)
    finally:
        again.close()


async def test_wrong_protocol_version_closes_the_connection(server: VhostUserServer,
                                                            fe: FakeFrontend) -> None:
    await fe.send(R.GET_FEATURES, flags=0x2)
    assert await fe.closed()
    assert server.stats["protocol_errors"] == 1


async def test_a_second_frontend_is_turned_away(server: VhostUserServer,
                                                fe: FakeFrontend) -> None:
    await fe.negotiate()
    second = await FakeFrontend.connect(server.path)
    try:
        assert await second.closed()
    finally:
        second.close()
    assert (await fe.call(R.GET_QUEUE_NUM)).u64 == 2


async def test_hang_up_resets_the_device_and_releases_everything(
        server: VhostUserServer, fe: FakeFrontend, guest: Guest) -> None:
    before = open_fds()
    await guest.plug(fe)
    await guest.request(attach(1, EP))
    device = server.device
    assert isinstance(device, VirtioIommu)
    fe.close()
    for _ in range(100):
        if device.transport is None:
            break
        await asyncio.sleep(0.01)
    assert device.iommu.domains == {}
    assert device.queues == {}
    # Only the front-end's own eventfds are new (6); both ends of the socket are gone (-2).
    assert open_fds() == before + 6 - 2
    # The next front-end (a restarted QEMU) gets a working device.
    fresh = Guest()
    try:
        fe2 = await FakeFrontend.connect(server.path)
        try:
            await fresh.plug(fe2)
            n, reply = await fresh.request(attach(5, EP))
            assert (n, reply) == (4, bytes(4))
            assert server.connections == 2
        finally:
            fe2.close()
    finally:
        fresh.close()


# -- what a gone frontend leaves behind ---------------------------------------------------


def guest_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "fake-guest" in line)


async def _gone(server: VhostUserServer) -> None:
    for _ in range(200):
        if server.connection is None and server.device.transport is None:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("ending", ["hang-up", "eof-mid-message", "garbage", "refused",
                                    "gone-before-reply"])
async def test_a_gone_frontend_frees_its_memory_at_once_without_the_collector(
        server: VhostUserServer, guest: Guest, ending: str) -> None:
    gc.disable()
    try:
        mapped = guest_maps()  # the test's own mapping of the guest RAM
        fe = await FakeFrontend.connect(server.path)
        await guest.plug(fe)
        await guest.request(attach(1, EP))
        assert guest_maps() == mapped + 1
        conn = weakref.ref(server.connection)
        if ending == "eof-mid-message":
            await fe.send_raw(p.HEADER.pack(R.SET_VRING_NUM, p.VERSION, 8) + b"\1\2")
        elif ending == "garbage":
            await fe.send_raw(b"\xff" * 40)
        elif ending == "refused":
            assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(9, 3)) != 0
        elif ending == "gone-before-reply":
            await fe.send(R.GET_FEATURES)
        fe.close()
        await _gone(server)
        assert conn() is None, gc.get_referrers(conn())
        assert guest_maps() == mapped
    finally:
        gc.enable()


async def test_a_frontend_gone_before_its_reply_is_one_log_line(
        server: VhostUserServer, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(5):
        fe = await FakeFrontend.connect(server.path)
        await fe.send(R.GET_FEATURES)
        fe.close()
        await _gone(server)
        await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_interrupt_fds_are_made_non_blocking(server: VhostUserServer, fe: FakeFrontend,
                                                   guest: Guest) -> None:
    await guest.plug(fe)
    full = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, counter at its maximum
    os.write(full, (0xFFFFFFFFFFFFFFFE).to_bytes(8, "little"))
    try:
        assert await fe.ack(R.SET_VRING_CALL, p.U64.pack(0), [full]) == 0
        assert await fe.ack(R.SET_VRING_ERR, p.U64.pack(0), [full]) == 0
        assert not os.get_blocking(full)  # the flag is the open file's, shared
        head = guest.req.add([attach(1, EP)], [4])
        guest.req.publish()
        guest.rings[0].kick_ring()
        used: list[tuple[int, int]] = []
        for _ in range(100):
            used += guest.req.used()
            if used:
                break
            await asyncio.sleep(0.01)
        assert [h for h, _ in used] == [head]
        server.connection.device_error(0, "test")  # the error fd: no blocking either
    finally:
        os.close(full)
