"""vhost-user front-end messages read off a socket by a VhostUserConnection.

The input is a stream of messages, each with the file descriptors it passes: a
request code (a known one mostly, any u32 sometimes), flags, a payload of any size
and 0..3 fds (eventfds, memfds sealed or not, a socket for the back-end channel).
They are sent over a socketpair with SCM_RIGHTS, the socket is shut for writing,
and the connection serves the device (the virtio-iommu, or a virtio-rng with
ACCESS_PLATFORM, whose IOTLB messages, back-end channel and rings over IOVAs this
reaches) until EOF; the eventfds sent as kick fds are then kicked.

Checks (vhost-user spec): every reply has the REPLY flag and version 1, answers a
request that was sent (in order) and was one that gets a reply (a GET, or a
need-reply request: then a u64 0 or 1, the REPLY_ACK); a malformed header ends the
connection, anything else is refused and the connection goes on; no internal error
is logged; once the connection is closed every fd it received is closed (the
process holds as many fds as before the input).
"""

from __future__ import annotations

import os
import socket
import struct

from ..devices.rng import VirtioRng
from ..devices.viommu import VirtioIommu
from ..iommu.pv import IommuConfig, PvIommu
from ..microbench.guest import sealed_memfd
from ..transport.vhost_user import protocol as p
from ..transport.vhost_user.backend import VhostUserConnection
from ..virtio.device import VirtioDevice
from .common import Bytes, check, loop, run_async

MEMFD_SIZE = 1 << 16
_KNOWN = [int(r) for r in p.Request]
_GETS = {1, 11, 15, 17, 24, 31, 36, 40}  # requests whose answer is a reply, REPLY_ACK or not


def _fd(kind: int, keep: list[int]) -> int:
    """A new fd of ``kind`` to pass; eventfds are also kept (dup) to kick later."""
    if kind == 0:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        keep.append(os.dup(fd))
        return fd
    if kind == 1:
        return sealed_memfd(MEMFD_SIZE, "fuzz-vhost-user")
    if kind == 2:
        return sealed_memfd(MEMFD_SIZE, "fuzz-vhost-user", seals=0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    return a.detach()


def _messages(inp: Bytes) -> list[tuple[int, int, bytes, int, int]]:
    """(request, flags, payload, fd count, fd kind) of each message the input holds."""
    out: list[tuple[int, int, bytes, int, int]] = []
    while inp.remaining() and len(out) < 32:
        spec = inp.u8()
        choice = inp.u8()
        request = _KNOWN[choice % len(_KNOWN)] if choice < 0xF8 else inp.u32()
        flags = inp.u8()
        flags = p.VERSION | (flags & p.FLAG_NEED_REPLY) if flags & 0x80 else flags & 0x7F
        size = inp.u8()
        size = size if size < 0xF0 else inp.u16() % (p.MAX_PAYLOAD + 64)
        payload = inp.take(size)
        out.append((request, flags, payload, spec & 3, (spec >> 2) & 3))
    return out


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_input(data: bytes) -> None:
    """Sends the messages ``data`` holds to a fresh connection and checks its replies."""
    inp = Bytes(data)
    which = inp.u8()
    messages = _messages(inp)
    loop()  # made before the count: its own fds are no leak
    before = _fd_count()
    replies = run_async(lambda: _session(which, messages))
    check(_fd_count() == before, f"{_fd_count() - before} fds leaked by the connection")
    _check_replies(messages, replies)


async def _session(which: int, messages: list[tuple[int, int, bytes, int, int]]) -> bytes:
    device: VirtioDevice
    if which & 1:
        device = VirtioRng(access_platform=True, source=lambda n: bytes(n))
    else:
        device = VirtioIommu(PvIommu(IommuConfig(), (0x10, 0x18)))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    kicks: list[int] = []
    try:
        conn = VhostUserConnection(device, theirs, kick_threads=False)
        for request, flags, payload, nfds, kind in messages:
            fds = [_fd(kind, kicks) for _ in range(nfds)]
            data = p.HEADER.pack(request, flags, len(payload)) + payload
            try:
                ours.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       struct.pack(f"{len(fds)}i", *fds))] if fds else [])
            finally:
                for fd in fds:
                    os.close(fd)
        ours.shutdown(socket.SHUT_WR)
        served = loop().create_task(conn.serve())
        for fd in kicks:  # kick whatever ring they became
            os.eventfd_write(fd, 1)
        await served
        ours.setblocking(False)
        chunks = []
        while True:
            try:
                chunk = ours.recv(1 << 16)
            except (BlockingIOError, ConnectionResetError):  # reset: it closed, unread input
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        for fd in kicks:
            os.close(fd)
        ours.close()


def _check_replies(messages: list[tuple[int, int, bytes, int, int]], replies: bytes) -> None:
    sent = [(r, f) for r, f, _, _, _ in messages]
    pos = i = 0
    while pos < len(replies):
        check(len(replies) - pos >= p.HEADER.size, "a truncated reply header")
        request, flags, size = p.HEADER.unpack_from(replies, pos)
        payload = replies[pos + p.HEADER.size:pos + p.HEADER.size + size]
        check(len(payload) == size, "a truncated reply payload")
        pos += p.HEADER.size + size
        check(flags == p.VERSION | p.FLAG_REPLY, f"reply flags {flags:#x}")
        while i < len(sent) and not (sent[i][0] == request and (
                request in _GETS or sent[i][1] & p.FLAG_NEED_REPLY)):
            i += 1
        check(i < len(sent), f"a reply to {request} answers no request sent")
        i += 1
        if request not in _GETS:
            check(size == 8 and payload in (bytes(8), struct.pack("<Q", 1)),
                  f"REPLY_ACK to {request} is {payload.hex()}, not a u64 0 or 1")
