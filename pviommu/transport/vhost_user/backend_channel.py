"""The vhost-user back-end channel: requests from the back-end to the front-end.

The front-end hands the back-end one end of a UNIX stream socket pair with
SET_BACKEND_REQ_FD. The back-end sends requests on it (IOTLB MISS, with
need-reply) and the front-end answers each with a u64 on the same socket, in
order. The answer to a MISS comes only after the front-end's IOTLB UPDATE,
which arrives on the *main* socket: the main socket must keep being served
while a request here is outstanding, so requests are awaited, never blocked on.

Requests may be pipelined: replies are matched in order. A request whose
caller gave up (timeout, cancellation) keeps its place, so a late reply is
consumed and dropped instead of being taken for the next request's. Anything
that breaks the order (an unexpected message, a short write, end of file)
breaks the channel: every waiting request fails and later ones fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque

from ..sockio import close_fds
from . import protocol as p

log = logging.getLogger(__name__)

# Replies awaited at once; a front-end that stops answering cannot make this grow.
MAX_OUTSTANDING = 256


class BackendChannelError(Exception):
    """The back-end channel is absent, closed or broken; nothing can be asked."""


class BackendChannelTimeout(BackendChannelError):
    """The front-end did not answer a request in time."""

    def __init__(self, request: str, timeout: float) -> None:
        super().__init__(f"the frontend did not answer {request} on the backend "
                         f"channel within {timeout:g} s")
        self.request = request
        self.timeout = timeout


def adopt_socket(fd: int) -> socket.socket:
    """Wraps a received fd as the channel's socket; closes it and raises ValueError
    unless it is a connected UNIX stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            socket.close(fd)
        raise ValueError(f"backend channel fd is not a socket ({e.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        kind = f"{sock.family.name}/{sock.type.name}"
        sock.close()
        raise ValueError(f"backend channel fd is a {kind} socket, not a UNIX stream socket")
    sock.setblocking(False)
    return sock


class BackendChannel:
    """The back-end's side of the channel: send a request, await its u64 reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._waiting: deque[tuple[int, asyncio.Future[int]]] = deque()
        self._error: str | None = None
        self._messages = p.MessageReader(sock)
        self._reader: asyncio.Task[None] | None = self._loop.create_task(self._read())

    @property
    def closed(self) -> bool:
        """Whether the channel can no longer carry requests."""
        return self._error is not None

    @property
    def error(self) -> str | None:
        """Why the channel is closed, or None while it works."""
        return self._error

    @property
    def outstanding(self) -> int:
        """Replies still expected (including those of callers that gave up)."""
        return len(self._waiting)

    async def request(self, request: int, payload: bytes, timeout: float) -> int:
        """Sends ``request`` with need-reply and returns the front-end's u64 answer.

        Raises :class:`BackendChannelTimeout` after ``timeout`` seconds and
        :class:`BackendChannelError` when the channel is or becomes unusable.
        """
        name = p.backend_request_name(request)
        if self._error is not None:
            raise BackendChannelError(f"cannot send {name}: {self._error}")
        if len(self._waiting) >= MAX_OUTSTANDING:
            raise BackendChannelError(f"cannot send {name}: {MAX_OUTSTANDING} requests "
                                      "are already waiting for the frontend")
        data = p.encode(request, payload, need_reply=True)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.close(f"send failed: {e.strerror}")
            raise BackendChannelError(f"cannot send {name}: {self._error}") from None
        if sent != len(data):
            # A partial message cannot be taken back; the stream is lost.
            self.close("the frontend does not read its backend channel (send buffer full)")
            raise BackendChannelError(f"cannot send {name}: {self._error}")
        fut: asyncio.Future[int] = self._loop.create_future()
        self._waiting.append((request, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BackendChannelTimeout(name, timeout) from None

    def close(self, reason: str = "closed") -> None:
        """Closes the channel; every waiting request fails with ``reason``."""
        if self._error is not None:
            return
        self._error = f"backend channel {reason}"
        waiting, self._waiting = self._waiting, deque()
        for _, fut in waiting:
            if not fut.done():
                fut.set_exception(BackendChannelError(self._error))
                fut.exception()  # a caller that gave up must not leave it unretrieved
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._messages.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    async def _read(self) -> None:
        try:
            while self._error is None:
                try:
                    msg = await self._messages.read()
                except EOFError:
                    self.close("closed by the frontend")
                    return
                except (p.ProtocolError, OSError) as e:
                    log.error("vhost-user backend channel: %s", str(e))
                    self.close(f"broken: {e}")
                    return
                problem = self._reply_problem(msg)
                close_fds(msg.fds)
                if problem is not None:
                    log.error("vhost-user backend channel: %s; closing it", problem)
                    self.close(f"broken: {problem}")
                    return
                _, fut = self._waiting.popleft()
                if not fut.done():
                    fut.set_result(p.U64.unpack(msg.payload)[0])
        except asyncio.CancelledError:
            pass

    def _reply_problem(self, msg: p.Message) -> str | None:
        if not msg.flags & p.FLAG_REPLY:
            return f"unexpected request {msg.request} from the frontend"
        if not self._waiting:
            return f"reply to {msg.request} while no request is waiting"
        expected = self._waiting[0][0]
        if msg.request != expected:
            return f"reply to {msg.request}, expected one to {expected}"
        if len(msg.payload) != p.U64.size:
            return f"reply of {len(msg.payload)} bytes, expected {p.U64.size}"
        if msg.fds:
            return f"{len(msg.fds)} file descriptors with a reply"
        return None
