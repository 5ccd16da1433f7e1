"""WatchedSocket: exact reads with passed fds, one reader kept while reads wait."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from pviommu.transport.watched import WatchedSocket


async def test_reads_exactly_with_fds_and_keeps_its_reader_while_waiting() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    watched = WatchedSocket(ours, 4)
    loop = asyncio.get_running_loop()
    try:
        fds: list[int] = []
        pending = asyncio.ensure_future(watched.recv_exact(6, fds))
        await asyncio.sleep(0)
        r, w = os.pipe()
        socket.send_fds(theirs, [b"abc"], [r])
        theirs.send(b"def")
        assert await pending == b"abcdef"
        assert len(fds) == 1
        os.close(fds[0])
        os.close(r)
        os.close(w)
        assert watched._loop is loop  # still watched: the next wait adds nothing
        theirs.send(b"x")
        await asyncio.sleep(0.01)  # readable with nobody waiting: the reader is dropped
        assert watched._loop is None
        assert await watched.recv_exact(1, []) == b"x"
        theirs.close()
        with pytest.raises(EOFError):
            await watched.recv_exact(1, [])
    finally:
        watched.close()
        ours.close()


async def test_close_ends_a_waiting_read_with_eof() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    watched = WatchedSocket(ours, 1)
    try:
        pending = asyncio.ensure_future(watched.recv_exact(4, []))
        await asyncio.sleep(0)
        watched.close()
        with pytest.raises(EOFError, match="closed"):
            await pending
        assert watched._loop is None
    finally:
        ours.close()
        theirs.close()


async def test_vhost_user_reader_keeps_header_fds_and_closes_payload_fds() -> None:
    from pviommu.transport.vhost_user import protocol as p
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = p.MessageReader(ours)
    r, w = os.pipe()
    try:
        data = p.encode(p.Request.SET_VRING_KICK, p.U64.pack(0))
        open_before = len(os.listdir("/proc/self/fd"))
        socket.send_fds(theirs, [data[:p.HEADER.size]], [r])
        socket.send_fds(theirs, [data[p.HEADER.size:]], [w])
        msg = await reader.read()
        assert (msg.request, msg.payload) == (p.Request.SET_VRING_KICK, p.U64.pack(0))
        assert len(msg.fds) == 1
        os.close(msg.fds[0])
        assert len(os.listdir("/proc/self/fd")) == open_before  # the payload's fd: closed
        theirs.send(p.HEADER.pack(p.Request.GET_FEATURES, 0x2, 0))  # version 2
        with pytest.raises(p.ProtocolError, match="protocol version 2"):
            await reader.read()
        theirs.send(p.encode(p.Request.GET_FEATURES))  # no payload
        assert (await reader.read()).payload == b""
        theirs.close()
        with pytest.raises(EOFError):
            await reader.read()
    finally:
        reader.close()
        ours.close()
        os.close(r)
        os.close(w)
