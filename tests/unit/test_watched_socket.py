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
