"""A non-blocking socket whose readability is watched by one long-lived reader.

:func:`pviommu.transport.sockio.recv_exact` waits for readability by adding a
reader to the event loop and removing it again, for every read that would
block: on a connection that carries one small message per request (a doorbell,
an IOTLB message) that costs about as much as handling the message. A
:class:`WatchedSocket` adds its reader once and keeps it while reads keep
waiting; the reader is dropped when it fires twice with no read waiting (so a
peer that sends while the connection is busy elsewhere does not make the loop
spin) and re-added by the next wait. :meth:`WatchedSocket.close` drops it for good,
before the socket closes.
"""

from __future__ import annotations

import array
import asyncio
import socket

_FD_SIZE = array.array("i").itemsize


def passed_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors SCM_RIGHTS control messages carried."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % _FD_SIZE])
    return list(fds)


class WatchedSocket:
    """Exact reads from the non-blocking ``sock``, with room for ``max_fds`` passed
    file descriptors per read (the kernel drops any beyond that)."""

    def __init__(self, sock: socket.socket, max_fds: int) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        self._space = socket.CMSG_SPACE(max_fds * _FD_SIZE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._idle_wakes = 0

    async def recv_exact(self, n: int, fds: list[int]) -> bytes:
        """Reads exactly ``n`` bytes; the file descriptors passed with them are appended
        to ``fds``. Raises EOFError if the peer closes first, OSError on a socket
        error."""
        if n == 0:
            return b""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                try:
                    nbytes, ancdata, _flags, _addr = self.sock.recvmsg_into([view[got:]],
                                                                            self._space)
                except (BlockingIOError, InterruptedError):
                    await self._readable()
                    continue
                if ancdata:
                    fds.extend(passed_fds(ancdata))
                if nbytes == 0:
                    raise EOFError("peer closed the connection" if got == 0 else
                                   f"peer closed the connection after {got} of {n} bytes")
                got += nbytes
        finally:
            view.release()
        return bytes(buf)

    def close(self) -> None:
        """Stops watching the socket (it stays open); a read waiting on it ends with
        EOFError."""
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(EOFError("the connection was closed"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            # The poll that follows a wake-up often still sees the data the woken read
            # has consumed since: one such call is normal, a second means data waits
            # with no read waiting, and the reader goes until the next wait.
            self._idle_wakes += 1
            if self._idle_wakes > 1:
                self.close()
        elif not waiter.done():
            waiter.set_result(None)

    async def _readable(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            loop.add_reader(self._fd, self._wake)
        self._idle_wakes = 0
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
