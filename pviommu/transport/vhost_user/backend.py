"""A vhost-user back-end serving one virtio device model to QEMU over a UNIX socket.

The transport negotiates features, maps guest memory, tracks the vrings and
their eventfds, and hands started queues to the device. It never interprets
what the device does with them. A malformed, unknown, unsupported or
out-of-order message is logged and refused (a failure REPLY_ACK, or an empty
reply for messages that always have one); it never takes the process down.
When the frontend goes away the device is reset and the socket accepts the
next frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from ... import irqfd, loop_lock
from ...dma import DmaSpace
from ...memory import GuestMemory, MemoryAccessError, RegionSpec, check_memory_fd
from ...virtio.device import VirtioDevice
from ...virtio.features import F_ACCESS_PLATFORM, F_EVENT_IDX, F_INDIRECT_DESC, bit
from ...virtio.queue import SplitQueue, VirtqueueError
from ..kick_thread import KickThread
from ..unix_server import UnixServer
from . import protocol as p
from .backend_channel import BackendChannel, adopt_socket
from .inflight import InflightRegion, check_geometry, create_region
from .iotlb import DeviceIotlb
from .protocol import ProtocolFeature as PF
from .protocol import Request as R

log = logging.getLogger(__name__)

# Requests whose reply is part of the protocol, whatever REPLY_ACK says.
_HAS_REPLY = {R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE, R.GET_QUEUE_NUM,
              R.GET_CONFIG, R.GET_STATUS, R.GET_MAX_MEM_SLOTS, R.GET_INFLIGHT_FD}

# Requests acknowledged whenever the frontend asks, REPLY_ACK or not (QEMU always
# waits for the ack of an IOTLB message).
_ALWAYS_ACKED = {R.IOTLB_MSG}

# Requests valid before SET_OWNER (QEMU asks for features first).
# QEMU 10.2 sets up the back-end channel (SET_BACKEND_REQ_FD) in its back-end init,
# before vhost_dev_init sends SET_OWNER (seen with vhost-user-blk-pci, iommu_platform=on).
_BEFORE_OWNER = {R.GET_FEATURES, R.SET_OWNER, R.GET_PROTOCOL_FEATURES,
                 R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.SET_BACKEND_REQ_FD}


class Refused(Exception):
    """The back-end refuses a message (logged, answered with a failure)."""


@dataclass
class Vring:
    """The state of one vring as the frontend configured it."""

    index: int
    num: int = 0
    flags: int = 0
    desc: int = 0
    used: int = 0
    avail: int = 0
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False

    def close_fds(self) -> None:
        """Closes the vring's eventfds."""
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)


