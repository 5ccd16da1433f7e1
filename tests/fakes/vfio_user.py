"""A fake vfio-user *client* that speaks to a server the way QEMU 10.2's vfio-user-pci does.

Protocol tests drive the real server with it, in the same event loop::

    qemu = await FakeQemu.connect(path)
    await qemu.startup(memfd, size)        # QEMU's realize order, then a machine reset
    reply = await qemu.region_read(7, 0, 4)
    await qemu.close()

Messages carry QEMU's exact sizes (the 214-byte VERSION, argsz 32 REGION_INFO,
argsz 20 SET_IRQS even with fds...). Every reply is checked the way QEMU's
receive thread checks it, and what would break a real QEMU is recorded in
``violations`` (a reply larger than QEMU's buffer, fds on a reply, a reply to
nothing pending, a server request larger than max_data_xfer_size + 32: all of
them desynchronise QEMU's stream). Server requests (DMA_READ/DMA_WRITE) are
answered from ``bus``, QEMU's view of guest memory, with QEMU's layout (data
at message byte 28). The layouts are written out here, independently of the
server's protocol module.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pviommu.transport.sockio import close_fds, recv_exact
from tests.fakes.sockets import connect_unix

TIMEOUT = 5.0

HDR = struct.Struct("<HHIII")
REPLY = 0x1
NO_REPLY = 0x10
ERROR = 0x20

VERSION, DMA_MAP, DMA_UNMAP, GET_INFO, REGION_INFO, IO_FDS, IRQ_INFO, SET_IRQS, \
    REGION_READ, REGION_WRITE, DMA_READ, DMA_WRITE, RESET = range(1, 14)
WRITE_MULTI = 15

# QEMU's request JSON, key order and separators as its QDict/JSON writer emit them.
QEMU_VERSION_JSON = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": '
                     b'65535, "max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": '
                     b'268435456, "pgsize": 4096}, "write_multiple": true}}')
QEMU_VERSION_SIZE = 214

DMA_RW = struct.Struct("<QI")  # QEMU's VFIOUserDMARW after the header; data at byte 28
DMA_RW_SIZE = 32  # sizeof(VFIOUserDMARW)

IRQ_NONE, IRQ_BOOL, IRQ_EVENTFD = 1, 2, 4
IRQ_MASK, IRQ_UNMASK, IRQ_TRIGGER = 8, 0x10, 0x20
INTX, MSI, MSIX, ERR, REQ = range(5)
CONFIG = 7
DEFAULT_GPA = 0x40000000


@dataclass
class Reply:
    """One message from the server."""

    id: int
    command: int
    size: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the reply reports success."""
        return not self.flags & ERROR

    def unpack(self, layout: str, offset: int = 0) -> tuple[Any, ...]:
        """Fields of the payload at ``offset``."""
        return struct.unpack_from(layout, self.payload, offset)


@dataclass
class _Pending:
    id: int
    command: int
    rsize: int
    fds_allowed: int
    future: asyncio.Future[Reply]


