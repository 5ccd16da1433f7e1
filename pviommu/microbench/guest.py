"""Guest RAM and one split virtqueue's driver side, for the micro-benchmark's clients.

:class:`GuestRam` is a memfd sealed as QEMU's memory-backend-memfd seals it,
mapped here, at a guest-physical address and a frontend user address.
:class:`Ring` lays out a split virtqueue in it (descriptor table, available
ring, used ring, as a Linux driver does) and posts fixed chains: the buffers of
a chain are written once and reposted, one request in flight at a time, so that
what the client does between two round trips costs as little as it can.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

QEMU_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
"""The seals QEMU adds by default (``seal=on``, backends/hostmem-memfd.c)."""

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DEFAULT_GPA = 0x40000000
DEFAULT_UADDR = 0x7F0000000000


def sealed_memfd(size: int, name: str = "fake-guest", seals: int = QEMU_SEALS) -> int:
    """A new memfd of ``size`` bytes with ``seals`` added (0: unsealed, resizable)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class GuestRam:
    """``size`` bytes of guest RAM at ``gpa`` (``uaddr`` in the frontend's address space)."""

    def __init__(self, size: int, gpa: int = DEFAULT_GPA, uaddr: int = DEFAULT_UADDR) -> None:
        self.size, self.gpa, self.uaddr = size, gpa, uaddr
        self.fd = sealed_memfd(size, "microbench-guest")
        self.mem = mmap.mmap(self.fd, size)

    def region(self) -> tuple[int, int, int, int]:
        """The vhost-user memory-table entry: (gpa, size, uaddr, mmap offset)."""
        return self.gpa, self.size, self.uaddr, 0

    def write(self, gpa: int, data: bytes) -> None:
        """Stores ``data`` at guest-physical ``gpa``."""
        off = gpa - self.gpa
        self.mem[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``gpa``."""
        off = gpa - self.gpa
        return self.mem[off:off + n]

    def close(self) -> None:
        """Unmaps and closes the memfd."""
        self.mem.close()
        os.close(self.fd)


class Ring:
    """The driver side of one split virtqueue of ``size`` entries at guest-physical ``base``.

    ``chain`` writes a chain's descriptors once; ``post`` makes it available and
    asks for an interrupt on its completion (EVENT_IDX's used_event, or no
    NO_INTERRUPT flag without it); ``completed`` reads the used ring.
    """

    def __init__(self, ram: GuestRam, base: int, size: int = 16) -> None:
        self.ram = ram
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = (self.used + 6 + 8 * size + 15) & ~15
        ram.write(base, bytes(self.end - base))
        self._avail_idx = 0
        self._last_used = 0
        self._next_desc = 0
        self._off = base - ram.gpa
        self._used_event = self.avail + 4 + 2 * size - ram.gpa

    def chain(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Writes a chain of (address, length, device-writable) buffers into free
        descriptors; returns its head, to :meth:`post` as often as wanted."""
        first = self._next_desc
        if first + len(buffers) > self.size:
            raise ValueError("no free descriptors left")
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.ram.write(self.desc + 16 * (first + i),
                           DESC.pack(addr, length, flags, 0 if last else first + i + 1))
        self._next_desc += len(buffers)
        return first

    def post(self, head: int) -> None:
        """Makes chain ``head`` available; its completion will be interrupted."""
        # One copy per field, never pack_into: it zeroes its destination first, and the
        # device reading the available index at that instant would see it go back.
        mem, off = self.ram.mem, self._off
        at = self._used_event
        mem[at:at + 2] = U16.pack(self._last_used)
        at = off + 16 * self.size + 4 + 2 * (self._avail_idx % self.size)
        mem[at:at + 2] = U16.pack(head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        at = off + 16 * self.size + 2
        mem[at:at + 2] = U16.pack(self._avail_idx)

    def completed(self) -> list[tuple[int, int]]:
        """The (head, written length) entries the device used since the last call."""
        mem = self.ram.mem
        used_off = self.used - self.ram.gpa
        idx = U16.unpack_from(mem, used_off + 2)[0]
        out = []
        while self._last_used != idx:
            out.append(USED_ELEM.unpack_from(mem, used_off + 4 + 8 * (self._last_used % self.size)))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out
