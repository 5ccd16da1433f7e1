"""A minimal, blocking vfio-user *client* and the virtio-pci probe over it.

It sends what QEMU's vfio-user-pci sends for a guest's virtio-pci driver:
VERSION, DMA_MAP of guest RAM (with its fd, so the server reads the rings
itself), config and BAR4 register accesses, SET_IRQS of MSI-X eventfds, and
the doorbell, a posted REGION_WRITE. It is the micro-benchmark's client: one
request at a time, no server-initiated DMA expected.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

from ..pci.function import IrqIndex, RegionIndex
from ..transport.vfio_user import protocol as p
from ..transport.vfio_user.protocol import Command as C
from ..virtio.features import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from ..virtio.pci import NOTIFY_MULTIPLIER, NOTIFY_OFFSET
from ..virtio.pci_common import Reg
from .guest import GuestRam, Ring
from .stats import take_eventfd, wait_fd
from .vhost_user import recv_exact

VERSION_JSON = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": '
                b'65535, "max_data_xfer_size": 1048576, "write_multiple": true}}')
IRQ_EVENTFD_TRIGGER = 0x4 | 0x20
COMMAND_MEMORY_MASTER = 0x6


class VfioUserClient:
    """One vfio-user-pci connection to a server's UNIX socket."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._id = 0
        self.vectors: list[int] = []
        self.poller = select.poll()

    def close(self) -> None:
        """Hangs up and closes the MSI-X eventfds."""
        self.sock.close()
        for fd in self.vectors:
            os.close(fd)

    def send(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             posted: bool = False) -> int:
        """Sends one command; returns its message id."""
        msg_id = self._id
        self._id = (self._id + 1) & 0xFFFF
        data = p.HEADER.pack(msg_id, command, p.HEADER.size + len(payload),
                             p.FLAG_NO_REPLY if posted else 0, 0) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        return msg_id

    def call(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()
             ) -> bytes:
        """Sends a command and returns its reply's payload; RuntimeError on an error."""
        msg_id = self.send(command, payload, fds)
        got_id, got, size, flags, error = p.HEADER.unpack(recv_exact(self.sock, p.HEADER.size))
        body = recv_exact(self.sock, size - p.HEADER.size)
        if flags & p.FLAG_TYPE_MASK != p.TYPE_REPLY or (got_id, got) != (msg_id, command):
            raise RuntimeError(f"vfio-user: unexpected message {got} (id {got_id}, flags "
                               f"{flags:#x}) waiting for the reply to {command}")
        if flags & p.FLAG_ERROR:
            raise RuntimeError(f"vfio-user: command {command} failed: errno {error}")
        return body

    # -- commands --------------------------------------------------------------------------

    def version(self) -> None:
        """VERSION with QEMU's capabilities."""
        self.call(C.VERSION, p.VERSION.pack(0, 0) + VERSION_JSON + b"\0")

    def dma_map(self, ram: GuestRam) -> None:
        """Maps ``ram`` read-write at its guest-physical address, with its fd."""
        self.call(C.DMA_MAP, p.DMA_MAP.pack(32, p.DMA_FLAG_READ | p.DMA_FLAG_WRITE, 0,
                                            ram.gpa, ram.size), [ram.fd])

    def read(self, region: int, offset: int, size: int) -> int:
        """A little-endian register of ``size`` bytes."""
        body = self.call(C.REGION_READ, p.REGION_RW.pack(offset, region, size))
        return int.from_bytes(body[p.REGION_RW.size:p.REGION_RW.size + size], "little")

    def write(self, region: int, offset: int, size: int, value: int,
              posted: bool = False) -> None:
        """Writes a register; BAR writes are posted by QEMU (no reply)."""
        payload = p.REGION_RW.pack(offset, region, size) + value.to_bytes(size, "little")
        if posted:
            self.send(C.REGION_WRITE, payload, posted=True)
        else:
            self.call(C.REGION_WRITE, payload)

    def set_msix(self, count: int) -> None:
        """QEMU enabling MSI-X: one eventfd per vector, all in one SET_IRQS."""
        self.vectors = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.call(C.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, IRQ_EVENTFD_TRIGGER, IrqIndex.MSIX, 0,
                                                    count), self.vectors)

    # -- a virtio-pci driver ---------------------------------------------------------------

    def common(self, reg: Reg, size: int, value: int | None = None) -> int:
        """Reads (or writes, not posted, to keep the probe in order) a common-config field."""
        if value is None:
            return self.read(RegionIndex.BAR4, reg, size)
        self.write(RegionIndex.BAR4, reg, size, value)
        return value

    def probe(self, ring: Ring, queue: int = 0) -> int:
        """Linux's virtio-pci probe and ``setup_vq`` for one queue over ``ring`` (its
        addresses as the device sees them); queue interrupts on MSI-X vector 1, config
        on 0. Accepts every feature offered; returns them."""
        cmd = self.read(RegionIndex.CONFIG, 4, 2)
        self.write(RegionIndex.CONFIG, 4, 2, cmd | COMMAND_MEMORY_MASTER)
        self.common(Reg.STATUS, 1, 0)
        self.common(Reg.STATUS, 1, STATUS_ACKNOWLEDGE)
        self.common(Reg.STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        features = 0
        for half in (0, 1):
            self.common(Reg.DFSELECT, 4, half)
            features |= self.common(Reg.DF, 4) << (32 * half)
        for half in (0, 1):
            self.common(Reg.GFSELECT, 4, half)
            self.common(Reg.GF, 4, (features >> (32 * half)) & 0xFFFFFFFF)
        status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        self.common(Reg.STATUS, 1, status)
        if not self.common(Reg.STATUS, 1) & STATUS_FEATURES_OK:
            raise RuntimeError("virtio-pci: the device refused its own features")
        self.set_msix(2)
        self.common(Reg.MSIX_CONFIG, 2, 0)
        self.common(Reg.Q_SELECT, 2, queue)
        self.common(Reg.Q_SIZE, 2, ring.size)
        for lo, addr in ((Reg.Q_DESC_LO, ring.desc), (Reg.Q_DRIVER_LO, ring.avail),
                         (Reg.Q_DEVICE_LO, ring.used)):
            self.common(lo, 4, addr & 0xFFFFFFFF)
            self.common(Reg(lo + 4), 4, addr >> 32)
        self.common(Reg.Q_MSIX, 2, 1)
        self.notify_offset = NOTIFY_OFFSET + NOTIFY_MULTIPLIER * self.common(Reg.Q_NOTIFY_OFF, 2)
        self.common(Reg.Q_ENABLE, 2, 1)
        self.common(Reg.STATUS, 1, status | STATUS_DRIVER_OK)
        self.poller.register(self.vectors[1], select.POLLIN)
        return features

    def doorbell(self, queue: int = 0) -> None:
        """The driver's queue notify: a posted 16-bit BAR4 write of the queue index."""
        self.write(RegionIndex.BAR4, self.notify_offset, 2, queue, posted=True)

    def wait_interrupt(self) -> None:
        """Blocks until the queue's MSI-X vector fires, and consumes it."""
        while True:
            wait_fd(self.poller)
            if take_eventfd(self.vectors[1]):
                return
