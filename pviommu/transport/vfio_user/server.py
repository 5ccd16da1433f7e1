"""A vfio-user server: one PCI function served to stock QEMU 10.2's ``vfio-user-pci``.

The transport speaks the wire protocol (QEMU's ``docs/interop/vfio-user.rst``, as
QEMU 10.2 really sends it: docs/ARCHITECTURE.md); the :class:`PciFunction` owns config space,
BARs and interrupts, and the endpoint's :class:`GuestMemory` is the DMA-map
table QEMU fills with DMA_MAP. Memory QEMU maps without an fd is reached with
DMA_READ/DMA_WRITE requests on the same socket (QEMU 10.2 has no twin socket).

Client commands are handled strictly in order, each answered before the next
is read, and posted ones (NO_REPLY) never answered, not even with an error.
Server requests (DMA) are awaited by the device's tasks, never by the reader,
which keeps reading while they are outstanding (the spec's deadlock rule).
Anything malformed gets a logged error and an error reply; a header the stream
cannot be trusted after closes the connection. When the client goes, the
function is told, the DMA maps are dropped and every received fd is closed;
the server then accepts the next client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...memory import GuestMemory, MemoryAccessError, RegionSpec
from ...pci.function import (
    NUM_IRQS,
    NUM_REGIONS,
    IrqIndex,
    PciAccessError,
    PciFunction,
    RegionIndex,
    RegionInfo,
)
from ..sockio import close_fds
from ..unix_server import UnixServer
from . import protocol as p
from .protocol import Command as C

log = logging.getLogger(__name__)

DMA_TIMEOUT = 10.0
"""Seconds a DMA_READ/DMA_WRITE request waits for the client's reply."""

DEFAULT_MAX_DMA_MAPS = 64
"""DMA maps one client may hold at once (VERSION's max_dma_maps; DMA_MAP past it: ENOSPC).

Each map with an fd keeps an fd and a mapping in this process, so the spec's
65535 would let one client exhaust the fds every other socket needs. QEMU
maps each RAM section of the guest once (a handful on Arm ``virt``) and only
checks the value against its memslots when virtio-mem is in use.
"""

_OFF_T_LIMIT = 1 << 63  # mmap offsets and sizes are signed 64-bit (off_t, ssize_t)

_TAKES_FDS = {C.DMA_MAP, C.DEVICE_SET_IRQS}
_NEVER_ANSWERED = {C.REGION_WRITE_MULTI}  # QEMU sends it NO_REPLY and expects nothing
_BARS = range(RegionIndex.BAR0, RegionIndex.ROM + 1)


class Refused(Exception):
    """A command the server refuses: logged, answered with ``errno`` unless posted."""

    def __init__(self, err: int, message: str, level: int = logging.ERROR) -> None:
        super().__init__(message)
        self.errno = err
        self.level = level  # QEMU's routine probes are refused quietly


def _unpack(msg: p.Message, layout: struct.Struct) -> tuple[Any, ...]:
    if len(msg.payload) < layout.size:
        raise Refused(errno.EINVAL, f"payload of {len(msg.payload)} bytes; {msg.name} needs "
                                    f"at least {layout.size}")
    return layout.unpack_from(msg.payload)


def _fit(full: bytes, argsz: int) -> bytes:
    """The argsz rule: the reply's payload never exceeds the request's argsz.

    ``full`` starts with its own argsz (the size needed); a client that asked
    for less gets the first ``argsz`` bytes and can retry with more.
    """
    if argsz < 4:
        raise Refused(errno.EINVAL, f"argsz {argsz} cannot hold a reply")
    return full[:argsz]