class VhostUserConnection:
    """One frontend connection; also the device's :class:`VirtioTransport`.

    A device that offers VIRTIO_F_ACCESS_PLATFORM (``device.access_platform``)
    gets the back-end channel (BACKEND_REQ) and a device IOTLB (``iotlb``).
    Once ACCESS_PLATFORM is negotiated its ring addresses are I/O virtual
    addresses: the rings start over ``iova_dma``, the DMA space that translates
    through the IOTLB, which whoever wires the device sets.

    With ``kick_threads`` the device's :attr:`~VirtioDevice.thread_queues` are
    served by a :class:`~pviommu.transport.kick_thread.KickThread` each (spinning
    ``poll_us`` after each batch), the rest of the work on the loop; otherwise
    every kick wakes the loop.

    A :attr:`~VirtioDevice.resubmittable` device gets in-flight tracking
    (INFLIGHT_SHMFD, :mod:`.inflight`): its queues mark what they take and
    return in the frontend's region, so the back-end that connects after this
    one died resubmits what was in flight.
    """

    BASE_PROTOCOL_FEATURES = (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG)
                              | bit(PF.RESET_DEVICE) | bit(PF.STATUS))

    def __init__(self, device: VirtioDevice, sock: socket.socket,
                 stats: Counter[str] | None = None, allow_unsealed_memory: bool = False,
                 iotlb_miss_timeout: float = 10.0, kick_threads: bool = True,
                 poll_us: int = 0) -> None:
        self.device = device
        self.kick_threads = kick_threads
        self.poll_us = poll_us
        self._threads: dict[int, KickThread] = {}
        self.sock = sock
        self.memory = GuestMemory(allow_unsealed=allow_unsealed_memory)
        self.dma = device.bind_memory(self.memory)
        self.iova_dma: DmaSpace | None = None
        self.rings = [Vring(i) for i in range(device.num_queues)]
        self.owner = False
        self.features = 0
        self.acked_protocol_features = 0
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.iotlb = DeviceIotlb(self.memory, self.stats, miss_timeout=iotlb_miss_timeout)
        self.inflight: InflightRegion | None = None
        self._reply_fds: list[int] = []  # sent with the next reply (GET_INFLIGHT_FD's)
        self._messages = p.MessageReader(sock)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        device.transport = self

    # -- the message loop ---------------------------------------------------

    async def serve(self) -> None:
        """Handles messages until the frontend disconnects, then resets the device."""
        try:
            while True:
                try:
                    msg = await self._messages.read()
                except EOFError:
                    log.info("vhost-user frontend disconnected")
                    return
                except (p.ProtocolError, OSError) as e:
                    # Strings, never the exception, go to the log: a handler that keeps
                    # records would keep its traceback, this connection and its memory.
                    log.error("vhost-user: %s; closing the connection", str(e))
                    self.stats["protocol_errors"] += 1
                    return
                reply = self.handle(msg)
                if reply is not None:
                    try:
                        await self._send(reply)
                    except OSError as e:  # the frontend left before its reply
                        log.info("vhost-user frontend gone before the reply to %s: %s",
                                 msg.name, str(e))
                        return
        finally:
            self.close()

    async def _send(self, reply: bytes) -> None:
        fds, self._reply_fds = self._reply_fds, []
        try:
            if fds:  # a small message: the socket buffer takes it whole, fds attached
                reply = reply[socket.send_fds(self.sock, [reply], fds):]
            if reply:
                await self._loop.sock_sendall(self.sock, reply)
        finally:
            p.close_fds(fds)

    def handle(self, msg: p.Message) -> bytes | None:
        """Processes one message and returns the bytes to send back, if any (the fds
        that go with them wait in ``_reply_fds``, closed if nobody sends them)."""
        p.close_fds(self._reply_fds)
        self._reply_fds = []
        self.stats[msg.name] += 1
        handler = HANDLERS.get(msg.request)
        try:
            try:
                if handler is None:
                    raise Refused("unknown or unsupported request")
                if not self.owner and msg.request not in _BEFORE_OWNER:
                    raise Refused("sent before SET_OWNER")
                payload = handler(self, msg)
            finally:
                p.close_fds(msg.fds)
        except Exception as e:
            if isinstance(e, Refused | ValueError | MemoryAccessError | VirtqueueError | OSError):
                log.error("vhost-user: refused %s: %s", msg.name, str(e))
            else:  # a bug of ours: still refuse the message rather than drop the frontend
                log.exception("vhost-user: internal error handling %s", msg.name)
            self.stats["refused"] += 1
            p.close_fds(self._reply_fds)
            self._reply_fds = []
            if msg.request in _HAS_REPLY:
                return p.encode(msg.request, b"", reply=True)
            if msg.need_reply and self._ack_wanted(msg):
                return p.encode(msg.request, p.U64.pack(1), reply=True)
            return None
        if payload is not None:
            return p.encode(msg.request, payload, reply=True)
        if msg.need_reply and self._ack_wanted(msg):
            return p.encode(msg.request, p.U64.pack(0), reply=True)
        return None

    def close(self) -> None:
        """Drops every ring, fd and mapping, and resets the device (once)."""
        if self._closed:
            return
        self._closed = True
        self.iotlb.close()
        p.close_fds(self._reply_fds)
        self._reply_fds = []
        threads = list(self._threads.values())
        for ring in self.rings:
            self._stop_ring(ring)
            if ring.kick is not None:
                self._unwatch_kick(ring)
            ring.close_fds()
        for thread in threads:  # stopped: each ends at once (or after one lock poll)
            thread.join(1.0)
        self.device.reset(system=True)
        if self.device.transport is self:
            self.device.transport = None
        if self.inflight is not None:  # the frontend keeps it for the next back-end
            self.inflight.close()
            self.inflight = None
        self.memory.clear()
        self._messages.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- VirtioTransport ----------------------------------------------------

    def notify(self, queue: int) -> None:
        """Signals the vring's call eventfd."""
        fd = self.rings[queue].call
        if fd is not None:
            irqfd.signal(fd, f"vhost-user vring {queue} call fd")

    def device_error(self, queue: int, reason: str) -> None:
        """Signals the vring's error eventfd (QEMU logs a vring error)."""
        self.stats["device_errors"] += 1
        fd = self.rings[queue].err
        if fd is not None:
            irqfd.signal(fd, f"vhost-user vring {queue} error fd")

    # -- helpers --------------------------------------------------------------

    def _acked(self, feature: PF) -> bool:
        return bool(self.acked_protocol_features & bit(feature))

    def _ack_wanted(self, msg: p.Message) -> bool:
        return self._acked(PF.REPLY_ACK) or msg.request in _ALWAYS_ACKED

    @property
    def protocol_features(self) -> int:
        """The protocol features GET_PROTOCOL_FEATURES reports (BACKEND_REQ only for a
        device that wants the IOTLB)."""
        features = self.BASE_PROTOCOL_FEATURES
        if self.device.access_platform:
            features |= bit(PF.BACKEND_REQ)
        if self.device.resubmittable:
            features |= bit(PF.INFLIGHT_SHMFD)
        return features

    @property
    def access_platform(self) -> bool:
        """Whether VIRTIO_F_ACCESS_PLATFORM is negotiated: device addresses are IOVAs."""
        return bool(self.features & bit(F_ACCESS_PLATFORM))

    def _require(self, feature: PF) -> None:
        if not self._acked(feature):
            raise Refused(f"protocol feature {feature.name} was not negotiated")

    @staticmethod
    def _payload(msg: p.Message, size: int) -> bytes:
        if len(msg.payload) != size:
            raise Refused(f"payload is {len(msg.payload)} bytes, expected {size}")
        return msg.payload

    def _no_fds(self, msg: p.Message) -> None:
        if msg.fds:
            raise Refused(f"{len(msg.fds)} unexpected file descriptors")

    def _u64(self, msg: p.Message) -> int:
        self._no_fds(msg)
        value: int = p.U64.unpack(self._payload(msg, 8))[0]
        return value

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise Refused(f"vring {index} does not exist (the device has {len(self.rings)})")
        return self.rings[index]

    def _state(self, msg: p.Message) -> tuple[Vring, int]:
        self._no_fds(msg)
        index, num = p.VRING_STATE.unpack(self._payload(msg, 8))
        return self._ring(index), num

    def _stopped(self, ring: Vring, what: str) -> None:
        if ring.started:
            raise Refused(f"{what} of vring {ring.index} while it runs")

    def offered_features(self) -> int:
        """The feature bits GET_FEATURES reports."""
        return self.device.offered_features() | bit(p.F_PROTOCOL_FEATURES)

    # -- handlers -------------------------------------------------------------

    def _do_get_features(self, msg: p.Message) -> bytes:
        self._payload(msg, 0)
        return p.U64.pack(self.offered_features())

    def _do_set_features(self, msg: p.Message) -> None:
        features = self._u64(msg)
        extra = features & ~self.offered_features()
        if extra:
            raise Refused(f"features {extra:#x} were never offered")
        self.device.set_driver_features(features & ~bit(p.F_PROTOCOL_FEATURES))
        self.features = features
        if not features & bit(p.F_PROTOCOL_FEATURES):
            for ring in self.rings:
                ring.enabled = True

    def _do_set_owner(self, msg: p.Message) -> None:
        self._no_fds(msg)
        self._payload(msg, 0)
        if self.owner:
            raise Refused("the session already has an owner")
        self.owner = True

    def _do_reset_owner(self, msg: p.Message) -> None:
        # Deprecated; the spec recommends ignoring it or disabling the rings.
        for ring in self.rings:
            ring.enabled = False

    def _do_get_protocol_features(self, msg: p.Message) -> bytes:
        self._payload(msg, 0)
        return p.U64.pack(self.protocol_features)

    def _do_set_protocol_features(self, msg: p.Message) -> None:
        features = self._u64(msg)
        extra = features & ~self.protocol_features
        if extra:
            raise Refused(f"protocol features {extra:#x} were never offered")
        self.acked_protocol_features = features

    def _do_get_queue_num(self, msg: p.Message) -> bytes:
        self._require(PF.MQ)
        self._payload(msg, 0)
        return p.U64.pack(len(self.rings))

    def _do_set_mem_table(self, msg: p.Message) -> None:
        if len(msg.payload) < p.MEM_HEADER.size:
            raise Refused("payload shorter than the region count")
        n, _pad = p.MEM_HEADER.unpack_from(msg.payload)
        if not 1 <= n <= p.MAX_MEM_REGIONS:
            raise Refused(f"{n} memory regions (1..{p.MAX_MEM_REGIONS} allowed)")
        self._payload(msg, p.MEM_HEADER.size + n * p.MEM_REGION.size)
        if len(msg.fds) != n:
            raise Refused(f"{n} memory regions but {len(msg.fds)} file descriptors")
        specs = [RegionSpec(*p.MEM_REGION.unpack_from(msg.payload, 8 + i * p.MEM_REGION.size))
                 for i in range(n)]
        fds, msg.fds = list(msg.fds), []
        self.iotlb.clear()  # its gpas came from the old table
        self.memory.set_regions(specs, fds)
        log.info("guest memory: %s", ", ".join(
            f"gpa {s.gpa:#x} size {s.size:#x}" for s in specs))

    def _do_set_vring_num(self, msg: p.Message) -> None:
        ring, num = self._state(msg)
        self._stopped(ring, "SET_VRING_NUM")
        if num == 0 or num > 32768 or num & (num - 1):
            raise Refused(f"vring size {num} is not a power of 2 up to 32768")
        ring.num = num

    def _do_set_vring_addr(self, msg: p.Message) -> None:
        self._no_fds(msg)
        index, flags, desc, used, avail, _log = p.VRING_ADDR.unpack(
            self._payload(msg, p.VRING_ADDR.size))
        ring = self._ring(index)
        self._stopped(ring, "SET_VRING_ADDR")
        if flags:
            raise Refused(f"vring flags {flags:#x} (dirty logging) are not supported")
        ring.desc, ring.used, ring.avail = desc, used, avail

    def _do_set_vring_base(self, msg: p.Message) -> None:
        ring, base = self._state(msg)
        self._stopped(ring, "SET_VRING_BASE")
        if base > 0xFFFF:
            raise Refused(f"split vring base {base:#x} has reserved bits set")
        ring.base = base

    def _do_get_vring_base(self, msg: p.Message) -> bytes:
        ring, _ = self._state(msg)
        self._stop_ring(ring)
        self.iotlb.clear()  # no INVALIDATE comes once the device stops
        return p.VRING_STATE.pack(ring.index, ring.base)

    def _vring_fd(self, msg: p.Message) -> tuple[Vring, int | None]:
        value = p.U64.unpack(self._payload(msg, 8))[0]
        if value & ~(p.VRING_IDX_MASK | p.VRING_NOFD_MASK):
            raise Refused(f"reserved bits set in {value:#x}")
        ring = self._ring(value & p.VRING_IDX_MASK)
        if value & p.VRING_NOFD_MASK:
            if msg.fds:
                raise Refused("file descriptor passed with the invalid-fd flag")
            return ring, None
        if len(msg.fds) != 1:
            raise Refused(f"expected one file descriptor, got {len(msg.fds)}")
        fd = msg.fds.pop()
        return ring, fd

    def _do_set_vring_kick(self, msg: p.Message) -> None:
        ring, fd = self._vring_fd(msg)
        if fd is None:
            raise Refused("polling mode (no kick fd) is not supported")
        if ring.kick is not None:
            self._unwatch_kick(ring)
            os.close(ring.kick)
        ring.kick = fd
        os.set_blocking(fd, False)
        self._watch_kick(ring, fd)
        tracker = self.inflight.queue(ring.index) if self.inflight is not None else None
        pending = tracker.in_flight() if tracker is not None else 0
        if pending:
            log.warning("vring %d: %d requests in flight when the previous back-end went "
                        "away: submitted again", ring.index, pending)
            # They wait for no kick of the driver's (libvhost-user kicks itself too).
            os.write(fd, (1).to_bytes(8, "little"))

    def _interrupt_fd(self, msg: p.Message) -> tuple[Vring, int | None]:
        ring, fd = self._vring_fd(msg)
        if fd is not None:
            try:
                irqfd.adopt(fd)
            except OSError:
                os.close(fd)
                raise
        return ring, fd

    def _do_set_vring_call(self, msg: p.Message) -> None:
        ring, fd = self._interrupt_fd(msg)
        if ring.call is not None:
            os.close(ring.call)
        ring.call = fd

    def _do_set_vring_err(self, msg: p.Message) -> None:
        ring, fd = self._interrupt_fd(msg)
        if ring.err is not None:
            os.close(ring.err)
        ring.err = fd

    def _do_set_vring_enable(self, msg: p.Message) -> None:
        if not self.features & bit(p.F_PROTOCOL_FEATURES) and self.features:
            raise Refused("VHOST_USER_F_PROTOCOL_FEATURES was not negotiated")
        ring, enable = self._state(msg)
        if enable not in (0, 1):
            raise Refused(f"enable value {enable} is neither 0 nor 1")
        ring.enabled = bool(enable)
        if ring.enabled and ring.started:
            self.device.kick(ring.index)

    def _do_get_config(self, msg: p.Message) -> bytes:
        self._require(PF.CONFIG)
        self._no_fds(msg)
        offset, size, flags = self._config_header(msg)
        data = self.device.read_config(offset, size)
        return p.CONFIG_HEADER.pack(offset, size, flags) + data

    def _do_set_config(self, msg: p.Message) -> None:
        self._require(PF.CONFIG)
        self._no_fds(msg)
        offset, size, flags = self._config_header(msg)
        if flags != 0:
            raise Refused(f"config flags {flags} (live migration) are not supported")
        self.device.write_config(offset, msg.payload[p.CONFIG_HEADER.size:])

    def _config_header(self, msg: p.Message) -> tuple[int, int, int]:
        if len(msg.payload) < p.CONFIG_HEADER.size:
            raise Refused("payload shorter than the config header")
        offset, size, flags = p.CONFIG_HEADER.unpack_from(msg.payload)
        if size > p.MAX_CONFIG_SIZE:
            raise Refused(f"config size {size} exceeds {p.MAX_CONFIG_SIZE}")
        self._payload(msg, p.CONFIG_HEADER.size + size)
        return offset, size, flags

    def _do_reset_device(self, msg: p.Message) -> None:
        self._require(PF.RESET_DEVICE)
        self._payload(msg, 0)
        for ring in self.rings:
            self._stop_ring(ring)
            ring.enabled = False
            ring.num = ring.base = ring.desc = ring.used = ring.avail = ring.flags = 0
        self.device.reset()
        self.iotlb.clear()
        self.features = 0

    def _do_set_status(self, msg: p.Message) -> None:
        self._require(PF.STATUS)
        status = self._u64(msg)
        if status > 0xFF:
            raise Refused(f"status {status:#x} does not fit in 8 bits")
        if status == 0:
            self.iotlb.clear()
        self.device.set_status(status)

    def _do_set_backend_req_fd(self, msg: p.Message) -> None:
        self._require(PF.BACKEND_REQ)
        self._payload(msg, 0)
        if len(msg.fds) != 1:
            raise Refused(f"expected one file descriptor, got {len(msg.fds)}")
        sock = adopt_socket(msg.fds.pop())  # ValueError (fd closed) unless a stream socket
        self.iotlb.set_channel(BackendChannel(sock))

    def _do_iotlb_msg(self, msg: p.Message) -> None:
        self._no_fds(msg)
        if not self.access_platform:
            raise Refused("VIRTIO_F_ACCESS_PLATFORM was not negotiated")
        self.iotlb.handle_message(p.IotlbMsg.unpack(msg.payload))

    def _do_get_status(self, msg: p.Message) -> bytes:
        self._require(PF.STATUS)
        self._payload(msg, 0)
        return p.U64.pack(self.device.status)

    def _inflight_header(self, msg: p.Message) -> tuple[int, int, int, int]:
        self._require(PF.INFLIGHT_SHMFD)
        size, offset, num_queues, queue_size = p.INFLIGHT.unpack(
            self._payload(msg, p.INFLIGHT.size))
        if num_queues > len(self.rings):
            raise Refused(f"in-flight region for {num_queues} queues (the device has "
                          f"{len(self.rings)})")
        try:
            check_geometry(num_queues, queue_size)
        except ValueError as e:
            raise Refused(str(e)) from None
        return size, offset, num_queues, queue_size

    def _do_get_inflight_fd(self, msg: p.Message) -> bytes:
        self._no_fds(msg)
        _size, _offset, num_queues, queue_size = self._inflight_header(msg)
        fd, size = create_region(num_queues, queue_size)
        self._reply_fds = [fd]
        log.info("in-flight region: %d bytes for %d queues of %d", size, num_queues,
                 queue_size)
        return p.INFLIGHT.pack(size, 0, num_queues, queue_size)

    def _do_set_inflight_fd(self, msg: p.Message) -> None:
        size, offset, num_queues, queue_size = self._inflight_header(msg)
        if len(msg.fds) != 1:
            raise Refused(f"expected one file descriptor, got {len(msg.fds)}")
        for ring in self.rings:
            self._stopped(ring, "SET_INFLIGHT_FD")
        fd = msg.fds[0]
        check_memory_fd(fd, offset, size, self.memory.allow_unsealed)
        region = InflightRegion(fd, size, offset, num_queues, queue_size)  # ValueError: refused
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = region
        log.info("in-flight region set: %d bytes for %d queues of %d", size, num_queues,
                 queue_size)

    # -- rings ---------------------------------------------------------------------

    def _watch_kick(self, ring: Vring, fd: int) -> None:
        """Serves the kicks of ``fd``: on a kick thread if the device allows it, else
        on the loop."""
        if self.kick_threads and ring.index in self.device.thread_queues:
            lock = loop_lock.install(self._loop)
            if lock is not None:
                try:
                    self._threads[ring.index] = KickThread(
                        fd, lock, lambda: self._on_thread_kick(ring),
                        f"{self.device.name}-vring{ring.index}", self.poll_us,
                        lambda: self._ring_pending(ring))
                    return
                except (OSError, RuntimeError) as e:  # no thread: the loop serves it
                    log.warning("vring %d: no kick thread (%s); served on the loop",
                                ring.index, str(e))
        self._loop.add_reader(fd, self._on_kick, ring, fd)

    def _unwatch_kick(self, ring: Vring) -> None:
        """Stops serving the kicks of ``ring.kick`` (before it is closed or replaced)."""
        thread = self._threads.pop(ring.index, None)
        if thread is not None:
            thread.stop()  # the loop holds the lock: no batch runs, none will
        elif ring.kick is not None:
            self._loop.remove_reader(ring.kick)

    def _on_kick(self, ring: Vring, kick: int) -> None:
        # ``kick`` is ring.kick: its reader is removed before ring.kick changes.
        try:
            os.read(kick, 8)
        except BlockingIOError:
            return
        except OSError as e:
            log.error("vring %d: kick fd: %s", ring.index, str(e))
            return
        self._kicked(ring)

    def _kicked(self, ring: Vring) -> None:
        if not ring.started and not self._start_ring(ring):
            return
        if ring.enabled:
            self.device.kick(ring.index)

    def _on_thread_kick(self, ring: Vring) -> None:
        """A kick on the ring's kick thread (the loop's lock held): what the device
        cannot do there, and starting the ring, are handed to the loop."""
        if self._closed or (ring.started and not ring.enabled):
            return
        if ring.started and self.device.kick_threaded(ring.index):
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing to serve any more
            self._loop.call_soon_threadsafe(self._kick_on_loop, ring)

    def _kick_on_loop(self, ring: Vring) -> None:
        if not self._closed and ring.index in self._threads:
            self._kicked(ring)

    def _ring_pending(self, ring: Vring) -> bool:
        """Whether ``ring`` has buffers not processed yet (for a kick thread's polling;
        the loop's lock held)."""
        queue = self.device.queues.get(ring.index)
        if self._closed or not ring.enabled or queue is None or self.device.needs_reset:
            return False
        try:
            return queue.has_work()
        except Exception:  # noqa: BLE001 - a ring that cannot be read: the next kick tells
            return False

    def _start_ring(self, ring: Vring) -> bool:
        try:
            if ring.num == 0:
                raise VirtqueueError("kicked before SET_VRING_NUM")
            size = ring.num
            dma = self.dma
            if self.access_platform:
                if self.iova_dma is None:
                    raise VirtqueueError("its addresses are I/O virtual addresses "
                                         "(ACCESS_PLATFORM) and no IOTLB DMA space is wired")
                dma, desc, avail, used = self.iova_dma, ring.desc, ring.avail, ring.used
            else:
                desc = self.memory.uaddr_to_gpa(ring.desc, 16 * size)
                avail = self.memory.uaddr_to_gpa(ring.avail, 6 + 2 * size)
                used = self.memory.uaddr_to_gpa(ring.used, 6 + 8 * size)
            queue = SplitQueue(dma, size, desc, avail, used,
                               event_idx=self.device.has_feature(F_EVENT_IDX),
                               indirect=self.device.has_feature(F_INDIRECT_DESC),
                               next_avail=ring.base)
            tracker = self.inflight.queue(ring.index) if self.inflight is not None else None
            if tracker is not None:
                if size > tracker.size:
                    raise VirtqueueError(f"the in-flight region tracks {tracker.size} "
                                         f"descriptors, the ring has {size}")
                queue.track_inflight(tracker)
            self.device.start_queue(ring.index, queue)
        except (VirtqueueError, MemoryAccessError, ValueError) as e:
            log.error("vring %d cannot start: %s", ring.index, str(e))
            self.device_error(ring.index, str(e))
            return False
        ring.started = True
        return True

    def _stop_ring(self, ring: Vring) -> None:
        if not ring.started:
            return
        queue = self.device.stop_queue(ring.index)
        if queue is not None:
            ring.base = queue.next_avail
        ring.started = False


