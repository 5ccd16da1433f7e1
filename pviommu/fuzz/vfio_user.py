"""vfio-user client commands read off a socket by a VfioUserConnection.

The input is a stream of commands, each with its file descriptors: an id, a
command code (a known one mostly), flags, a payload, a size field that matches it
or not, and 0..3 fds (memfds sealed or not for DMA_MAP, eventfds for SET_IRQS). The
connection serves a virtio-rng PCI function (its DMA guest-physical) until EOF.

Checks (vfio-user spec, as QEMU 10.2 speaks it): every message the server sends is
a reply to a command that was sent and wants one (same id and command, in order),
or a DMA_READ/DMA_WRITE request of its own; a failed reply carries the error flag
and a non-zero errno, a successful one neither; no internal error is logged (an
EIO reply marks one); once the client goes, every fd received is closed.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import Counter

from ..devices.rng import VirtioRng
from ..dma import PhysicalDma
from ..memory import GuestMemory
from ..microbench.guest import sealed_memfd
from ..transport.vfio_user import protocol as p
from ..transport.vfio_user.server import VfioUserConnection
from ..virtio.pci import VirtioPciFunction
from .common import Bytes, Finding, check, known, loop, run_async

MEMFD_SIZE = 1 << 16
_KNOWN = [int(c) for c in p.Command]


def _fd(kind: int) -> int:
    if kind == 0:
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    if kind == 1:
        return sealed_memfd(MEMFD_SIZE, "fuzz-vfio-user")
    return sealed_memfd(MEMFD_SIZE, "fuzz-vfio-user", seals=0)


Command = tuple[int, int, int, bytes, int, int, int | None]
"""id, command, flags, payload, fd count, fd kind, size field (None: the true size)."""


def _commands(inp: Bytes) -> list[Command]:
    out: list[Command] = []
    while inp.remaining() and len(out) < 32:
        spec = inp.u8()
        choice = inp.u8()
        command = _KNOWN[choice % len(_KNOWN)] if choice < 0xF8 else inp.u16()
        flags = inp.u8()
        flags = flags & p.FLAG_NO_REPLY if flags & 0x80 else flags & 0x7F
        msg_id = inp.u16()
        size = inp.u8()
        size = size if size < 0xF0 else inp.u16()
        payload = inp.take(size)
        size_field = None if not spec & 0x80 else inp.u32()
        out.append((msg_id, command, flags, payload, spec % 3 if spec & 0x40 else 0,
                    (spec >> 2) % 3, size_field))
    return out


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_input(data: bytes) -> None:
    """Sends the commands ``data`` holds to a fresh connection and checks the replies."""
    commands = _commands(Bytes(data))
    loop()  # made before the count: its own fds are no leak
    before = _fd_count()
    out = run_async(lambda: _session(commands))
    check(_fd_count() == before, f"{_fd_count() - before} fds leaked by the connection")
    _check_replies(commands, out)


async def _session(commands: list[Command]) -> bytes:
    memory = GuestMemory()
    device = VirtioRng(access_platform=False, source=lambda n: bytes(n))
    function = VirtioPciFunction(device, PhysicalDma(memory))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    try:
        conn = VfioUserConnection(function, memory, theirs, Counter(), name="fuzz")
        conn.dma_timeout = 0.01
        for msg_id, command, flags, payload, nfds, kind, size in commands:
            fds = [_fd(kind) for _ in range(nfds)]
            real = p.HEADER.size + len(payload)
            data = p.HEADER.pack(msg_id, command, real if size is None else size & 0xFFFFFFFF,
                                 flags, 0) + payload
            try:
                ours.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       struct.pack(f"{len(fds)}i", *fds))] if fds else [])
            finally:
                for fd in fds:
                    os.close(fd)
        ours.shutdown(socket.SHUT_WR)
        await conn.serve()
        ours.setblocking(False)
        chunks = []
        while True:
            try:
                chunk = ours.recv(1 << 16)
            except (BlockingIOError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        ours.close()
        memory.clear()


def _check_replies(commands: list[Command], out: bytes) -> None:
    # After a size field that is not the message's size the server reads the stream
    # otherwise than it was written: its replies past that point are only checked for
    # their form.
    wanting: list[tuple[int, int]] = []
    synced = True
    posted_oversize: tuple[int, int] | None = None
    for msg_id, command, flags, payload, _, _, size in commands:
        posted = flags & p.FLAG_NO_REPLY or command == p.Command.REGION_WRITE_MULTI
        if size is not None and size & 0xFFFFFFFF != p.HEADER.size + len(payload):
            if posted and size & 0xFFFFFFFF > p.MAX_MESSAGE and flags & 0xF == 0:
                posted_oversize = (msg_id, command)  # refused, the connection closed
            else:
                synced = False
                wanting.append((msg_id, command))
            break
        if not posted:
            wanting.append((msg_id, command))
    pos = k = 0
    while pos < len(out):
        check(len(out) - pos >= p.HEADER.size, "a truncated header from the server")
        msg_id, command, size, flags, error = p.HEADER.unpack_from(out, pos)
        check(p.HEADER.size <= size <= len(out) - pos, f"message size {size} from the server")
        pos += size
        if flags & p.FLAG_TYPE_MASK == p.TYPE_COMMAND:
            check(command in (p.Command.DMA_READ, p.Command.DMA_WRITE),
                  f"the server sent command {command}")
            continue
        check(flags & p.FLAG_TYPE_MASK == p.TYPE_REPLY, f"server message flags {flags:#x}")
        if flags & p.FLAG_ERROR:
            check(error != 0, f"an error reply to {command} without an errno")
        else:
            check(error == 0, f"a successful reply to {command} with errno {error}")
        j = k
        while j < len(wanting) and wanting[j] != (msg_id, command):
            j += 1
        if j < len(wanting):
            k = j + 1
            continue
        if not synced and k >= len(wanting) - 1:
            continue  # past the desynchronising command
        if (msg_id, command) == posted_oversize and known("vfio-user-e2big-posted"):
            # An oversized posted command (REGION_WRITE_MULTI, or NO_REPLY) still gets the
            # E2BIG reply the server sends before it closes (server._read_messages).
            continue
        raise Finding(f"a reply (id {msg_id}, command {command}) to no command that wants "
                      "one")
