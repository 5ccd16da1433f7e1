"""A QMP server, so QMP clients (qemu.qmp, qmp-shell) can drive our processes like QEMU.

The wire behaviour follows QEMU's docs/interop/qmp-spec.rst and its monitor: a greeting
on connect, capabilities negotiation with ``qmp_capabilities``, one request at a time
per client, ``id`` echoed verbatim, CRLF-terminated ASCII JSON output, and asynchronous
events only for clients that finished negotiation. Out-of-band execution is not offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..transport.unix_socket import UnixListener, listen_unix
from .streamer import Invalid, JsonStreamer, TooLarge, Value

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]
"""A command handler: gets the request's ``arguments`` and returns the ``return`` value."""

MAX_REQUEST_SIZE = 1 << 20
"""Default cap, in bytes, on one request."""

MAX_CLIENTS = 16
"""Default cap on connected QMP clients: each holds a file descriptor, and those are
shared with the device sockets."""

_MAX_WRITE_BUFFER = 4 << 20
_READ_CHUNK = 64 << 10
_NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"


class QmpError(Exception):
    """A command failure, answered as ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


@dataclass
class _Command:
    handler: Handler
    doc: str


class _Session:
    """One connected client."""

    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.name = f"qmp#{number}"
        self.writer = writer
        self.negotiated = False


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _parse_error(reason: str) -> dict[str, Any]:
    return _error("GenericError", f"JSON parse error, {reason[:1].lower()}{reason[1:]}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid token '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: json.dumps could not echo it
        raise ValueError(f"number '{text[:32]}' is out of range")
    return value


def _decode(data: bytes) -> Any:
    """The JSON value ``data`` holds; ValueError with the reason if it holds none."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                          parse_float=_finite_float)
    except UnicodeDecodeError:
        raise ValueError("invalid UTF-8 sequence") from None
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except ValueError as exc:  # from _reject_constant, _finite_float, int's digit limit
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("nesting too deep") from None


def _encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, allow_nan=False) + "\r\n").encode("ascii")


