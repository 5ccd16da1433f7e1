"""Socket helpers shared by the protocol fakes."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path


async def connect_unix(path: Path | str) -> socket.socket:
    """A non-blocking stream socket connected to the UNIX socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, str(path))
    return sock
