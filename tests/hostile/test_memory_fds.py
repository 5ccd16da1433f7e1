"""Guest-memory and interrupt fds from a hostile frontend: a memfd it could shrink, a
region beyond the end of its file, an interrupt fd that would block, memory left
mapped after the frontend is gone, a frontend that leaves before its reply."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct

import pytest

from pviommu.memory import GuestMemory, RegionSpec
from pviommu.transport.vhost_user import protocol as p
from pviommu.transport.vhost_user.protocol import Request as R
from pviommu.virtio.pci_common import Reg
from tests.fakes.memfd import sealed_memfd
from tests.fakes.served import ServedBackend
from tests.fakes.vfio_user import MSIX, FakeQemu, eventfd
from tests.fakes.vhost_user import FakeFrontend
from tests.fakes.virtio_driver import DEFAULT_GPA, DEFAULT_UADDR, FakeDriver, memfd_memory

SIZE = 1 << 20
NAME = "hostile-ram"
EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE
BAR4 = 4


def _region(size: int = SIZE) -> tuple[int, int, int, int]:
    return (DEFAULT_GPA, size, DEFAULT_UADDR, 0)


def _memory_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if NAME in line)


# -- defect 1: memory fds that could shrink, regions beyond the file -------------------------


async def _vhost_mem_table(served: ServedBackend, fd: int, size: int = SIZE) -> int:
    fe = await FakeFrontend.connect(served.viommu)
    try:
        await fe.negotiate()
        return await fe.set_mem_table([_region(size)], [fd])
    finally:
        fe.close()


async def _vfio_dma_map(served: ServedBackend, fd: int, size: int = SIZE) -> int:
    """DMA_MAP of ``fd`` on the blk endpoint: 0 or the errno of the reply."""
    qemu = await FakeQemu.connect(served.blk)
    try:
        qemu.accept_version(await qemu.version())
        reply = await qemu.dma_map(DEFAULT_GPA, size, fd)
        return 0 if reply.ok else reply.error
    finally:
        await qemu.close()


async def test_an_unsealed_memfd_is_refused_on_both_transports(tmp_path):
    unsealed = sealed_memfd(SIZE, NAME, seals=0)
    try:
        async with ServedBackend.start(tmp_path) as served:
            baseline = await served.baseline()
            assert await _vhost_mem_table(served, unsealed) != 0
            assert await _vfio_dma_map(served, unsealed) == errno.EINVAL
            assert served.log_text().count("not a memfd sealed against shrinking") == 2
            assert _memory_maps(served.pid) == 0
            await served.assert_serving()
            await served.assert_back_to(baseline)
            assert "Traceback" not in served.log_text()
    finally:
        os.close(unsealed)


async def test_a_file_that_is_no_memfd_is_refused(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(bytes(SIZE))
    fd = os.open(path, os.O_RDWR)
    try:
        async with ServedBackend.start(tmp_path) as served:
            baseline = await served.baseline()
            assert await _vhost_mem_table(served, fd) != 0
            assert await _vfio_dma_map(served, fd) == errno.EINVAL
            await served.assert_serving()
            await served.assert_back_to(baseline)
    finally:
        os.close(fd)


async def test_a_sealed_memfd_smaller_than_the_region_is_refused(tmp_path):
    small = sealed_memfd(SIZE // 2, NAME)
    try:
        async with ServedBackend.start(tmp_path) as served:
            baseline = await served.baseline()
            assert await _vhost_mem_table(served, small) != 0
            assert await _vfio_dma_map(served, small) == errno.EINVAL
            assert served.log_text().count("beyond the end of its") == 2
            assert _memory_maps(served.pid) == 0
            await served.assert_serving()
            await served.assert_back_to(baseline)
    finally:
        os.close(small)


async def test_allow_unsealed_memory_maps_unsealed_memfds_but_still_checks_their_size(
        tmp_path):
    # Documented: such a memfd, shrunk by its frontend, still kills the backend (SIGBUS).
    unsealed = sealed_memfd(SIZE, NAME, seals=0)
    try:
        async with ServedBackend.start(tmp_path, extra=["--allow-unsealed-memory"]) as served:
            baseline = await served.baseline()
            assert await _vhost_mem_table(served, unsealed) == 0
            assert await _vfio_dma_map(served, unsealed) == 0
            assert await _vhost_mem_table(served, unsealed, 2 * SIZE) != 0
            assert await _vfio_dma_map(served, unsealed, 2 * SIZE) == errno.EINVAL
            await served.assert_serving()
            await served.assert_back_to(baseline)
    finally:
        os.close(unsealed)


def test_a_sealed_memfd_cannot_shrink():
    """Why sealing is enough: the frontend's ftruncate fails instead of leaving a hole."""
    fd = sealed_memfd(SIZE, NAME)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, SIZE // 2)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        os.close(fd)


