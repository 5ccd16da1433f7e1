"""A fake vhost-user *front-end*: sends what QEMU's vhost-user-base sends, and worse.

Protocol tests drive the real back-end with it, in the same event loop::

    fe = await FakeFrontend.connect(path)
    await fe.negotiate()
    await fe.set_mem_table([(GPA, size, UADDR, 0)], [memfd])
    rings = await fe.start_vring(0, driver)      # NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE

With VIRTIO_F_ACCESS_PLATFORM it also plays QEMU's vIOMMU side::

    channel = await fe.set_backend_channel()     # SET_BACKEND_REQ_FD, a socket pair
    stage1 = Stage1({IOVA: UADDR})               # the guest's stage 1, page by page
    channel.serve(stage1.on_miss(fe))            # MISS -> UPDATE (acked) -> MISS ack
    await fe.invalidate(IOVA, 0x1000)            # what a guest unmap sends

It is not a second implementation of the back-end's rules: it only builds
messages (well-formed or not) and reads replies.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pviommu.transport.vhost_user import protocol as p
from pviommu.transport.vhost_user.protocol import Request as R
from tests.fakes.sockets import connect_unix

from .virtio_driver import DEFAULT_GPA, DEFAULT_UADDR, FakeDriver

TIMEOUT = 5.0


@dataclass
class Reply:
    """One message the back-end sent."""

    request: int
    flags: int
    payload: bytes

    @property
    def u64(self) -> int:
        """The payload as one u64 (REPLY_ACK status, features, queue count)."""
        return p.U64.unpack(self.payload)[0]


@dataclass
class RingFds:
    """The eventfds the front-end gave one vring (it keeps its own copies)."""

    kick: int
    call: int
    err: int

    def close(self) -> None:
        """Closes the front-end's copies."""
        for fd in (self.kick, self.call, self.err):
            os.close(fd)

    def kick_ring(self) -> None:
        """Notifies the back-end, as a guest's queue notify does through QEMU."""
        os.write(self.kick, (1).to_bytes(8, "little"))

    @staticmethod
    def _take(fd: int) -> int:
        try:
            return int.from_bytes(os.read(fd, 8), "little")
        except BlockingIOError:
            return 0

    def calls(self) -> int:
        """How many interrupts the back-end signalled since the last look."""
        return self._take(self.call)

    def errors(self) -> int:
        """How many vring errors the back-end signalled since the last look."""
        return self._take(self.err)

    async def wait_call(self, timeout: float = TIMEOUT) -> None:
        """Waits until the call eventfd is signalled (and consumes it)."""
        await _wait_readable(self.call, timeout)
        assert self.calls() > 0

    async def wait_err(self, timeout: float = TIMEOUT) -> None:
        """Waits until the error eventfd is signalled (and consumes it)."""
        await _wait_readable(self.err, timeout)
        assert self.errors() > 0


