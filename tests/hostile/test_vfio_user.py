"""A hostile vfio-user client against a real backend: DMA maps past the limit, offsets and
sizes past 2^63, deeply nested VERSION JSON, leaving before its replies. Each is refused
(or survived) with one log line and no traceback, and the other sockets keep serving."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from pathlib import Path

from pviommu.transport.vfio_user.server import DEFAULT_MAX_DMA_MAPS
from tests.fakes.served import ServedBackend
from tests.fakes.vfio_user import HDR, QEMU_VERSION_JSON, REGION_READ, VERSION, FakeQemu

RAM = 1 << 20


def guest_ram() -> int:
    """A memfd as QEMU's memory-backend-memfd makes it (sealed against resizing)."""
    fd = os.memfd_create("hostile-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def assert_no_traceback(served: ServedBackend) -> None:
    text = served.log_text()
    assert "Traceback" not in text, text


async def map_until_refused(qemu: FakeQemu, fd: int, tries: int) -> tuple[int, int]:
    """DMA_MAPs ``tries`` 4 KiB pages of ``fd``; returns (how many mapped, first errno)."""
    mapped = 0
    for i in range(tries):
        reply = await qemu.dma_map(0x40000000 + i * 0x1000, 0x1000, fd, offset=i % 256 * 0x1000)
        if not reply.ok:
            return mapped, reply.error
        mapped += 1
    return mapped, 0


async def test_dma_maps_past_the_limit_are_refused_and_starve_nobody(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        await served.assert_serving()
        baseline = served.resources()
        fd = guest_ram()
        qemu = await FakeQemu.connect(served.blk)
        try:
            caps = qemu.accept_version(await qemu.version())
            assert caps["max_dma_maps"] == DEFAULT_MAX_DMA_MAPS
            mapped, err = await map_until_refused(qemu, fd, 2000)
            assert (mapped, err) == (DEFAULT_MAX_DMA_MAPS, errno.ENOSPC)
            assert served.resources().fds < baseline.fds + DEFAULT_MAX_DMA_MAPS + 16
            # Meanwhile QMP, the vhost-user handshake and the other endpoint answer.
            await served.assert_serving(endpoints=(served.rng,))
        finally:
            await qemu.close()
            os.close(fd)
        await served.assert_back_to(baseline)
        await served.assert_serving()
        assert_no_traceback(served)


async def test_max_dma_maps_option_sets_the_limit(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path, extra=["--max-dma-maps", "8"]) as served:
        fd = guest_ram()
        qemu = await FakeQemu.connect(served.rng)
        try:
            assert qemu.accept_version(await qemu.version())["max_dma_maps"] == 8
            assert await map_until_refused(qemu, fd, 20) == (8, errno.ENOSPC)
        finally:
            await qemu.close()
            os.close(fd)
        await served.assert_serving()


async def test_offsets_sizes_and_nesting_beyond_reason_are_einval(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        fd = guest_ram()
        qemu = await FakeQemu.connect(served.blk)
        try:
            deep = await qemu.version(b"[" * 100_000)
            assert (deep.ok, deep.error) == (False, errno.EINVAL)
            qemu.accept_version(await qemu.version())
            for offset, size in ((1 << 63, 0x1000), ((1 << 64) - 0x1000, 0x1000),
                                 (0, 1 << 63), ((1 << 63) - 0x1000, 0x2000)):
                for with_fd in (fd, None):
                    reply = await qemu.dma_map(0x40000000, size, with_fd, offset=offset)
                    assert (reply.ok, reply.error) == (False, errno.EINVAL), (offset, size)
        finally:
            await qemu.close()
            os.close(fd)
        await served.assert_serving()
        assert_no_traceback(served)


async def test_a_client_gone_before_its_replies_is_one_line(tmp_path: Path) -> None:
    body = struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON + b"\0"
    reads = b"".join(HDR.pack(i + 1, REGION_READ, 32, 0, 0) + struct.pack("<QII", 0, 7, 256)
                     for i in range(300))
    async with ServedBackend.start(tmp_path) as served:
        for _ in range(5):
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(str(served.blk))
            raw.sendall(HDR.pack(0, VERSION, 16 + len(body), 0, 0) + body + reads)
            raw.close()  # replies unread: the backend's writes hit EPIPE or ECONNRESET
            await served.assert_serving(endpoints=(served.blk,), vhost=False)
        assert_no_traceback(served)
        lost = [line for line in served.log_text().splitlines()
                if "Broken pipe" in line or "reset by peer" in line]
        assert len(lost) <= 5, lost