class Bus:
    """QEMU's bus-master view of guest memory, for DMA_READ/DMA_WRITE (ranges of bytes)."""

    def __init__(self) -> None:
        self.ranges: dict[int, bytearray] = {}

    def add(self, base: int, size: int) -> bytearray:
        """A zeroed range of ``size`` bytes at ``base``."""
        self.ranges[base] = bytearray(size)
        return self.ranges[base]

    def _find(self, addr: int, n: int) -> tuple[bytearray, int]:
        for base, mem in self.ranges.items():
            if base <= addr and addr + n <= base + len(mem):
                return mem, addr - base
        raise LookupError(f"{addr:#x}+{n:#x} is not on the bus")

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr``; LookupError outside every range."""
        mem, off = self._find(addr, n)
        return bytes(mem[off:off + n])

    def write(self, addr: int, data: bytes) -> None:
        """Stores ``data`` at ``addr``; LookupError outside every range."""
        mem, off = self._find(addr, len(data))
        mem[off:off + len(data)] = data


class FakeQemu:
    """One vfio-user-pci client connection to a server's UNIX socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.violations: list[str] = []
        self.received: list[Reply] = []  # every message from the server, in order
        self.dma_requests: list[Reply] = []  # server requests, in order
        self.bus = Bus()
        self.hold_dma = False  # queue server requests in ``held`` instead of answering
        self.held: list[Reply] = []
        self.max_xfer = 1 << 20  # the server's max_data_xfer_size, as QEMU assumes it
        self.max_fds = 8  # QEMU's default for the server's max_msg_fds
        self.eof = asyncio.Event()
        self._request_seen = asyncio.Event()
        self._pending: list[_Pending] = []
        self._next_id = 0
        self._send_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: Path | str) -> FakeQemu:
        """Connects to the server listening on ``path``."""
        return cls(await connect_unix(path))

    async def close(self) -> None:
        """Hangs up, as an exiting QEMU does."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.sock.close()
        for r in self.held:
            close_fds(r.fds)

    async def stop_reading(self) -> None:
        """Stops reading the socket, as a wedged QEMU would."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    # -- the receive side (QEMU's iothread) -------------------------------------------

    def _violation(self, what: str) -> None:
        self.violations.append(what)

    async def _read_loop(self) -> None:
        while True:
            fds: list[int] = []
            try:
                header = await recv_exact(self.sock, HDR.size, fds, 16)
                msg_id, command, size, flags, error = HDR.unpack(header)
                if size < HDR.size:
                    self._violation(f"bad header size {size}")
                    return
                if flags & 0xF not in (0, REPLY):
                    self._violation(f"unknown message type {flags & 0xF}")
                    return
                payload = await recv_exact(self.sock, size - HDR.size, fds, 16)
            except (EOFError, OSError):
                close_fds(fds)
                self.eof.set()
                for pending in self._pending:
                    if not pending.future.done():
                        pending.future.set_exception(EOFError("the server hung up"))
                return
            msg = Reply(msg_id, command, size, flags, error, payload, fds)
            self.received.append(msg)
            if flags & 0xF == REPLY:
                self._on_reply(msg)
            else:
                await self._on_request(msg)

    def _on_reply(self, msg: Reply) -> None:
        pending = next((p for p in self._pending if p.id == msg.id), None)
        if pending is None:
            self._violation(f"unexpected reply (id {msg.id}, command {msg.command})")
            close_fds(msg.fds)
            return
        self._pending.remove(pending)
        if msg.size > pending.rsize:
            self._violation(f"reply larger than recv buffer: command {pending.command} "
                            f"reply {msg.size} > {pending.rsize}")
        if len(msg.fds) > pending.fds_allowed:
            self._violation(f"unexpected FDs in reply to command {pending.command}")
        if not pending.future.done():
            pending.future.set_result(msg)
        else:
            close_fds(msg.fds)

    async def _on_request(self, msg: Reply) -> None:
        self.dma_requests.append(msg)
        self._request_seen.set()
        if msg.size > self.max_xfer + DMA_RW_SIZE:
            self._violation(f"request larger than max: {msg.size}")
            close_fds(msg.fds)
            return
        if self.hold_dma:
            self.held.append(msg)
            return
        await self.answer(msg)

    async def answer(self, msg: Reply) -> None:
        """Services one server request as QEMU's vfio_user_pci_process_req does."""
        if msg.fds:
            close_fds(msg.fds)
            await self._send_error(msg, errno.EINVAL)
            return
        if msg.command not in (DMA_READ, DMA_WRITE):
            await self._send_error(msg, errno.ENOSYS)
            return
        if msg.size < DMA_RW_SIZE:
            await self._send_error(msg, errno.EINVAL)
            return
        addr, count = DMA_RW.unpack_from(msg.payload)
        if msg.command == DMA_READ:
            if count > self.max_xfer:
                await self._send_error(msg, errno.E2BIG)
                return
            try:
                data = self.bus.read(addr, count)
            except LookupError:
                await self._send_error(msg, errno.EFAULT)
                return
            if not msg.flags & NO_REPLY:
                body = DMA_RW.pack(addr, count) + data + bytes(4)
                await self.send_raw(HDR.pack(msg.id, msg.command, HDR.size + len(body), REPLY, 0)
                                    + body)
            return
        if count > msg.size - DMA_RW_SIZE:
            await self._send_error(msg, errno.E2BIG)
            return
        try:
            self.bus.write(addr, msg.payload[DMA_RW.size:DMA_RW.size + count])
        except LookupError:
            await self._send_error(msg, errno.EFAULT)
            return
        if not msg.flags & NO_REPLY:
            await self.send_raw(HDR.pack(msg.id, msg.command, HDR.size, REPLY, 0))

    async def _send_error(self, msg: Reply, err: int) -> None:
        # QEMU answers a failed server request even when it said NO_REPLY (T15).
        await self.send_raw(HDR.pack(msg.id, msg.command, HDR.size, REPLY | ERROR, err))

    async def wait_dma_request(self, count: int = 1, timeout: float = TIMEOUT) -> None:
        """Waits until at least ``count`` server requests have arrived."""
        async def seen() -> None:
            while len(self.dma_requests) < count:
                self._request_seen.clear()
                await self._request_seen.wait()
        await asyncio.wait_for(seen(), timeout)

    async def release(self) -> None:
        """Answers every held server request, in order, and stops holding."""
        self.hold_dma = False
        held, self.held = self.held, []
        for msg in held:
            await self.answer(msg)

    # -- the send side ------------------------------------------------------------------

    async def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Sends bytes as they are, ``fds`` attached to the first byte (as QEMU's sendmsg)."""
        async with self._send_lock:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                data = data[sent:]
            if data:
                await self.loop.sock_sendall(self.sock, data)

    def new_id(self) -> int:
        """The next message id (QEMU: one u16 counter, wrapping)."""
        msg_id = self._next_id
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    def expect(self, msg_id: int, command: int, rsize: int,
               fds_allowed: int = 0) -> asyncio.Future[Reply]:
        """Waits for a reply to a message sent raw (QEMU's pending entry)."""
        future: asyncio.Future[Reply] = self.loop.create_future()
        self._pending.append(_Pending(msg_id, command, rsize, fds_allowed, future))
        return future

    async def send(self, command: int, payload: bytes = b"",
                   fds: list[int] | tuple[int, ...] = (), *, flags: int = 0, rsize: int = 0,
                   fds_allowed: int = 0, msg_id: int | None = None) -> asyncio.Future[Reply] | None:
        """Sends one command; returns the future of its reply (None if NO_REPLY).

        ``rsize`` is QEMU's receive buffer for the reply (0: the request's size).
        """
        msg_id = self.new_id() if msg_id is None else msg_id
        size = HDR.size + len(payload)
        future = None if flags & NO_REPLY else \
            self.expect(msg_id, command, rsize or size, fds_allowed)
        await self.send_raw(HDR.pack(msg_id, command, size, flags, 0) + payload, fds)
        return future

    async def call(self, command: int, payload: bytes = b"",
                   fds: list[int] | tuple[int, ...] = (), *, rsize: int = 0,
                   fds_allowed: int = 0, timeout: float = TIMEOUT) -> Reply:
        """Sends one command and waits for its reply (QEMU's vfio_user_send_wait)."""
        future = await self.send(command, payload, fds, rsize=rsize, fds_allowed=fds_allowed)
        assert future is not None
        reply = await asyncio.wait_for(future, timeout)
        assert reply.command == command, f"reply command {reply.command} to {command}"
        return reply

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """Whether the server hangs up within ``timeout``."""
        try:
            await asyncio.wait_for(self.eof.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def silent(self, wait: float = 0.05) -> bool:
        """Whether the server sends nothing for ``wait`` seconds."""
        before = len(self.received)
        await asyncio.sleep(wait)
        return len(self.received) == before

    # -- QEMU's commands, with QEMU's sizes ---------------------------------------------

    async def version(self, data: bytes | None = QEMU_VERSION_JSON, major: int = 0,
                      minor: int = 0) -> Reply:
        """VERSION: major, minor, JSON and its NUL (214 bytes with QEMU's JSON)."""
        body = struct.pack("<HH", major, minor) + (b"" if data is None else data + b"\0")
        return await self.call(VERSION, body)

    def accept_version(self, reply: Reply) -> dict[str, Any]:
        """QEMU's checks of a VERSION reply (proxy.c); returns the server's capabilities.

        Raises AssertionError with QEMU's complaint where realize would fail.
        """
        assert reply.ok, f"version reply: error {reply.error}"
        major, minor = reply.unpack("<HH")
        assert major == 0 and minor <= 0, "incompatible server version"
        assert reply.payload[-1:] == b"\0", "corrupt version reply"
        doc = json.loads(reply.payload[4:-1].decode())
        assert isinstance(doc, dict), "version reply is not a JSON object"
        caps = doc.get("capabilities", {})
        assert isinstance(caps, dict)
        fds = caps.get("max_msg_fds", 8)
        assert isinstance(fds, int) and 0 <= fds <= 16, "max_msg_fds"
        xfer = caps.get("max_data_xfer_size", 1 << 20)
        assert isinstance(xfer, int) and 0 <= xfer <= 64 << 20, "max_data_xfer_size"
        pgsizes = caps.get("pgsizes", 4096)
        assert isinstance(pgsizes, int) and pgsizes and not pgsizes & 4095, "pgsizes"
        maps = caps.get("max_dma_maps", 65535)
        assert isinstance(maps, int) and maps <= 65535, "max_dma_maps"
        if "write_multiple" in caps:
            assert isinstance(caps["write_multiple"], bool), "write_multiple"
        self.max_fds, self.max_xfer = fds, xfer
        return caps

    async def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0,
                      flags: int = 3, wait: bool = True) -> Reply | asyncio.Future[Reply]:
        """DMA_MAP (argsz 32, 48 bytes); RAM is READ|WRITE (3), ROM READ (1)."""
        body = struct.pack("<IIQQQ", 32, flags, offset, iova, size)
        future = await self.send(DMA_MAP, body, [fd] if fd is not None else [])
        assert future is not None
        return await asyncio.wait_for(future, TIMEOUT) if wait else future

    async def dma_unmap(self, iova: int, size: int, flags: int = 0) -> Reply:
        """DMA_UNMAP (argsz 24, 40 bytes); flags 2 with 0/0 unmaps everything."""
        return await self.call(DMA_UNMAP, struct.pack("<IIQQ", 24, flags, iova, size))

    async def get_info(self) -> Reply:
        """DEVICE_GET_INFO: argsz 16, QEMU's buffer 32 bytes."""
        return await self.call(GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))

    async def region_info(self, index: int, argsz: int = 32) -> Reply:
        """GET_REGION_INFO: a 48-byte message whatever argsz; buffer 16 + argsz, one fd."""
        body = struct.pack("<IIIIQQ", argsz, 0, index, 0, 0, 0)
        return await self.call(REGION_INFO, body, rsize=HDR.size + argsz, fds_allowed=1)

    async def irq_info(self, index: int) -> Reply:
        """GET_IRQ_INFO: argsz 16, 32 bytes."""
        return await self.call(IRQ_INFO, struct.pack("<IIII", 16, 0, index, 0))

    async def set_irqs(self, index: int, start: int, count: int, flags: int,
                       fds: list[int] | tuple[int, ...] = ()) -> Reply:
        """SET_IRQS: 36 bytes, argsz 20 even when eventfds ride along (T19)."""
        body = struct.pack("<IIIII", 20, flags, index, start, count)
        return await self.call(SET_IRQS, body, fds)

    async def region_read(self, region: int, offset: int, count: int) -> Reply:
        """REGION_READ: 32 bytes; buffer 32 + count."""
        return await self.call(REGION_READ, struct.pack("<QII", offset, region, count),
                               rsize=32 + count)

    async def region_write(self, region: int, offset: int, data: bytes,
                           posted: bool = False) -> Reply | None:
        """REGION_WRITE: 32 + count bytes; posted (NO_REPLY) ones get no reply."""
        body = struct.pack("<QII", offset, region, len(data)) + data
        if posted:
            await self.send(REGION_WRITE, body, flags=NO_REPLY)
            return None
        return await self.call(REGION_WRITE, body)

    async def write_multi(self, writes: list[tuple[int, int, bytes]]) -> None:
        """REGION_WRITE_MULTI of (region, offset, data <= 8 bytes); always NO_REPLY."""
        body = struct.pack("<Q", len(writes)) + b"".join(
            struct.pack("<QII8s", offset, region, len(data), data)
            for region, offset, data in writes)
        await self.send(WRITE_MULTI, body, flags=NO_REPLY)

    async def reset(self) -> Reply:
        """DEVICE_RESET: header only both ways."""
        return await self.call(RESET)

    async def config_read(self, offset: int, size: int) -> int:
        """A config read as QEMU forwards it; asserts success."""
        reply = await self.region_read(CONFIG, offset, size)
        assert reply.ok, f"config read {offset:#x}: error {reply.error}"
        return int.from_bytes(reply.payload[16:16 + size], "little")

    async def config_write(self, offset: int, size: int, value: int) -> None:
        """A config write (never posted); asserts success."""
        reply = await self.region_write(CONFIG, offset, value.to_bytes(size, "little"))
        assert reply is not None and reply.ok, f"config write {offset:#x}: error"

    # -- QEMU's sequences ---------------------------------------------------------------

    async def startup(self, memfd: int | None, size: int, gpa: int = DEFAULT_GPA,
                      extra_maps: list[tuple[int, int]] = ()) -> dict[str, Any]:
        """vfio-user-pci realize, in QEMU's order, then the machine reset.

        Returns what QEMU learnt: capabilities, device info, region infos, IRQ infos.
        """
        learnt: dict[str, Any] = {}
        reply = await self.version()
        assert len(reply.payload) + HDR.size <= QEMU_VERSION_SIZE
        learnt["caps"] = self.accept_version(reply)
        # The memory listener's maps go out "nowait"; QEMU then waits for the last.
        maps = [(gpa, size, memfd)] + [(a, n, None) for a, n in extra_maps]
        futures = [await self.dma_map(a, n, fd, wait=False) for a, n, fd in maps]
        last = await asyncio.wait_for(futures[-1], TIMEOUT)  # type: ignore[arg-type]
        assert last.ok, f"DMA_MAP: error {last.error}"
        info = await self.get_info()
        assert info.ok, "vfio_user_get_info failed"
        learnt["info"] = info.unpack("<IIII")
        argsz, flags, regions, irqs = learnt["info"]
        assert regions >= 8 and irqs >= 3, "device info"
        learnt["regions"] = {}
        for index in (0, 1, 2, 3, 4, 5, CONFIG):
            r = await self.region_info(index)
            assert r.ok, f"region {index}: error {r.error}"
            learnt["regions"][index] = r.unpack("<IIIIQQ")
        learnt["err"] = await self.irq_info(ERR)
        config_size = learnt["regions"][CONFIG][4]
        config = await self.region_read(CONFIG, 0, config_size)
        assert config.ok and config.unpack("<QII")[2] == config_size, "config read"
        learnt["config"] = config.payload[16:]
        rom = await self.config_read(0x30, 4)
        await self.config_write(0x30, 4, 0xFFFFF800)
        learnt["rom_size"] = await self.config_read(0x30, 4) & 0xFFFFF800
        await self.config_write(0x30, 4, rom)
        for bar in range(6):
            await self.config_read(0x10 + 4 * bar, 4)
        msix = await self.irq_info(MSIX)
        assert msix.ok, "MSI-X IRQ info"
        learnt["msix"] = msix.unpack("<IIII")
        await self.machine_reset()
        return learnt

    async def machine_reset(self) -> None:
        """vfio_pci_pre_reset, DEVICE_RESET, vfio_pci_post_reset (no INTx: pin 0)."""
        assert (await self.set_irqs(MSIX, 0, 0, IRQ_NONE | IRQ_TRIGGER)).ok
        cmd = await self.config_read(0x04, 2)
        await self.config_write(0x04, 2, cmd & ~0x407)
        assert (await self.reset()).ok
        for bar in range(6):
            await self.config_write(0x10 + 4 * bar, 4, 0)

    async def enable_msix(self, eventfds: list[int]) -> None:
        """The guest enables MSI-X and unmasks each vector (TCG: one fd per message)."""
        assert (await self.set_irqs(MSIX, 0, 1, IRQ_EVENTFD | IRQ_TRIGGER)).ok  # no vector yet
        for vector, fd in enumerate(eventfds):
            assert (await self.set_irqs(MSIX, vector, 1, IRQ_EVENTFD | IRQ_TRIGGER, [fd])).ok


def eventfd() -> int:
    """A non-blocking eventfd, as QEMU passes for an interrupt."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
