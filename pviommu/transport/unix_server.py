"""A UNIX stream socket server that serves one client at a time.

A second client is refused (its connection is closed at once) while the first
is served; when the first goes away, the next connection is accepted. The
socket is bound with :func:`listen_unix` (owner-only, never over another
file or a live server); closing the server drops the client and removes the
socket file only if it is still the one this server bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .unix_socket import UnixListener, listen_unix

log = logging.getLogger(__name__)

Serve = Callable[[socket.socket], Coroutine[Any, Any, None]]
"""Serves one connected (non-blocking) socket until the client goes; owns the socket."""

# How long a new client waits for the previous one, already hung up, to be cleaned up.
_HANDOVER_TIMEOUT = 5.0


class UnixServer:
    """Listens on ``path`` and runs ``serve`` for one client at a time."""

    def __init__(self, path: Path, serve: Serve, name: str,
                 on_refused: Callable[[], None] | None = None, group: int | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.group = group  # a group ID that may connect too (0660), or None (0600)
        self.connections = 0
        self._serve = serve
        self._on_refused = on_refused
        self._listener: UnixListener | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._served: asyncio.Task[None] | None = None
        self._client: socket.socket | None = None

    @property
    def busy(self) -> bool:
        """Whether a client is being served."""
        return self._served is not None and not self._served.done()

    async def start(self) -> None:
        """Starts listening; a stale socket file is replaced, anything else refused
        (SocketPathError)."""
        if self._listener is not None:
            raise RuntimeError(f"{self.name} is already listening on {self.path}")
        self._listener = listen_unix(self.path, self.group)
        self._accepting = asyncio.create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener.sock)
            except OSError as e:  # e.g. out of fds: keep listening
                log.error("%s: accepting on %s failed: %s", self.name, self.path, str(e))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            served = self._served
            if served is not None and not served.done() and self._client_gone():
                # The previous client hung up; let its clean-up finish first.
                await asyncio.wait({served}, timeout=_HANDOVER_TIMEOUT)
            if self.busy:
                log.warning("%s: %s already has a client; refusing another", self.name, self.path)
                conn.close()
                if self._on_refused is not None:
                    self._on_refused()
                continue
            self.connections += 1
            log.info("%s: client %d connected on %s", self.name, self.connections, self.path)
            self._client = conn
            self._served = asyncio.create_task(self._run(conn))

    def _client_gone(self) -> bool:
        client = self._client
        if client is None or client.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(client.fileno(), select.POLLRDHUP)
        return bool(poller.poll(0))

    async def _run(self, conn: socket.socket) -> None:
        try:
            await self._serve(conn)
        except ConnectionError as e:  # the client went at a bad moment: no traceback
            log.warning("%s: client on %s lost: %s", self.name, self.path, str(e))
        except Exception:  # a bug in serve: drop that client, keep the server
            log.exception("%s: serving a client on %s failed", self.name, self.path)
        finally:
            conn.close()

    async def close(self) -> None:
        """Stops listening, drops the client, removes the socket file if it is ours."""
        for task in (self._accepting, self._served):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._accepting = self._served = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