Handler: TypeAlias = Callable[[VhostUserConnection, p.Message], bytes | None]

# Every request the back-end serves, and its handler (rust-vmm's backend_req_handler
# match, as a table of plain functions: no per-connection bound methods to collect).
# A request missing here is refused as unknown or unsupported.
HANDLERS: dict[int, Handler] = {
    R.GET_FEATURES: VhostUserConnection._do_get_features,
    R.SET_FEATURES: VhostUserConnection._do_set_features,
    R.SET_OWNER: VhostUserConnection._do_set_owner,
    R.RESET_OWNER: VhostUserConnection._do_reset_owner,
    R.GET_PROTOCOL_FEATURES: VhostUserConnection._do_get_protocol_features,
    R.SET_PROTOCOL_FEATURES: VhostUserConnection._do_set_protocol_features,
    R.GET_QUEUE_NUM: VhostUserConnection._do_get_queue_num,
    R.SET_MEM_TABLE: VhostUserConnection._do_set_mem_table,
    R.SET_VRING_NUM: VhostUserConnection._do_set_vring_num,
    R.SET_VRING_ADDR: VhostUserConnection._do_set_vring_addr,
    R.SET_VRING_BASE: VhostUserConnection._do_set_vring_base,
    R.GET_VRING_BASE: VhostUserConnection._do_get_vring_base,
    R.SET_VRING_KICK: VhostUserConnection._do_set_vring_kick,
    R.SET_VRING_CALL: VhostUserConnection._do_set_vring_call,
    R.SET_VRING_ERR: VhostUserConnection._do_set_vring_err,
    R.SET_VRING_ENABLE: VhostUserConnection._do_set_vring_enable,
    R.GET_CONFIG: VhostUserConnection._do_get_config,
    R.SET_CONFIG: VhostUserConnection._do_set_config,
    R.RESET_DEVICE: VhostUserConnection._do_reset_device,
    R.SET_STATUS: VhostUserConnection._do_set_status,
    R.GET_STATUS: VhostUserConnection._do_get_status,
    R.SET_BACKEND_REQ_FD: VhostUserConnection._do_set_backend_req_fd,
    R.IOTLB_MSG: VhostUserConnection._do_iotlb_msg,
    R.GET_INFLIGHT_FD: VhostUserConnection._do_get_inflight_fd,
    R.SET_INFLIGHT_FD: VhostUserConnection._do_set_inflight_fd,
}