def _check_request(request: dict[str, Any]) -> str:
    """The command name of a well-formed request; QmpError as QEMU words it otherwise."""
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QmpError("GenericError", "QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
    execute = request.get("execute")
    if not isinstance(execute, str):  # absent: a present non-string was refused above
        raise QmpError("GenericError", "QMP input lacks member 'execute'")
    return execute


class QmpServer:
    """A QMP server listening on a UNIX socket.

    ``version`` is the greeting's ``QMP.version`` (and what ``query-version`` returns),
    shaped like QEMU's: ``{"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": ""}``.
    Built-in commands: ``qmp_capabilities``, ``query-commands`` and ``query-version``.
    Requests longer than ``max_request_size`` bytes get an error and the client is
    dropped. At most ``max_clients`` clients are connected at once: one more gets an
    error instead of the greeting and is disconnected.
    """

    def __init__(
        self, version: dict[str, Any], *, max_request_size: int = MAX_REQUEST_SIZE,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, not {max_clients}")
        self.version = version
        self.max_request_size = max_request_size
        self.max_clients = max_clients
        self._commands: dict[str, _Command] = {}
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._socket: UnixListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._count = 0
        self.register("query-commands", self._query_commands, doc="List the commands.")
        self.register("query-version", lambda _: self.version, doc="The server's version.")

    @property
    def commands(self) -> dict[str, str]:
        """Every command name (built-ins included) with its documentation."""
        docs = {"qmp_capabilities": "Leave capabilities negotiation mode."}
        docs.update((name, command.doc) for name, command in self._commands.items())
        return docs

    def register(self, name: str, handler: Handler, *, doc: str = "") -> None:
        """Add command ``name``.

        ``handler`` (sync or async) gets the request's ``arguments`` (``{}`` if absent) and
        returns the value for ``return`` (``None`` means ``{}``). It raises QmpError to
        answer an error; any other exception is answered as a GenericError and logged.
        """
        if not name or not isinstance(name, str):
            raise ValueError(f"bad QMP command name {name!r}")
        if name == "qmp_capabilities" or name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        self._commands[name] = _Command(handler, doc)

    async def start_unix(self, path: str, group: int | None = None) -> None:
        """Listen on the UNIX socket ``path`` (0600; 0660 for group ``group`` if given).

        A stale socket file there is replaced; anything else (a file, a live server)
        raises SocketPathError, an OSError naming the path.
        """
        if self._server is not None:
            raise RuntimeError("the QMP server is already listening")
        listener = listen_unix(path, group)
        try:
            self._loop = asyncio.get_running_loop()
            self._server = await asyncio.start_unix_server(self._serve, sock=listener.sock)
        except BaseException:
            listener.close()
            raise
        self._socket = listener
        log.info("QMP server listening on %s", path)

    async def close(self) -> None:
        """Stop listening, disconnect every client and remove the socket file (only if it
        is still the one this server bound)."""
        listener, self._socket = self._socket, None
        if listener is not None:
            listener.remove()  # while the socket is open: its inode cannot be reused
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        if listener is not None:
            listener.close()

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``event`` to every client that finished negotiation.

        Never blocks and never fails because of a client: one that stopped reading is
        dropped. Callable from any thread. ``data`` is left out of the message when None,
        as QEMU does; it must be JSON-serializable (TypeError/ValueError otherwise).
        """
        now = time.time_ns()
        message: dict[str, Any] = {"event": event}
        if data is not None:
            message["data"] = data
        message["timestamp"] = {
            "seconds": now // 1_000_000_000,
            "microseconds": now // 1000 % 1_000_000,
        }
        line = _encode(message)
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._broadcast(line)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._broadcast, line)

    def _broadcast(self, line: bytes) -> None:
        for session in list(self._sessions):
            if session.negotiated:
                self._write(session, line)

    def _write(self, session: _Session, data: bytes) -> None:
        transport = session.writer.transport
        if transport.is_closing():
            return
        session.writer.write(data)
        if transport.get_write_buffer_size() > _MAX_WRITE_BUFFER:
            log.warning("%s does not read its output; dropping it", session.name)
            transport.abort()

    async def _send(self, session: _Session, message: dict[str, Any]) -> None:
        self._write(session, _encode(message))
        await session.writer.drain()

    def _query_commands(self, _: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self.commands]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count += 1
        if len(self._sessions) >= self.max_clients:
            # Refused at once: its descriptor is released before more can pile up.
            log.warning("qmp#%d refused: %d QMP clients are connected, the limit",
                        self._count, len(self._sessions))
            writer.write(_encode(_error(
                "GenericError", f"Too many QMP clients (at most {self.max_clients})")))
            writer.close()
            return
        session = _Session(self._count, writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._sessions.add(session)
        log.debug("%s connected", session.name)
        try:
            await self._send(session, {"QMP": {"version": self.version, "capabilities": []}})
            await self._read_requests(session, reader)
        except ConnectionError as exc:
            log.debug("%s: %s", session.name, exc)
        except asyncio.CancelledError:
            # The server is closing. Not re-raised: this task is ours alone, and a
            # cancelled client task makes asyncio (3.11) log a traceback.
            log.debug("%s: disconnected by the server", session.name)
        except Exception:
            log.exception("%s: QMP session failed", session.name)
        finally:
            self._sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            log.debug("%s disconnected", session.name)

    async def _read_requests(self, session: _Session, reader: asyncio.StreamReader) -> None:
        stream = JsonStreamer(self.max_request_size)
        while chunk := await reader.read(_READ_CHUNK):
            for item in stream.feed(chunk):
                if isinstance(item, TooLarge):
                    log.warning("%s sent a request over %d bytes; dropping it",
                                session.name, item.limit)
                    await self._send(session, _error(
                        "GenericError", f"QMP request exceeds {item.limit} bytes"))
                    return
                if isinstance(item, Invalid):
                    await self._send(session, _parse_error(item.reason))
                    continue
                assert isinstance(item, Value)
                try:
                    request = _decode(item.data)
                except ValueError as exc:
                    await self._send(session, _parse_error(str(exc)))
                    continue
                await self._handle(session, request)

    async def _handle(self, session: _Session, request: Any) -> None:
        if not isinstance(request, dict):
            await self._send(session, _error("GenericError", "QMP input must be a JSON object"))
            return
        negotiating = not session.negotiated
        negotiated_now = False
        name: str | None = None
        try:
            name = _check_request(request)
            response = await self._execute(session, name, request.get("arguments", {}))
            negotiated_now = name == "qmp_capabilities"
        except QmpError as exc:
            response = _error(exc.error_class, exc.desc)
            if negotiating and exc.error_class == "CommandNotFound":
                response["error"]["desc"] = _NEGOTIATION_DESC
        if "id" in request:
            response["id"] = request["id"]
        try:
            line = _encode(response)
        except (TypeError, ValueError, RecursionError) as exc:
            log.error("%s: the result of %s is not JSON: %s", session.name, name, exc)
            response = _error("GenericError", f"Command {name} returned a non-JSON value")
            if "id" in request:
                response["id"] = request["id"]
            line = _encode(response)  # the id came from JSON _decode accepted: it encodes
        self._write(session, line)
        # Only now: an event written before this reply would break the client's handshake.
        session.negotiated = session.negotiated or negotiated_now
        await session.writer.drain()

    async def _execute(self, session: _Session, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "qmp_capabilities":
            if session.negotiated:
                raise QmpError("CommandNotFound",
                               "Capabilities negotiation is already complete, command ignored")
            self._check_capabilities(args)
            return {"return": {}}
        command = self._commands.get(name) if session.negotiated else None
        if command is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        try:
            result = command.handler(args)
            if inspect.isawaitable(result):
                result = await result
        except QmpError:
            raise
        except Exception as exc:
            log.exception("%s: QMP command %s failed", session.name, name)
            raise QmpError("GenericError",
                           f"Command {name} failed: {type(exc).__name__}: {exc}") from exc
        return {"return": {} if result is None else result}

    @staticmethod
    def _check_capabilities(args: dict[str, Any]) -> None:
        for key in args:
            if key != "enable":
                raise QmpError("GenericError", f"Parameter '{key}' is unexpected")
        enable = args.get("enable", [])
        if not isinstance(enable, list):
            raise QmpError("GenericError", "Invalid parameter type for 'enable', expected: array")
        if enable:
            names = ", ".join(str(item) for item in enable)
            raise QmpError("GenericError", f"Capability {names} not available")
