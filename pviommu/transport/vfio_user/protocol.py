"""vfio-user wire format (QEMU docs/interop/vfio-user.rst) as QEMU 10.2's client speaks it.

Every message starts with a 16-byte header ``'<HHIII'``: id, command, size
(of the whole message), flags, error. Integers are little endian. Where QEMU
10.2 and the spec differ, the layout here is QEMU's (DMA_READ/DMA_WRITE carry
the data at message byte 28; see the project's vfio-user checklist, T3).
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass, field

from ..sockio import close_fds, recv_exact
from ..watched import WatchedSocket

HEADER = struct.Struct("<HHIII")

FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20


class Command(enum.IntEnum):
    """Message commands (the spec's table; 14 is QEMU's unused DIRTY_PAGES)."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


_NAMES = {c.value: c.name for c in Command}


def command_name(code: int) -> str:
    """A readable name for a command number, known or not."""
    name = _NAMES.get(code)
    return name if name is not None else f"command {code}"


# -- payloads (after the header) --------------------------------------------------

VERSION = struct.Struct("<HH")  # major, minor; JSON text and a NUL follow
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, iova, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, iova, size
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count
REGION_RW = struct.Struct("<QII")  # offset, region, count; data follows
DMA_RW = struct.Struct("<QI")  # address, count; data follows, then DMA_RW_PAD bytes
DMA_RW_PAD = 4  # QEMU's VFIOUserDMARW is 32 bytes: data sits at message byte 28
WRITE_MULTI = struct.Struct("<Q")  # wr_cnt; wr_cnt WRITE_ONE entries follow
WRITE_ONE = struct.Struct("<QII8s")  # offset, region, count (<= 8), data padded to 8

MAJOR = 0
MINOR = 0

DMA_FLAG_READ = 1
DMA_FLAG_WRITE = 2
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1
DMA_UNMAP_FLAG_ALL = 2

DEVICE_FLAGS_RESET = 1
DEVICE_FLAGS_PCI = 2

REGION_FLAG_READ = 1
REGION_FLAG_WRITE = 2
REGION_FLAG_MMAP = 4
REGION_FLAG_CAPS = 8

IRQ_INFO_EVENTFD = 1
IRQ_INFO_MASKABLE = 2
IRQ_INFO_AUTOMASKED = 4
IRQ_INFO_NORESIZE = 8

IRQ_DATA_NONE = 1
IRQ_DATA_BOOL = 2
IRQ_DATA_EVENTFD = 4
IRQ_ACTION_MASK = 8
IRQ_ACTION_UNMASK = 0x10
IRQ_ACTION_TRIGGER = 0x20
IRQ_DATA_MASK = IRQ_DATA_NONE | IRQ_DATA_BOOL | IRQ_DATA_EVENTFD
IRQ_ACTION_MASK_ALL = IRQ_ACTION_MASK | IRQ_ACTION_UNMASK | IRQ_ACTION_TRIGGER

# -- limits --------------------------------------------------------------------------

MAX_MSG_FDS = 16  # QEMU's VFIO_USER_MAX_MAX_FDS; also what it proposes
MAX_DATA_XFER = 1 << 20  # QEMU's default; it refuses server DMA requests above its value
PGSIZE = 4096
MAX_DMA_MAPS = 65535  # the spec's default and the most QEMU accepts; servers may offer less
WRITE_MULTI_MAX = 200
WRITE_MULTI_DATA = 8
MAX_MESSAGE = MAX_DATA_XFER + 64  # the largest message the server reads
_RECV_FDS = 2 * MAX_MSG_FDS  # room to notice a peer that passes too many


@dataclass
class Message:
    """One received message: header fields, payload, passed fds (owned by the receiver)."""

    id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        """Whether this is a reply (to a server request)."""
        return self.flags & FLAG_TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        """Whether the sender asked for no reply (posted writes)."""
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def failed(self) -> bool:
        """Whether this reply reports an error."""
        return bool(self.flags & FLAG_ERROR)

    @property
    def name(self) -> str:
        """The command's name."""
        return command_name(self.command)


