"""A minimal, blocking vhost-user *front-end*: what QEMU sends to bring up a device,
and its vIOMMU side (the back-end channel and IOTLB messages).

It is the micro-benchmark's client, so it does the least per message: blocking
sockets, no checks beyond the reply's type. Guest rings are :class:`Ring`
over :class:`GuestRam`; each ring's kick and call are eventfds.
"""

from __future__ import annotations

import os
import select
import socket
from dataclasses import dataclass
from pathlib import Path

from ..transport.vhost_user import protocol as p
from ..transport.vhost_user.protocol import Request as R
from .guest import GuestRam, Ring
from .stats import take_eventfd, wait_fd

ONE = (1).to_bytes(8, "little")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a blocking ``sock``; EOFError if it closes first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the back-end closed the connection")
        buf += chunk
    return buf


def read_message(sock: socket.socket) -> tuple[int, int, bytes]:
    """One vhost-user message: (request, flags, payload)."""
    request, flags, size = p.HEADER.unpack(recv_exact(sock, p.HEADER.size))
    return request, flags, recv_exact(sock, size) if size else b""


@dataclass
class RingFds:
    """The front-end's ends of one vring's eventfds."""

    kick: int
    call: int
    err: int

    def __post_init__(self) -> None:
        self.poller = select.poll()
        self.poller.register(self.call, select.POLLIN)

    def kick_ring(self) -> None:
        """Notifies the back-end."""
        os.write(self.kick, ONE)

    def wait_call(self) -> None:
        """Blocks until the back-end signals the call eventfd, and consumes it."""
        while True:
            wait_fd(self.poller)
            if take_eventfd(self.call):
                return

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


class VhostUserClient:
    """One front-end connection to a back-end's UNIX socket."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.rings: list[RingFds] = []

    def close(self) -> None:
        """Hangs up and closes the rings' eventfds."""
        self.sock.close()
        for ring in self.rings:
            ring.close()

    def send(self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             need_reply: bool = False) -> None:
        """Sends one message, ``fds`` attached."""
        flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        data = p.HEADER.pack(request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def reply(self, request: int) -> bytes:
        """The reply to ``request`` (the next message on the main socket)."""
        got, flags, payload = read_message(self.sock)
        if got != request or not flags & p.FLAG_REPLY:
            raise RuntimeError(f"vhost-user: got {got} flags {flags:#x}, expected a reply to "
                               f"{request}")
        return payload

    def call(self, request: int, payload: bytes = b"") -> int:
        """A request that always has a u64 reply; returns it."""
        self.send(request, payload)
        value: int = p.U64.unpack(self.reply(request))[0]
        return value

    def ack(self, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
            ) -> None:
        """Sends with NEED_REPLY; raises RuntimeError unless the REPLY_ACK says success."""
        self.send(request, payload, fds, need_reply=True)
        status = p.U64.unpack(self.reply(request))[0]
        if status:
            raise RuntimeError(f"vhost-user: request {request} refused ({status})")

    def negotiate(self) -> int:
        """QEMU's GET/SET_FEATURES and protocol features, accepting everything offered;
        returns the features."""
        features = self.call(R.GET_FEATURES)
        self.send(R.SET_OWNER)
        if features & (1 << p.F_PROTOCOL_FEATURES):
            protocol = self.call(R.GET_PROTOCOL_FEATURES)
            self.send(R.SET_PROTOCOL_FEATURES, p.U64.pack(protocol))
        self.send(R.SET_FEATURES, p.U64.pack(features))
        return features

    def set_mem_table(self, ram: GuestRam) -> None:
        """Shares ``ram`` as the only memory region."""
        self.ack(R.SET_MEM_TABLE, p.MEM_HEADER.pack(1, 0) + p.MEM_REGION.pack(*ram.region()),
                 [ram.fd])

    def start_vring(self, index: int, ring: Ring, to_uaddr: int) -> RingFds:
        """Configures vring ``index`` over ``ring``; ``to_uaddr`` is added to its guest
        addresses (QEMU sends user addresses, or IOVAs with ACCESS_PLATFORM: 0)."""
        self.ack(R.SET_VRING_NUM, p.VRING_STATE.pack(index, ring.size))
        self.ack(R.SET_VRING_BASE, p.VRING_STATE.pack(index, 0))
        self.ack(R.SET_VRING_ADDR, p.VRING_ADDR.pack(index, 0, ring.desc + to_uaddr,
                                                     ring.used + to_uaddr,
                                                     ring.avail + to_uaddr, 0))
        fds = RingFds(*(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)))
        self.rings.append(fds)
        self.ack(R.SET_VRING_CALL, p.U64.pack(index), [fds.call])
        self.ack(R.SET_VRING_ERR, p.U64.pack(index), [fds.err])
        self.ack(R.SET_VRING_KICK, p.U64.pack(index), [fds.kick])
        self.ack(R.SET_VRING_ENABLE, p.VRING_STATE.pack(index, 1))
        return fds

    # -- QEMU's vIOMMU side (ACCESS_PLATFORM) ----------------------------------------------

    def backend_channel(self) -> socket.socket:
        """SET_BACKEND_REQ_FD with one end of a new socket pair; returns the other end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        finally:
            theirs.close()
        return ours

    def update(self, iova: int, size: int, uaddr: int) -> None:
        """IOTLB UPDATE, read-write as QEMU sends it, acked."""
        self.ack(R.IOTLB_MSG, p.IotlbMsg(iova, size, uaddr, p.IotlbPerm.RW,
                                         p.IotlbType.UPDATE).pack())

    def invalidate(self, iova: int, size: int) -> None:
        """IOTLB INVALIDATE, acked."""
        self.ack(R.IOTLB_MSG, p.IotlbMsg(iova, size, 0, 0, p.IotlbType.INVALIDATE).pack())


def ack_backend_request(channel: socket.socket, request: int, status: int) -> None:
    """Acks a back-end request on the back-end channel, as QEMU's backend_read does."""
    channel.sendall(p.HEADER.pack(request, p.VERSION | p.FLAG_REPLY, 8) + p.U64.pack(status))