def _client_capabilities(raw: bytes) -> dict[str, Any]:
    """The ``capabilities`` object of a VERSION request's JSON (empty if none)."""
    text = raw.split(b"\0", 1)[0]
    if not text.strip():
        return {}
    try:
        doc = json.loads(text.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise Refused(errno.EINVAL, f"version data is not JSON: {e}") from e
    except RecursionError:
        raise Refused(errno.EINVAL, "version data is nested too deep") from None
    caps = doc.get("capabilities", {}) if isinstance(doc, dict) else None
    if not isinstance(caps, dict):
        raise Refused(errno.EINVAL, "version data is not a JSON object with an object "
                                    "'capabilities'")
    for key in ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"):
        value = caps.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Refused(errno.EINVAL, f"capability {key} is {value!r}, not an unsigned integer")
    return caps


class RemoteDma:
    """Guest memory reached through the client: DMA_READ/DMA_WRITE requests.

    It is the ``memory.remote`` of a connected client. Each request moves at
    most min(1 MiB, the negotiated max_data_xfer_size) bytes (QEMU refuses,
    and desynchronises on, anything bigger). Only ranges inside one DMA map
    are requested; any failure raises :class:`MemoryAccessError`.
    """

    def __init__(self, connection: VfioUserConnection) -> None:
        # Weak: the connection owns this object, and a cycle would keep a gone
        # client's connection (and what it references) until the collector ran.
        self._conn_ref = weakref.ref(connection)

    @property
    def _conn(self) -> VfioUserConnection:
        conn = self._conn_ref()
        if conn is None:
            raise MemoryAccessError(0, 0, "DMA address", "cannot be reached: the client is gone")
        return conn

    @property
    def chunk(self) -> int:
        """The most bytes one request moves."""
        return min(p.MAX_DATA_XFER, self._conn.max_data_xfer)

    async def read(self, gpa: int, length: int) -> bytes:
        """Copies ``length`` bytes at DMA address ``gpa`` from the client."""
        self._check(gpa, length, write=False)
        parts = []
        for addr, n in self._chunks(gpa, length):
            reply = await self._call(C.DMA_READ, p.DMA_RW.pack(addr, n) + bytes(p.DMA_RW_PAD),
                                     addr, n)
            body = reply.payload
            if len(body) < p.DMA_RW.size + n or p.DMA_RW.unpack_from(body) != (addr, n):
                raise MemoryAccessError(addr, n, "DMA address",
                                        f"got a malformed DMA_READ reply ({len(body)} bytes)")
            parts.append(body[p.DMA_RW.size:p.DMA_RW.size + n])
        return b"".join(parts)

    async def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to DMA address ``gpa`` through the client."""
        src = memoryview(data).cast("B")
        self._check(gpa, len(src), write=True)
        pos = 0
        for addr, n in self._chunks(gpa, len(src)):
            payload = p.DMA_RW.pack(addr, n) + src[pos:pos + n] + bytes(p.DMA_RW_PAD)
            await self._call(C.DMA_WRITE, payload, addr, n)
            pos += n

    def _check(self, gpa: int, length: int, write: bool) -> None:
        # The spec forbids DMA outside what the client mapped (QEMU does not check).
        if length < 0:
            raise MemoryAccessError(gpa, length, "DMA address")
        if length:
            self._conn.memory.piece(gpa, length, write)

    def _chunks(self, gpa: int, length: int) -> list[tuple[int, int]]:
        step = self.chunk
        return [(gpa + pos, min(step, length - pos)) for pos in range(0, length, step)]

    async def _call(self, command: C, payload: bytes, addr: int, n: int) -> p.Message:
        try:
            reply = await self._conn.request(command, payload)
        except TimeoutError as e:
            log.warning("%s: no reply to %s of %#x+%#x within %.1f s", self._conn.name,
                        command.name, addr, n, self._conn.dma_timeout)
            raise MemoryAccessError(addr, n, "DMA address",
                                    f"got no {command.name} reply in time") from e
        except ConnectionError as e:
            raise MemoryAccessError(addr, n, "DMA address",
                                    f"cannot be reached through the client: {e}") from e
        if reply.failed:
            reason = os.strerror(reply.error) if reply.error else "no errno"
            raise MemoryAccessError(addr, n, "DMA address",
                                    f"was refused by the client ({command.name}: {reason})")
        if reply.command != command:
            raise MemoryAccessError(addr, n, "DMA address", f"got a {p.command_name(reply.command)}"
                                                            f" reply to {command.name}")
        return reply


class VfioUserConnection:
    """One client: reads its commands in order, answers them, and carries server requests."""

    def __init__(self, function: PciFunction, memory: GuestMemory, sock: socket.socket,
                 stats: Counter[str], name: str = "vfio-user",
                 max_dma_maps: int = DEFAULT_MAX_DMA_MAPS) -> None:
        if not 1 <= max_dma_maps <= p.MAX_DMA_MAPS:
            raise ValueError(f"max_dma_maps {max_dma_maps} is not in 1..{p.MAX_DMA_MAPS}")
        self.function = function
        self.memory = memory
        self.sock = sock
        self.stats = stats
        self.name = name
        self.negotiated = False
        self.max_data_xfer = p.MAX_DATA_XFER
        self.dma_map_limit = max_dma_maps  # ours; max_dma_maps is what VERSION agreed
        self.max_dma_maps = max_dma_maps
        self.dma_timeout = DMA_TIMEOUT
        self.remote = RemoteDma(self)
        self._regions = {r.index: r for r in function.regions()}
        self._pending: dict[int, asyncio.Future[p.Message]] = {}
        self._next_id = 0
        self._out: asyncio.Queue[tuple[bytes, asyncio.Future[None]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False  # set by a command after which the connection ends
        self._handlers: dict[int, Callable[[p.Message], bytes]] = {
            C.VERSION: self._version,
            C.DMA_MAP: self._dma_map,
            C.DMA_UNMAP: self._dma_unmap,
            C.DEVICE_GET_INFO: self._get_info,
            C.DEVICE_GET_REGION_INFO: self._region_info,
            C.DEVICE_GET_IRQ_INFO: self._irq_info,
            C.DEVICE_SET_IRQS: self._set_irqs,
            C.REGION_READ: self._region_read,
            C.REGION_WRITE: self._region_write,
            C.REGION_WRITE_MULTI: self._region_write_multi,
            C.DEVICE_RESET: self._reset,
        }

    # -- the connection ------------------------------------------------------------------

    async def serve(self) -> None:
        """Serves the client until it goes (or breaks the protocol), then cleans up."""
        self._writer = asyncio.create_task(self._write_loop())
        self.memory.remote = self.remote
        try:
            await self._read_loop()
        finally:
            await self._teardown()

    async def _read_loop(self) -> None:
        reader = p.MessageReader(self.sock)
        try:
            await self._read_messages(reader)
        finally:
            reader.close()

    async def _read_messages(self, reader: p.MessageReader) -> None:
        while not self._closing:
            try:
                msg = await reader.read()
            except EOFError as e:
                # Strings, never the exception, go to the log: a handler that keeps
                # records would keep its traceback, this connection and its memory.
                log.info("%s: client disconnected (%s)", self.name, str(e))
                return
            except p.ProtocolError as e:
                log.error("%s: %s; closing the connection", self.name, str(e))
                self.stats["protocol_errors"] += 1
                if (e.command is not None and not e.flags & p.FLAG_NO_REPLY
                        and e.command not in _NEVER_ANSWERED
                        and e.flags & p.FLAG_TYPE_MASK == p.TYPE_COMMAND):
                    with contextlib.suppress(ConnectionError):
                        await self._send(p.error_reply(e.id or 0, e.command, errno.E2BIG))
                return
            except OSError as e:
                log.warning("%s: client connection failed: %s", self.name, str(e))
                return
            if msg.is_reply:
                self._on_reply(msg)
                continue
            out = self.handle(msg)
            if out is not None:
                try:
                    await self._send(out)
                except ConnectionError as e:  # the client left before its reply
                    log.info("%s: client gone before the reply to %s (id %d): %s", self.name,
                             msg.name, msg.id, str(e))
                    return

    async def _teardown(self) -> None:
        self._closing = True
        gone = ConnectionError("the client disconnected")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(gone)
        self._pending.clear()
        if self.memory.remote is self.remote:
            self.memory.remote = None
        try:
            self.function.disconnect()
        except Exception:
            log.exception("%s: the PCI function failed to disconnect", self.name)
        self.memory.clear()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._fail_queued(gone)
        self.sock.close()
        self._handlers.clear()  # bound methods: a cycle through the connection

    # -- sending -------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        """Queues one whole message and waits until it is written.

        A single writer task sends messages one after the other, so a caller
        cancelled mid-way never leaves half a message on the stream.
        """
        if self._writer is None or self._writer.done():
            raise ConnectionError("the connection is closed")
        fut = asyncio.get_running_loop().create_future()
        self._out.put_nowait((data, fut))
        await fut

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, fut = await self._out.get()
            try:
                await loop.sock_sendall(self.sock, data)
            except asyncio.CancelledError:
                if not fut.done():
                    fut.set_exception(ConnectionError("the connection closed"))
                raise
            except OSError as e:  # whoever waits on fut logs it, once
                log.debug("%s: sending to the client failed: %s", self.name, str(e))
                failed = ConnectionError(f"sending failed: {e}")
                if not fut.done():
                    fut.set_exception(failed)
                self._fail_queued(failed)
                return
            if not fut.done():
                fut.set_result(None)

    def _fail_queued(self, error: Exception) -> None:
        while not self._out.empty():
            _, fut = self._out.get_nowait()
            if not fut.done():
                fut.set_exception(error)

    # -- server requests -----------------------------------------------------------------

    async def request(self, command: int, payload: bytes) -> p.Message:
        """Sends a server->client request and returns the client's reply.

        Raises ConnectionError if the client goes, TimeoutError if it does not
        answer within ``dma_timeout`` (a late reply is then dropped as stray).
        """
        if self._closing:
            raise ConnectionError("the client is gone")
        msg_id = self._new_id()
        fut: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self._send(p.encode(msg_id, command, payload))
            return await asyncio.wait_for(fut, self.dma_timeout)
        finally:
            if self._pending.get(msg_id) is fut:
                del self._pending[msg_id]
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed by a disconnect while the send failed too: seen

    def _new_id(self) -> int:
        for _ in range(1 << 16):
            msg_id = self._next_id
            self._next_id = (msg_id + 1) & 0xFFFF
            if msg_id not in self._pending:
                return msg_id
        raise ConnectionError("65536 requests outstanding")

    def _on_reply(self, msg: p.Message) -> None:
        if msg.fds:
            log.warning("%s: %d file descriptors on a %s reply; closed", self.name,
                        len(msg.fds), msg.name)
            close_fds(msg.fds)
        fut = self._pending.pop(msg.id, None)
        if fut is None or fut.done():
            self.stats["stray_replies"] += 1
            log.warning("%s: dropped a %s reply (id %d) that answers no outstanding request",
                        self.name, msg.name, msg.id)
            return
        fut.set_result(msg)

    # -- commands ------------------------------------------------------------------------

    def handle(self, msg: p.Message) -> bytes | None:
        """Processes one client command; returns the reply to send, if any."""
        self.stats[msg.name] += 1
        posted = msg.no_reply or msg.command in _NEVER_ANSWERED
        try:
            try:
                payload = self._dispatch(msg)
            finally:
                close_fds(msg.fds)  # handlers take the fds they keep
        except (Refused, PciAccessError, ValueError, MemoryAccessError) as e:
            err = e.errno if isinstance(e, Refused) else errno.EINVAL
            self.stats["refused"] += 1
            log.log(e.level if isinstance(e, Refused) else logging.ERROR,
                    "%s: refused %s (id %d%s): %s", self.name, msg.name, msg.id,
                    ", posted: not answered" if posted else "", str(e))
            return None if posted else p.error_reply(msg.id, msg.command, err)
        except Exception:  # a bug of ours: refuse the command, keep the client
            self.stats["refused"] += 1
            log.exception("%s: internal error handling %s (id %d)", self.name, msg.name, msg.id)
            return None if posted else p.error_reply(msg.id, msg.command, errno.EIO)
        return None if posted else p.reply(msg.id, msg.command, payload)

    def _dispatch(self, msg: p.Message) -> bytes:
        handler = self._handlers.get(msg.command)
        if handler is None:
            raise Refused(errno.ENOSYS, "not supported")
        if msg.fds and msg.command not in _TAKES_FDS:
            raise Refused(errno.EINVAL, f"{len(msg.fds)} unexpected file descriptors")
        if not self.negotiated and msg.command != C.VERSION:
            raise Refused(errno.EINVAL, "sent before VERSION")
        return handler(msg)

    def _version(self, msg: p.Message) -> bytes:
        if self.negotiated:
            raise Refused(errno.EINVAL, "the version is already negotiated")
        major, minor = _unpack(msg, p.VERSION)
        if major != p.MAJOR:
            self._closing = True
            raise Refused(errno.ENOTSUP, f"client speaks protocol {major}.{minor}, this server "
                                         f"{p.MAJOR}.{p.MINOR}; closing")
        offered = _client_capabilities(msg.payload[p.VERSION.size:])
        # Reply only capabilities the client proposed (the spec's subset rule),
        # never write_multiple (QEMU 10.2 would then queue every send, T9).
        caps: dict[str, int] = {}
        if "max_msg_fds" in offered:
            caps["max_msg_fds"] = p.MAX_MSG_FDS
        if "max_data_xfer_size" in offered:
            if offered["max_data_xfer_size"] == 0:
                raise Refused(errno.EINVAL, "max_data_xfer_size 0")
            caps["max_data_xfer_size"] = min(p.MAX_DATA_XFER, offered["max_data_xfer_size"])
        if "pgsizes" in offered:
            # Any page size from 4 KiB up works; 0 would abort QEMU (T12).
            caps["pgsizes"] = offered["pgsizes"] & ~(p.PGSIZE - 1)
            if caps["pgsizes"] == 0:
                raise Refused(errno.EINVAL, f"no page size of 4 KiB or more in "
                                            f"{offered['pgsizes']:#x}")
        if "max_dma_maps" in offered:
            caps["max_dma_maps"] = min(self.dma_map_limit, offered["max_dma_maps"])
        self.max_data_xfer = caps.get("max_data_xfer_size", p.MAX_DATA_XFER)
        self.max_dma_maps = caps.get("max_dma_maps", self.dma_map_limit)
        # QEMU's reply buffer is its request: the reply must not be longer (T1).
        head = p.VERSION.pack(p.MAJOR, p.MINOR)
        reply = head
        for doc in ({"capabilities": caps}, {}):
            candidate = head + json.dumps(doc, separators=(",", ":")).encode() + b"\0"
            if len(candidate) <= len(msg.payload):
                reply = candidate
                break
        self.negotiated = True
        log.info("%s: protocol %d.%d negotiated (client offered %d.%d): %s", self.name,
                 p.MAJOR, p.MINOR, major, minor, reply[p.VERSION.size:].rstrip(b"\0").decode())
        return reply

    def _dma_map(self, msg: p.Message) -> bytes:
        _argsz, flags, offset, iova, size = _unpack(msg, p.DMA_MAP)
        if flags & ~(p.DMA_FLAG_READ | p.DMA_FLAG_WRITE):
            raise Refused(errno.EINVAL, f"unknown DMA_MAP flags {flags:#x}")
        if size == 0 or iova + size > 1 << 64:
            raise Refused(errno.EINVAL, f"DMA map {iova:#x}+{size:#x} is empty or wraps")
        if offset + size >= _OFF_T_LIMIT:
            raise Refused(errno.EINVAL, f"DMA map {iova:#x}+{size:#x} at file offset "
                                        f"{offset:#x} goes past 2^63")
        if len(msg.fds) > 1:
            raise Refused(errno.EINVAL, f"{len(msg.fds)} file descriptors for one DMA map")
        for r in self.memory.regions:
            if r.gpa < iova + size and iova < r.gpa + r.size:
                raise Refused(errno.EEXIST, f"DMA map {iova:#x}+{size:#x} overlaps the map "
                                            f"{r.gpa:#x}+{r.size:#x}")
        if len(self.memory.regions) >= self.max_dma_maps:
            # The spec names no errno for this; ENOSPC as Linux's VFIO type1 does.
            raise Refused(errno.ENOSPC, f"already {self.max_dma_maps} DMA maps (the limit)")
        fd = msg.fds.pop() if msg.fds else None
        spec = RegionSpec(gpa=iova, size=size, uaddr=0, mmap_offset=offset)
        self.memory.add_region(spec, fd, writable=bool(flags & p.DMA_FLAG_WRITE))
        log.debug("%s: DMA map %#x+%#x %s%s", self.name, iova, size,
                  "rw" if flags & p.DMA_FLAG_WRITE else "ro",
                  f" (fd, offset {offset:#x})" if fd is not None else " (remote)")
        return b""

    def _dma_unmap(self, msg: p.Message) -> bytes:
        _argsz, flags, iova, size = _unpack(msg, p.DMA_UNMAP)
        if flags & ~p.DMA_UNMAP_FLAG_ALL:
            raise Refused(errno.EINVAL, f"unsupported DMA_UNMAP flags {flags:#x}")
        if flags & p.DMA_UNMAP_FLAG_ALL:
            if iova or size:
                raise Refused(errno.EINVAL, "DMA_UNMAP of everything with an address or size")
            self.memory.clear()
            log.debug("%s: every DMA map removed", self.name)
        else:
            if size == 0 or iova + size > 1 << 64:
                raise Refused(errno.EINVAL, f"DMA unmap {iova:#x}+{size:#x} is empty or wraps")
            n = self.memory.remove_range(iova, size)
            log.debug("%s: DMA unmap %#x+%#x: %d maps", self.name, iova, size, n)
        return msg.payload[:p.DMA_UNMAP.size]

    def _get_info(self, msg: p.Message) -> bytes:
        argsz = _unpack(msg, p.DEVICE_INFO)[0]
        # 16 bytes: QEMU's buffer has no room for the kernel's 24-byte vfio_device_info (T4).
        return _fit(p.DEVICE_INFO.pack(p.DEVICE_INFO.size,
                                       p.DEVICE_FLAGS_RESET | p.DEVICE_FLAGS_PCI,
                                       NUM_REGIONS, NUM_IRQS), argsz)

    def _region(self, index: int) -> RegionInfo:
        if not 0 <= index < NUM_REGIONS:
            raise Refused(errno.EINVAL, f"region {index} does not exist")
        return self._regions.get(index) or RegionInfo(index, 0)

    def _region_info(self, msg: p.Message) -> bytes:
        argsz, _flags, index = _unpack(msg, p.REGION_INFO)[:3]
        region = self._region(index)
        if index in _BARS and region.size & (region.size - 1):
            raise Refused(errno.EINVAL, f"region {index} has size {region.size:#x}, not a power "
                                        "of 2 (QEMU would abort)")
        flags = 0
        if region.size:
            flags |= (p.REGION_FLAG_READ if region.readable else 0) \
                | (p.REGION_FLAG_WRITE if region.writable else 0)
        # Never MMAP: it would make QEMU drop posted writes for the whole device (T14).
        return _fit(p.REGION_INFO.pack(p.REGION_INFO.size, flags, index, 0, region.size, 0),
                    argsz)

    def _irq_info(self, msg: p.Message) -> bytes:
        argsz, _flags, index, _count = _unpack(msg, p.IRQ_INFO)
        if not 0 <= index < NUM_IRQS:
            raise Refused(errno.EINVAL, f"interrupt index {index} does not exist")
        count = self.function.irq_count(index)
        if count == 0 and index in (IrqIndex.ERR, IrqIndex.REQ):
            # An error keeps QEMU quiet; count 0 would make it warn (ERR).
            raise Refused(errno.EINVAL, f"the function has no {IrqIndex(index).name} interrupt",
                          logging.INFO)
        flags = p.IRQ_INFO_EVENTFD
        if index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
            flags |= p.IRQ_INFO_MASKABLE
        if index == IrqIndex.INTX:
            flags |= p.IRQ_INFO_AUTOMASKED
        # Never NORESIZE: QEMU would re-enable every MSI-X vector for each new one.
        return _fit(p.IRQ_INFO.pack(p.IRQ_INFO.size, flags, index, count), argsz)

    def _set_irqs(self, msg: p.Message) -> bytes:
        # argsz is 20 even when fds come (QEMU, T19): the fds are the data.
        _argsz, flags, index, start, count = _unpack(msg, p.IRQ_SET)
        data, action = flags & p.IRQ_DATA_MASK, flags & p.IRQ_ACTION_MASK_ALL
        if (flags & ~(p.IRQ_DATA_MASK | p.IRQ_ACTION_MASK_ALL) or data & (data - 1) or not data
                or action & (action - 1) or not action):
            raise Refused(errno.EINVAL, f"SET_IRQS flags {flags:#x} need one data type and "
                                        "one action")
        if not 0 <= index < NUM_IRQS:
            raise Refused(errno.EINVAL, f"interrupt index {index} does not exist")
        kind = IrqIndex(index).name
        if msg.fds and data != p.IRQ_DATA_EVENTFD:
            raise Refused(errno.EINVAL, f"{len(msg.fds)} file descriptors without DATA_EVENTFD")
        if action != p.IRQ_ACTION_TRIGGER:
            if index == IrqIndex.INTX:  # EOI unmask and resample set-up: no INTx here
                return b""
            raise Refused(errno.EINVAL, f"mask/unmask of {kind} is not supported")
        if data == p.IRQ_DATA_BOOL:
            raise Refused(errno.ENOTSUP, "DATA_BOOL is not supported")
        if data == p.IRQ_DATA_NONE:
            if count == 0 and start == 0:
                self.function.disable_irqs(index)
                return b""
            raise Refused(errno.ENOTSUP, f"client-triggered {kind} interrupts are not supported")
        total = self.function.irq_count(index)
        if count == 0 or start + count > total:
            raise Refused(errno.EINVAL, f"{kind} interrupts {start}+{count}: the function has "
                                        f"{total}")
        if len(msg.fds) > p.MAX_MSG_FDS or (msg.fds and len(msg.fds) != count):
            raise Refused(errno.EINVAL, f"{len(msg.fds)} eventfds for {count} interrupts")
        fds: list[int | None] = list(msg.fds) if msg.fds else [None] * count
        msg.fds.clear()  # the function owns them now, even when it refuses
        self.function.set_irq_eventfds(index, start, fds)
        return b""

    def _access(self, index: int, offset: int, count: int, write: bool) -> None:
        region = self._region(index)
        if count == 0 or count > self.max_data_xfer:
            raise Refused(errno.EINVAL, f"count {count} (1..{self.max_data_xfer} allowed)")
        if offset + count > region.size:
            raise Refused(errno.EINVAL, f"{offset:#x}+{count:#x} is outside region {index} "
                                        f"({region.size:#x} bytes)")
        if not (region.writable if write else region.readable):
            raise Refused(errno.EINVAL, f"region {index} is not "
                                        f"{'writable' if write else 'readable'}")

    def _region_read(self, msg: p.Message) -> bytes:
        offset, index, count = _unpack(msg, p.REGION_RW)
        self._access(index, offset, count, write=False)
        data = self.function.region_read(index, offset, count)
        if len(data) != count:
            raise Refused(errno.EIO, f"the function read {len(data)} of {count} bytes")
        return p.REGION_RW.pack(offset, index, count) + data

    def _region_write(self, msg: p.Message) -> bytes:
        offset, index, count = _unpack(msg, p.REGION_RW)
        data = msg.payload[p.REGION_RW.size:]
        if len(data) != count:
            raise Refused(errno.EINVAL, f"count {count} but {len(data)} data bytes")
        self._access(index, offset, count, write=True)
        self.function.region_write(index, offset, data)
        return p.REGION_RW.pack(offset, index, count)

    def _region_write_multi(self, msg: p.Message) -> bytes:
        (n,) = _unpack(msg, p.WRITE_MULTI)
        if not 1 <= n <= p.WRITE_MULTI_MAX or len(msg.payload) != p.WRITE_MULTI.size \
                + n * p.WRITE_ONE.size:
            raise Refused(errno.EINVAL, f"{n} writes in a {len(msg.payload)}-byte payload")
        for i in range(n):
            offset, index, count, data = p.WRITE_ONE.unpack_from(
                msg.payload, p.WRITE_MULTI.size + i * p.WRITE_ONE.size)
            try:
                if count > p.WRITE_MULTI_DATA:
                    raise Refused(errno.EINVAL, f"count {count} above {p.WRITE_MULTI_DATA}")
                self._access(index, offset, count, write=True)
                self.function.region_write(index, offset, data[:count])
            except (Refused, PciAccessError, ValueError) as e:
                self.stats["refused"] += 1
                log.error("%s: REGION_WRITE_MULTI write %d of %d (region %d at %#x): %s",
                          self.name, i + 1, n, index, offset, str(e))
        return b""

    def _reset(self, msg: p.Message) -> bytes:
        self.function.reset()  # DMA maps and the ERR/REQ eventfds stay (QEMU re-sends neither)
        return b""


class VfioUserServer:
    """Serves one PCI function on a UNIX socket to one vfio-user client at a time.

    ``memory`` is the function's DMA-map table: DMA_MAP/DMA_UNMAP edit it, and
    while a client is connected ``memory.remote`` reaches the maps it gave
    without an fd.
    """

    def __init__(self, path: Path, function: PciFunction, memory: GuestMemory,
                 name: str = "vfio-user", *, max_dma_maps: int = DEFAULT_MAX_DMA_MAPS,
                 socket_group: int | None = None) -> None:
        if not 1 <= max_dma_maps <= p.MAX_DMA_MAPS:
            raise ValueError(f"max_dma_maps {max_dma_maps} is not in 1..{p.MAX_DMA_MAPS}")
        self.path = Path(path)
        self.function = function
        self.memory = memory
        self.name = name
        self.max_dma_maps = max_dma_maps
        self.stats: Counter[str] = Counter()
        self.connection: VfioUserConnection | None = None
        self._server = UnixServer(self.path, self._serve, name, on_refused=self._refused,
                                  group=socket_group)

    @property
    def connections(self) -> int:
        """How many clients have connected so far."""
        return self._server.connections

    async def start(self) -> None:
        """Starts listening (a stale socket file is replaced, anything else refused)."""
        await self._server.start()

    async def close(self) -> None:
        """Stops listening, drops the client, removes the socket file if it is ours."""
        await self._server.close()

    def _refused(self) -> None:
        self.stats["refused_clients"] += 1

    async def _serve(self, sock: socket.socket) -> None:
        conn = VfioUserConnection(self.function, self.memory, sock, self.stats, self.name,
                                  self.max_dma_maps)
        self.connection = conn
        try:
            await conn.serve()
        finally:
            if self.connection is conn:
                self.connection = None