class ProtocolError(Exception):
    """A header the stream cannot be trusted after; the connection must close.

    ``id``/``command`` are set when the header was readable, so the sender can
    still get an error reply before the connection closes.
    """

    def __init__(self, message: str, id: int | None = None, command: int | None = None,
                 flags: int = 0) -> None:
        super().__init__(message)
        self.id = id
        self.command = command
        self.flags = flags


async def read_message(sock: socket.socket, max_size: int = MAX_MESSAGE) -> Message:
    """Reads one message (and the fds passed with it) from a non-blocking socket.

    Raises EOFError when the peer closes, ProtocolError for a header that
    makes the rest of the stream unusable (size below 16 or above
    ``max_size``, a message type other than command or reply).
    """
    fds: list[int] = []
    try:
        header = await recv_exact(sock, HEADER.size, fds, _RECV_FDS)
        msg_id, command, size, flags, error = HEADER.unpack(header)
        _check_header(msg_id, command, size, flags, max_size)
        payload = await recv_exact(sock, size - HEADER.size, fds, _RECV_FDS)
    except BaseException:
        close_fds(fds)
        raise
    return Message(msg_id, command, flags, error, payload, fds)


def _check_header(msg_id: int, command: int, size: int, flags: int, max_size: int) -> None:
    """ProtocolError for a header the rest of the stream cannot be read after."""
    kind = flags & FLAG_TYPE_MASK
    if HEADER.size <= size <= max_size and kind in (TYPE_COMMAND, TYPE_REPLY):
        return
    where = f"{command_name(command)} (id {msg_id})"
    if size < HEADER.size:
        raise ProtocolError(f"{where}: message size {size} is below the header size")
    if kind not in (TYPE_COMMAND, TYPE_REPLY):
        raise ProtocolError(f"{where}: unknown message type {kind}")
    raise ProtocolError(f"{where}: message size {size} exceeds the {max_size}-byte limit",
                        msg_id, command, flags)


class MessageReader:
    """:func:`read_message` for one connection, over a
    :class:`~pviommu.transport.watched.WatchedSocket` (one reader registered while
    messages keep coming instead of one added and removed per message: that cost
    as much as the doorbell it delivered). :meth:`close` before the socket closes.
    """

    def __init__(self, sock: socket.socket, max_size: int = MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._sock = WatchedSocket(sock, _RECV_FDS)

    async def read(self) -> Message:
        """The next message; raises as :func:`read_message` does."""
        fds: list[int] = []
        try:
            header = await self._sock.recv_exact(HEADER.size, fds)
            msg_id, command, size, flags, error = HEADER.unpack(header)
            _check_header(msg_id, command, size, flags, self.max_size)
            payload = await self._sock.recv_exact(size - HEADER.size, fds)
        except BaseException:
            close_fds(fds)
            raise
        return Message(msg_id, command, flags, error, payload, fds)

    def close(self) -> None:
        """Stops watching the socket."""
        self._sock.close()


def encode(msg_id: int, command: int, payload: bytes = b"", flags: int = TYPE_COMMAND,
           error: int = 0) -> bytes:
    """A complete message: header then payload."""
    return HEADER.pack(msg_id, command, HEADER.size + len(payload), flags, error) + payload


def reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    """A successful reply echoing ``msg_id`` and ``command``."""
    return encode(msg_id, command, payload, TYPE_REPLY)


def error_reply(msg_id: int, command: int, errno: int) -> bytes:
    """An error reply: header only, flags REPLY|ERROR, a positive errno."""
    assert errno > 0, "QEMU reads an error reply with errno 0 as a success"
    return encode(msg_id, command, b"", TYPE_REPLY | FLAG_ERROR, errno)
