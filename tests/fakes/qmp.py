"""A QMP client on a bare socket, for tests that must send exactly the bytes they want
and see exactly the bytes the server answers (qemu.qmp's client would not let them)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

TIMEOUT = 5.0


class RawQmp:
    """One connection to a QMP server; replies are read a line at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path | str, negotiate: bool = False) -> RawQmp:
        """Connects; with ``negotiate``, also reads the greeting and leaves negotiation."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        raw = cls(reader, writer)
        if negotiate:
            await raw.negotiate()
        return raw

    async def line(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next line the server sends: one JSON object, ASCII, ending in CRLF."""
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        assert raw.endswith(b"}\r\n"), raw
        assert raw.isascii()
        return json.loads(raw)

    async def send(self, data: bytes) -> None:
        """Sends ``data`` as it is."""
        self.writer.write(data)
        await self.writer.drain()

    async def ask(self, data: bytes) -> dict[str, Any]:
        """Sends ``data`` and returns the next line."""
        await self.send(data)
        return await self.line()

    async def negotiate(self) -> None:
        """Reads the greeting and sends qmp_capabilities."""
        assert "QMP" in await self.line()
        assert await self.ask(b'{"execute": "qmp_capabilities"}\n') == {"return": {}}

    def close(self) -> None:
        """Hangs up."""
        self.writer.close()