# -- defect 2: an interrupt fd that would block the whole process ----------------------------


def _full_eventfd() -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
    os.write(fd, EVENTFD_MAX.to_bytes(8, "little"))
    return fd


def _full_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, bytes(4096))
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


@pytest.fixture(params=["eventfd", "pipe"])
def hostile_fd(request):
    """A blocking fd a write would block on: (fd to hand over, fds to close)."""
    if request.param == "eventfd":
        fd = _full_eventfd()
        yield fd
        os.close(fd)
    else:
        r, w = _full_pipe()
        yield w
        os.close(r)
        os.close(w)


async def test_a_blocking_vhost_user_call_fd_does_not_stop_the_backend(tmp_path, hostile_fd):
    memory, fd = memfd_memory(SIZE)
    ring = FakeDriver(memory, DEFAULT_GPA, 16, span=0x10000)
    try:
        async with ServedBackend.start(tmp_path) as served:
            baseline = await served.baseline()
            fe = await FakeFrontend.connect(served.viommu)
            try:
                await fe.negotiate()
                assert await fe.set_mem_table([_region()], [fd]) == 0
                fds = await fe.start_vring(0, ring)
                assert await fe.ack(R.SET_VRING_CALL, p.U64.pack(0), [hostile_fd]) == 0
                assert await fe.ack(R.SET_VRING_ERR, p.U64.pack(0), [hostile_fd]) == 0
                head = ring.add([struct.pack("<B3xIII4s", 1, 1, 0x10, 0, bytes(4))], [4])
                ring.used_event = ring.used_idx()
                ring.publish()
                fds.kick_ring()
                await asyncio.sleep(0.2)  # the interrupt is due now
                await served.assert_serving(vhost=False)
                assert [h for h, _ in ring.used()] == [head]
                fds.close()
            finally:
                fe.close()
            await served.assert_serving()
            await served.assert_back_to(baseline)
            assert "Traceback" not in served.log_text()
    finally:
        memory.clear()
        os.close(fd)


async def _bar_write(qemu: FakeQemu, offset: int, size: int, value: int) -> None:
    reply = await qemu.region_write(BAR4, offset, value.to_bytes(size, "little"))
    assert reply is not None and reply.ok, f"BAR4 write {offset:#x}: error"


async def _bar_read(qemu: FakeQemu, offset: int, size: int) -> int:
    reply = await qemu.region_read(BAR4, offset, size)
    assert reply.ok
    return int.from_bytes(reply.payload[16:16 + size], "little")


async def test_a_blocking_msix_eventfd_does_not_stop_the_backend(tmp_path, hostile_fd):
    """The rng driver sets up a queue its endpoint cannot reach (no IOMMU domain): the
    kick breaks the device, whose configuration interrupt goes to the hostile fd."""
    ram = sealed_memfd(SIZE, NAME)
    queue_fd = eventfd()
    try:
        async with ServedBackend.start(tmp_path) as served:
            baseline = await served.baseline()
            qemu = await FakeQemu.connect(served.rng)
            try:
                await qemu.startup(ram, SIZE)
                assert (await qemu.set_irqs(MSIX, 0, 1, 0x24, [hostile_fd])).ok
                assert (await qemu.set_irqs(MSIX, 1, 1, 0x24, [queue_fd])).ok
                await qemu.config_write(0x04, 2, await qemu.config_read(0x04, 2) | 0x6)
                await _bar_write(qemu, Reg.STATUS, 1, 0x3)  # ACKNOWLEDGE | DRIVER
                await _bar_write(qemu, Reg.DFSELECT, 4, 1)
                high = await _bar_read(qemu, Reg.DF, 4)
                await _bar_write(qemu, Reg.GFSELECT, 4, 1)
                await _bar_write(qemu, Reg.GF, 4, high)
                await _bar_write(qemu, Reg.STATUS, 1, 0xB)  # | FEATURES_OK
                await _bar_write(qemu, Reg.MSIX_CONFIG, 2, 0)
                await _bar_write(qemu, Reg.Q_SELECT, 2, 0)
                await _bar_write(qemu, Reg.Q_SIZE, 2, 8)
                for reg, addr in ((Reg.Q_DESC_LO, 0x10000), (Reg.Q_DRIVER_LO, 0x11000),
                                  (Reg.Q_DEVICE_LO, 0x12000)):
                    await _bar_write(qemu, reg, 4, addr)
                await _bar_write(qemu, Reg.Q_MSIX, 2, 1)
                await _bar_write(qemu, Reg.Q_ENABLE, 2, 1)
                await _bar_write(qemu, Reg.STATUS, 1, 0xF)  # | DRIVER_OK
                notify = asyncio.ensure_future(_bar_write(qemu, 0x3000, 2, 0))
                await asyncio.wait_for(notify, 5)
                assert await _bar_read(qemu, Reg.STATUS, 1) & 0x40  # NEEDS_RESET
                await served.assert_serving(endpoints=(served.blk,))
            finally:
                await qemu.close()
            await served.assert_serving()
            await served.assert_back_to(baseline)
            assert "Traceback" not in served.log_text()
    finally:
        os.close(ram)
        os.close(queue_fd)