async def _wait_readable(fd: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(fd)


class FakeFrontend:
    """One front-end connection to a back-end's UNIX socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        # One request/reply exchange at a time on the main socket, as QEMU's
        # single-threaded vhost-user code does (a MISS's UPDATE waits its turn).
        self.exchange = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path | str) -> FakeFrontend:
        """Connects to the back-end listening on ``path``."""
        return cls(await connect_unix(path))

    def close(self) -> None:
        """Hangs up, as a QEMU that exits does."""
        self.sock.close()

    # -- raw messages ----------------------------------------------------------------

    async def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Sends bytes as they are, with ``fds`` attached to the first byte."""
        if fds:
            # Small messages: the socket buffer takes them whole.
            sent = socket.send_fds(self.sock, [data], list(fds))
            data = data[sent:]
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def send(self, request: int, payload: bytes = b"",
                   fds: list[int] | tuple[int, ...] = (), need_reply: bool = False,
                   flags: int | None = None) -> None:
        """Sends one message; ``flags`` overrides the header's flags word."""
        if flags is None:
            flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        await self.send_raw(p.HEADER.pack(request, flags, len(payload)) + payload, fds)

    async def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.loop.sock_recv(self.sock, n - len(buf))
            if not chunk:
                raise EOFError("the back-end closed the connection")
            buf += chunk
        return buf

    async def recv(self, timeout: float = TIMEOUT) -> Reply:
        """The next message from the back-end."""
        async def one() -> Reply:
            request, flags, size = p.HEADER.unpack(await self._recv_exact(p.HEADER.size))
            return Reply(request, flags, await self._recv_exact(size) if size else b"")
        return await asyncio.wait_for(one(), timeout)

    async def call(self, request: int, payload: bytes = b"",
                   fds: list[int] | tuple[int, ...] = ()) -> Reply:
        """Sends a request that always has a reply, and returns it (checked as a reply)."""
        async with self.exchange:
            await self.send(request, payload, fds)
            reply = await self.recv()
        assert reply.request == request, f"reply to {reply.request}, expected {request}"
        assert reply.flags == p.VERSION | p.FLAG_REPLY
        return reply

    async def call_fds(self, request: int, payload: bytes = b"",
                       fds: list[int] | tuple[int, ...] = ()) -> tuple[Reply, list[int]]:
        """As :meth:`call`, for a reply that carries file descriptors (GET_INFLIGHT_FD);
        the caller owns them."""
        async with self.exchange:
            await self.send(request, payload, fds)
            await _wait_readable(self.sock.fileno(), TIMEOUT)
            head, got, _flags, _addr = socket.recv_fds(self.sock, p.HEADER.size, 4)
            if len(head) < p.HEADER.size:
                head += await self._recv_exact(p.HEADER.size - len(head))
            req, flags, size = p.HEADER.unpack(head)
            reply = Reply(req, flags, await self._recv_exact(size) if size else b"")
        assert reply.request == request and reply.flags == p.VERSION | p.FLAG_REPLY
        return reply, got

    async def inflight_region(self, num_queues: int, queue_size: int
                              ) -> tuple[int, int, int]:
        """GET_INFLIGHT_FD then SET_INFLIGHT_FD with the region, as QEMU's vhost-user-blk
        does at its first start; returns (fd, mmap size, mmap offset): the front-end
        keeps the region for the next back-end."""
        reply, fds = await self.call_fds(R.GET_INFLIGHT_FD, p.INFLIGHT.pack(
            0, 0, num_queues, queue_size))
        size, offset, _n, _q = p.INFLIGHT.unpack(reply.payload)
        assert len(fds) == 1 and size > 0
        assert await self.set_inflight(fds[0], size, offset, num_queues, queue_size) == 0
        return fds[0], size, offset

    async def set_inflight(self, fd: int, size: int, offset: int, num_queues: int,
                           queue_size: int) -> int:
        """SET_INFLIGHT_FD (acked); what QEMU sends a back-end that connects again."""
        return await self.ack(R.SET_INFLIGHT_FD,
                              p.INFLIGHT.pack(size, offset, num_queues, queue_size), [fd])

    async def ack(self, request: int, payload: bytes = b"",
                  fds: list[int] | tuple[int, ...] = ()) -> int:
        """Sends with NEED_REPLY and returns the REPLY_ACK status (0 is success)."""
        async with self.exchange:
            await self.send(request, payload, fds, need_reply=True)
            reply = await self.recv()
        assert reply.request == request
        assert reply.flags == p.VERSION | p.FLAG_REPLY
        assert len(reply.payload) == 8
        return reply.u64

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """Whether the back-end hangs up (within ``timeout``) without sending anything."""
        try:
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1), timeout)
        except (ConnectionResetError, BrokenPipeError):
            return True
        return data == b""

    async def silent(self, wait: float = 0.05) -> bool:
        """Whether the back-end has sent nothing after ``wait`` seconds."""
        await asyncio.sleep(wait)
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable

    # -- QEMU's sequence ------------------------------------------------------------

    async def negotiate(self, features: int | None = None,
                        protocol: int | None = None) -> tuple[int, int]:
        """GET/SET_FEATURES and protocol features, SET_OWNER, as QEMU orders them.

        ``None`` accepts everything offered. Returns what was offered.
        """
        offered = (await self.call(R.GET_FEATURES)).u64
        await self.send(R.SET_OWNER)
        offered_protocol = 0
        if offered & (1 << p.F_PROTOCOL_FEATURES):
            offered_protocol = (await self.call(R.GET_PROTOCOL_FEATURES)).u64
            await self.send(R.SET_PROTOCOL_FEATURES, p.U64.pack(
                offered_protocol if protocol is None else protocol))
        await self.send(R.SET_FEATURES, p.U64.pack(offered if features is None else features))
        return offered, offered_protocol

    async def set_mem_table(self, regions: list[tuple[int, int, int, int]],
                            fds: list[int]) -> int:
        """SET_MEM_TABLE of (gpa, size, uaddr, mmap offset) regions; returns the ack."""
        payload = p.MEM_HEADER.pack(len(regions), 0) + b"".join(
            p.MEM_REGION.pack(*r) for r in regions)
        return await self.ack(R.SET_MEM_TABLE, payload, fds)

    async def start_vring(self, index: int, driver: FakeDriver,
                          gpa_to_uaddr: int = DEFAULT_UADDR - DEFAULT_GPA,
                          base: int = 0) -> RingFds:
        """Configures vring ``index`` over ``driver``'s rings, as QEMU does at boot
        (``base``: SET_VRING_BASE, e.g. the used index after a back-end died)."""
        assert await self.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(index, driver.size)) == 0
        assert await self.ack(R.SET_VRING_BASE, p.VRING_STATE.pack(index, base)) == 0
        assert await self.ack(R.SET_VRING_ADDR, p.VRING_ADDR.pack(
            index, 0, driver.desc + gpa_to_uaddr, driver.used_ring + gpa_to_uaddr,
            driver.avail + gpa_to_uaddr, 0)) == 0
        fds = RingFds(*(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)))
        assert await self.ack(R.SET_VRING_CALL, p.U64.pack(index), [fds.call]) == 0
        assert await self.ack(R.SET_VRING_ERR, p.U64.pack(index), [fds.err]) == 0
        assert await self.ack(R.SET_VRING_KICK, p.U64.pack(index), [fds.kick]) == 0
        assert await self.ack(R.SET_VRING_ENABLE, p.VRING_STATE.pack(index, 1)) == 0
        return fds


    # -- QEMU's vIOMMU side (ACCESS_PLATFORM) ---------------------------------------------

    async def set_backend_channel(self) -> FakeBackendChannel:
        """SET_BACKEND_REQ_FD with one end of a new socket pair, as QEMU's realize does."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            assert await self.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
        finally:
            theirs.close()
        return FakeBackendChannel(ours)

    async def iotlb(self, msg: p.IotlbMsg) -> int:
        """Sends an IOTLB_MSG with NEED_REPLY (QEMU always asks) and returns the ack."""
        return await self.ack(R.IOTLB_MSG, msg.pack())

    async def update(self, iova: int, size: int, uaddr: int,
                     perm: int = p.IotlbPerm.RW) -> int:
        """IOTLB UPDATE (QEMU always says RW); returns the ack."""
        return await self.iotlb(p.IotlbMsg(iova, size, uaddr, perm, p.IotlbType.UPDATE))

    async def invalidate(self, iova: int, size: int) -> int:
        """IOTLB INVALIDATE (size 0: everything, as lazy mode sends); returns the ack."""
        return await self.iotlb(p.IotlbMsg(iova, size, 0, 0, p.IotlbType.INVALIDATE))


MissHandler = Callable[[p.IotlbMsg], Awaitable[int]]


class FakeBackendChannel:
    """QEMU's end of the back-end channel: reads the back-end's requests, acks them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.misses: list[p.IotlbMsg] = []
        self.task: asyncio.Task[None] | None = None

    async def read(self, timeout: float = TIMEOUT) -> tuple[int, int, bytes]:
        """The next request the back-end sent: (request, flags, payload)."""
        async def exact(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = await self.loop.sock_recv(self.sock, n - len(buf))
                if not chunk:
                    raise EOFError("the back-end closed its channel")
                buf += chunk
            return buf

        async def one() -> tuple[int, int, bytes]:
            request, flags, size = p.HEADER.unpack(await exact(p.HEADER.size))
            return request, flags, await exact(size) if size else b""
        return await asyncio.wait_for(one(), timeout)

    async def reply(self, request: int, status: int) -> None:
        """Acks a request with the u64 ``status``, as QEMU's backend_read does."""
        await self.loop.sock_sendall(self.sock, p.HEADER.pack(
            request, p.VERSION | p.FLAG_REPLY, 8) + p.U64.pack(status))

    async def next_miss(self, timeout: float = TIMEOUT) -> p.IotlbMsg:
        """Reads one request and checks it is an IOTLB MISS with need-reply."""
        request, flags, payload = await self.read(timeout)
        assert request == p.BackendRequest.IOTLB_MSG, request
        assert flags == p.VERSION | p.FLAG_NEED_REPLY, hex(flags)
        msg = p.IotlbMsg.unpack(payload)
        assert msg.type == p.IotlbType.MISS
        self.misses.append(msg)
        return msg

    def serve(self, on_miss: MissHandler) -> None:
        """Answers every MISS in the background with ``on_miss``'s status."""
        async def loop() -> None:
            try:
                while True:
                    msg = await self.next_miss(timeout=3600)
                    await self.reply(p.BackendRequest.IOTLB_MSG, await on_miss(msg))
            except (EOFError, OSError):
                pass
        self.task = self.loop.create_task(loop())

    def close(self) -> None:
        """Stops serving and closes QEMU's end."""
        if self.task is not None:
            self.task.cancel()
        self.sock.close()


@dataclass
class Stage1:
    """The guest's stage 1 as QEMU's vIOMMU resolves it: iova page -> QEMU uaddr."""

    pages: dict[int, int] = field(default_factory=dict)
    page_size: int = 0x1000

    def on_miss(self, fe: FakeFrontend) -> MissHandler:
        """QEMU's MISS handling: UPDATE on the main socket, wait for its ack, then
        ack the MISS with 0; an unmapped iova is acked with 1 (a stage-1 fault)."""
        async def handle(msg: p.IotlbMsg) -> int:
            page = msg.iova & ~(self.page_size - 1)
            uaddr = self.pages.get(page)
            if uaddr is None:
                return 1
            ack = await fe.update(page, self.page_size, uaddr, p.IotlbPerm.RW)
            return 0 if ack == 0 else 1
        return handle