class VhostUserServer:
    """Listens on a UNIX socket and serves ``device`` to one frontend at a time.

    ``allow_unsealed_memory`` maps guest memory fds that are not sealed against
    shrinking (see :func:`~pviommu.memory.check_memory_fd`); ``group`` may connect
    too (the socket is 0660), else the socket is owner-only. An IOTLB miss the
    frontend leaves unanswered for ``iotlb_miss_timeout`` seconds fails.
    ``kick_threads`` and ``poll_us``: see :class:`VhostUserConnection`.
    """

    def __init__(self, path: Path, device: VirtioDevice,
                 on_connect: Callable[[VhostUserConnection], None] | None = None,
                 allow_unsealed_memory: bool = False, group: int | None = None,
                 iotlb_miss_timeout: float = 10.0, kick_threads: bool = True,
                 poll_us: int = 0) -> None:
        if poll_us < 0:
            raise ValueError(f"poll_us {poll_us} is negative")
        self.path = Path(path)
        self.device = device
        self.kick_threads = kick_threads
        self.poll_us = poll_us
        self.on_connect = on_connect
        self.allow_unsealed_memory = allow_unsealed_memory
        self.iotlb_miss_timeout = iotlb_miss_timeout
        self.stats: Counter[str] = Counter()
        self.connection: VhostUserConnection | None = None
        self._server = UnixServer(self.path, self._serve, "vhost-user", group=group)

    @property
    def connections(self) -> int:
        """How many frontends have connected so far."""
        return self._server.connections

    async def start(self) -> None:
        """Starts listening (a stale socket file is replaced, anything else refused)."""
        await self._server.start()

    async def _serve(self, sock: socket.socket) -> None:
        conn = VhostUserConnection(self.device, sock, self.stats, self.allow_unsealed_memory,
                                   self.iotlb_miss_timeout, self.kick_threads, self.poll_us)
        self.connection = conn
        try:
            if self.on_connect is not None:
                self.on_connect(conn)
            await conn.serve()
        finally:
            conn.close()  # idempotent; also when on_connect failed
            if self.connection is conn:
                self.connection = None  # nothing of a gone frontend outlives it

    async def close(self) -> None:
        """Stops listening and drops the current frontend."""
        await self._server.close()