# -- defect 4: guest memory released at once when the frontend goes --------------------------


async def _vhost_sessions(served: ServedBackend, ram: int, ring: FakeDriver) -> None:
    async def session(then) -> None:
        fe = await FakeFrontend.connect(served.viommu)
        try:
            await fe.negotiate()
            assert await fe.set_mem_table([_region()], [ram]) == 0
            await then(fe)
        finally:
            fe.close()
        await asyncio.sleep(0.05)

    async def eof_mid_message(fe):
        await fe.send_raw(p.HEADER.pack(R.SET_VRING_NUM, p.VERSION, 8) + b"\1\2")

    async def garbage(fe):
        await fe.send_raw(b"\xff" * 40)

    async def refused(fe):
        assert await fe.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(9, 3)) != 0
        assert await fe.ack(R.SET_MEM_TABLE, p.MEM_HEADER.pack(1, 0)
                            + p.MEM_REGION.pack(DEFAULT_GPA, SIZE, 0, 1 << 63), [ram]) != 0

    async def rings_then_gone(fe):
        fds = await fe.start_vring(0, ring)
        fds.kick_ring()
        await asyncio.sleep(0.05)
        fds.close()

    async def second_table_while_running(fe):
        fds = await fe.start_vring(0, ring)
        fds.kick_ring()
        await asyncio.sleep(0.05)
        assert await fe.set_mem_table([_region()], [ram]) == 0
        fds.close()

    async def gone_before_reply(fe):
        await fe.send(R.GET_FEATURES)

    for then in (eof_mid_message, garbage, refused, rings_then_gone,
                 second_table_while_running, gone_before_reply):
        await session(then)


async def _vfio_sessions(served: ServedBackend, ram: int) -> None:
    for how in ("abrupt", "malformed", "reset"):
        qemu = await FakeQemu.connect(served.blk)
        try:
            await qemu.startup(ram, SIZE)
            await qemu.enable_msix([eventfd()])
            if how == "malformed":
                await asyncio.get_running_loop().sock_sendall(qemu.sock, b"\xff" * 40)
            elif how == "reset":
                await qemu.reset()
            else:
                qemu.sock.shutdown(2)
            await asyncio.sleep(0.05)
        finally:
            await qemu.close()


async def test_guest_memory_is_released_when_the_frontend_goes_without_the_collector(
        tmp_path, monkeypatch):
    monkeypatch.setenv("PVIOMMU_DEBUG_NO_GC", "1")  # the served process never collects
    ram = sealed_memfd(SIZE, NAME)
    view = GuestMemory()  # the fake driver's view of the RAM
    view.set_regions([RegionSpec(*_region())], [os.dup(ram)])
    ring = FakeDriver(view, DEFAULT_GPA, 16, span=0x10000)
    try:
        async with ServedBackend.start(tmp_path) as served:
            await served.assert_serving()
            baseline = served.resources()
            await _vhost_sessions(served, ram, ring)
            await _vfio_sessions(served, ram)
            await served.assert_serving()
            await served.assert_back_to(baseline)
            assert _memory_maps(served.pid) == 0
            assert not [fd for fd in os.listdir(f"/proc/{served.pid}/fd")
                        if NAME in _readlink(f"/proc/{served.pid}/fd/{fd}")]
            log = served.log_text()
            assert "Traceback" not in log, log
            assert "gone before the reply" in log or "disconnected" in log
    finally:
        view.clear()
        os.close(ram)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
