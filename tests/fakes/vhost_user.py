"""A fake vhost-user *front-end*: sends what QEMU's vhost-user-base sends, and worse.

Protocol tests drive the real back-end with it, in the same event loop::

    fe = await FakeFrontend.connect(path)
    await fe.negotiate()
    await fe.set_mem_table([(GPA, size, UADDR, 0)], [memfd])
    rings = await fe.start_vring(0, driver)      # NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE

It is not a second implementation of the back-end's rules: it only builds
messages (well-formed or not) and reads replies.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from dataclasses import dataclass
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
        await self.send(request, payload, fds)
        reply = await self.recv()
        assert reply.request == request, f"reply to {reply.request}, expected {request}"
        assert reply.flags == p.VERSION | p.FLAG_REPLY
        return reply

    async def ack(self, request: int, payload: bytes = b"",
                  fds: list[int] | tuple[int, ...] = ()) -> int:
        """Sends with NEED_REPLY and returns the REPLY_ACK status (0 is success)."""
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
                          gpa_to_uaddr: int = DEFAULT_UADDR - DEFAULT_GPA) -> RingFds:
        """Configures vring ``index`` over ``driver``'s rings, as QEMU does at boot."""
        assert await self.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(index, driver.size)) == 0
        assert await self.ack(R.SET_VRING_BASE, p.VRING_STATE.pack(index, 0)) == 0
        assert await self.ack(R.SET_VRING_ADDR, p.VRING_ADDR.pack(
            index, 0, driver.desc + gpa_to_uaddr, driver.used_ring + gpa_to_uaddr,
            driver.avail + gpa_to_uaddr, 0)) == 0
        fds = RingFds(*(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)))
        assert await self.ack(R.SET_VRING_CALL, p.U64.pack(index), [fds.call]) == 0
        assert await self.ack(R.SET_VRING_ERR, p.U64.pack(index), [fds.err]) == 0
        assert await self.ack(R.SET_VRING_KICK, p.U64.pack(index), [fds.kick]) == 0
        assert await self.ack(R.SET_VRING_ENABLE, p.VRING_STATE.pack(index, 1)) == 0
        return fds

