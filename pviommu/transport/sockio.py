"""Non-blocking UNIX stream socket helpers shared by the transports.

asyncio has no awaitable ``recvmsg``, so reads wait for readability with
``add_reader`` and then call ``recvmsg_into`` themselves; file descriptors
passed as SCM_RIGHTS come back with the bytes they were attached to.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket

from .watched import passed_fds

_FD_SIZE = array.array("i").itemsize


async def wait_readable(sock: socket.socket) -> None:
    """Returns once ``sock`` has something to read (data, EOF or an error)."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def recv_exact(sock: socket.socket, n: int, fds: list[int] | None,
                     max_fds: int) -> bytes:
    """Reads exactly ``n`` bytes from the non-blocking ``sock``.

    File descriptors passed with them (room for ``max_fds`` per read; the
    kernel drops any beyond that) are appended to ``fds``, or closed if
    ``fds`` is None. Raises EOFError if the peer closes first, OSError on a
    socket error.
    """
    if n == 0:
        return b""
    buf = bytearray(n)
    view = memoryview(buf)
    space = socket.CMSG_SPACE(max_fds * _FD_SIZE)
    got = 0
    try:
        while got < n:
            try:
                nbytes, ancdata, _flags, _addr = sock.recvmsg_into([view[got:]], space)
            except (BlockingIOError, InterruptedError):
                await wait_readable(sock)
                continue
            received = passed_fds(ancdata)
            if fds is not None:
                fds.extend(received)
            else:
                close_fds(received)
            if nbytes == 0:
                raise EOFError("peer closed the connection" if got == 0 else
                               f"peer closed the connection after {got} of {n} bytes")
            got += nbytes
    finally:
        view.release()
    return bytes(buf)


def close_fds(fds: list[int]) -> None:
    """Closes every fd of ``fds`` and empties the list."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
