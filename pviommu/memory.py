"""Guest memory: regions mmapped from the frontend's fds, every access bounds-checked.

The guest is untrusted: any address it hands us is checked against the regions
before it is touched, and an address outside every region raises
:class:`MemoryAccessError`, never a crash.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class MemoryAccessError(Exception):
    """An access that falls outside every guest memory region."""

    def __init__(self, address: int, length: int, what: str = "guest address",
                 problem: str = "is outside guest memory") -> None:
        super().__init__(f"{what} range {address:#x}+{length:#x} {problem}")
        self.address = address
        self.length = length


class RemoteMemoryError(MemoryAccessError):
    """The range lies in a region without a file descriptor: only the frontend can
    reach it (vfio-user DMA_READ/DMA_WRITE), so it has no local view."""

    def __init__(self, address: int, length: int) -> None:
        super().__init__(address, length, problem="is in memory without an fd (no local view)")


class RemoteAccess(Protocol):
    """How a frontend reads and writes memory the backend cannot map."""

    async def read(self, gpa: int, length: int) -> bytes:
        """Copies ``length`` bytes at ``gpa`` from the frontend."""
        ...

    async def write(self, gpa: int, data: bytes) -> None:
        """Copies ``data`` to ``gpa`` through the frontend."""
        ...


@dataclass(frozen=True)
class RemoteRange:
    """A piece of guest memory reachable only through ``memory.remote``."""

    memory: GuestMemory
    gpa: int
    length: int

    async def read(self) -> bytes:
        """The bytes of the range, fetched from the frontend."""
        if self.memory.remote is None:
            raise RemoteMemoryError(self.gpa, self.length)
        return await self.memory.remote.read(self.gpa, self.length)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Stores ``data`` (exactly ``length`` bytes) through the frontend."""
        if self.memory.remote is None:
            raise RemoteMemoryError(self.gpa, self.length)
        await self.memory.remote.write(self.gpa, bytes(data))


Piece = memoryview | RemoteRange
"""A resolved piece of a DMA buffer: a local view, or a range only the frontend reaches."""


@dataclass(frozen=True)
class RegionSpec:
    """A region as the frontend describes it (vhost-user memory region layout)."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int


def check_memory_fd(fd: int, offset: int, size: int, allow_unsealed: bool = False) -> None:
    """Raises ValueError unless ``size`` bytes of ``fd`` at ``offset`` can be mapped safely.

    The fd must be a regular file (a memfd) at least ``offset + size`` bytes
    long. A file that shrinks under a mapping makes every access to the lost
    part a SIGBUS that kills the process, so unless ``allow_unsealed`` (the
    frontend is trusted not to shrink it) the fd must be a memfd sealed with
    F_SEAL_SHRINK, as QEMU's memory-backend-memfd seals its memfds by default.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("the memory fd is not a regular file or memfd")
    if offset < 0 or offset + size > st.st_size:
        raise ValueError(f"the region {offset:#x}+{size:#x} lies beyond the end of its "
                         f"{st.st_size:#x}-byte file")
    if allow_unsealed:
        return
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: not a memfd, no seals at all
        seals = None
    if seals is None or not seals & fcntl.F_SEAL_SHRINK:
        raise ValueError("the memory fd is not a memfd sealed against shrinking "
                         "(F_SEAL_SHRINK, QEMU's memory-backend-memfd default); "
                         "pviommu serve --allow-unsealed-memory trusts the frontend instead")


class Region:
    """One region: ``size`` bytes of the fd at ``mmap_offset``, seen at ``gpa``.

    Without an fd (``fd`` None) the region is *remote*: it exists, but only the
    frontend can read or write it. ``writable`` False maps it read-only. The fd
    is checked with :func:`check_memory_fd` first.
    """

    def __init__(self, spec: RegionSpec, fd: int | None, writable: bool = True,
                 allow_unsealed: bool = False) -> None:
        if spec.size <= 0:
            raise ValueError(f"memory region at {spec.gpa:#x} has size {spec.size}")
        if spec.gpa + spec.size > 1 << 64 or spec.uaddr + spec.size > 1 << 64:
            raise ValueError(f"memory region at {spec.gpa:#x} wraps the address space")
        self.spec = spec
        self.writable = writable
        self._end = spec.gpa + spec.size
        self._mmap: mmap.mmap | None = None
        self.view: memoryview | None = None
        if fd is None:
            return
        check_memory_fd(fd, spec.mmap_offset, spec.size, allow_unsealed)
        page_off = spec.mmap_offset % mmap.PAGESIZE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._mmap = mmap.mmap(fd, spec.size + page_off, mmap.MAP_SHARED, prot,
                               offset=spec.mmap_offset - page_off)
        self._base = memoryview(self._mmap)
        self.view = self._base[page_off:page_off + spec.size]

    @property
    def gpa(self) -> int:
        """Guest physical address of the first byte."""
        return self.spec.gpa

    @property
    def end(self) -> int:
        """Guest physical address one past the last byte."""
        return self._end

    def close(self) -> None:
        """Unmaps the region; views still held elsewhere keep it alive until released."""
        if self._mmap is None or self.view is None:
            return
        self.view.release()
        self._base.release()
        try:
            self._mmap.close()
        except BufferError:
            log.debug("region %#x still has views; unmapped when they go", self.gpa)


class GuestMemory:
    """The guest's memory regions, looked up by guest-physical or frontend-virtual address.

    ``allow_unsealed`` accepts memory fds that are not sealed against shrinking
    (see :func:`check_memory_fd`).
    """

    def __init__(self, allow_unsealed: bool = False) -> None:
        self.allow_unsealed = allow_unsealed
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self.remote: RemoteAccess | None = None
        # Changes whenever a region goes away, so views handed out may be stale.
        self.generation = 0

    @property
    def regions(self) -> list[RegionSpec]:
        """The current regions, by guest-physical address."""
        return [r.spec for r in self._regions]

    def set_regions(self, specs: list[RegionSpec], fds: list[int]) -> None:
        """Replaces every region by ``specs`` mapped from ``fds``; the fds are closed.

        Raises ValueError (and keeps no new region) if the regions overlap or a
        mapping fails.
        """
        new: list[Region] = []
        try:
            if len(specs) != len(fds):
                raise ValueError(f"{len(specs)} memory regions but {len(fds)} fds")
            for spec, fd in zip(specs, fds, strict=True):
                new.append(Region(spec, fd, allow_unsealed=self.allow_unsealed))
            new.sort(key=lambda r: r.gpa)
            for a, b in zip(new, new[1:], strict=False):
                if a.end > b.gpa:
                    raise ValueError(f"memory regions {a.gpa:#x} and {b.gpa:#x} overlap")
        except (ValueError, OSError, OverflowError) as e:
            for r in new:
                r.close()
            raise ValueError(f"cannot map guest memory: {e}") from e
        finally:
            for fd in fds:
                os.close(fd)
        self.clear()
        self._regions = new
        self._starts = [r.gpa for r in new]

    def add_region(self, spec: RegionSpec, fd: int | None, writable: bool = True) -> None:
        """Adds one region (remote if ``fd`` is None); ``fd`` is closed in any case.

        Raises ValueError if it overlaps a region already there or cannot be mapped.
        """
        try:
            i = bisect.bisect_right(self._starts, spec.gpa)
            for r in self._regions[max(i - 1, 0):i + 1]:
                if r.gpa < spec.gpa + spec.size and spec.gpa < r.end:
                    raise ValueError(f"region {spec.gpa:#x}+{spec.size:#x} overlaps the region "
                                     f"{r.gpa:#x}+{r.spec.size:#x}")
            region = Region(spec, fd, writable, self.allow_unsealed)
        except (ValueError, OSError, OverflowError) as e:
            raise ValueError(f"cannot map guest memory: {e}") from e
        finally:
            if fd is not None:
                os.close(fd)
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)

    def remove_range(self, gpa: int, size: int) -> int:
        """Removes every region that lies inside ``[gpa, gpa+size)``; returns how many.

        Raises ValueError, removing nothing, if a region straddles either end.
        """
        end = gpa + size
        lo = max(bisect.bisect_right(self._starts, gpa) - 1, 0)
        hi = bisect.bisect_left(self._starts, end)
        touched = [r for r in self._regions[lo:hi] if r.gpa < end and gpa < r.end]
        for r in touched:
            if r.gpa < gpa or r.end > end:
                raise ValueError(f"range {gpa:#x}+{size:#x} cuts the region {r.gpa:#x}+"
                                 f"{r.spec.size:#x}; unmap whole regions")
        if not touched:
            return 0
        first = self._regions.index(touched[0], lo, hi)
        for r in touched:
            r.close()
        del self._regions[first:first + len(touched)]
        del self._starts[first:first + len(touched)]
        self.generation += 1
        return len(touched)

    def clear(self) -> None:
        """Unmaps every region."""
        self.generation += 1
        for r in self._regions:
            r.close()
        self._regions = []
        self._starts = []

    def _region(self, gpa: int, length: int) -> Region:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self._regions[i]
            if gpa + length <= r._end:
                return r
        raise MemoryAccessError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa+length)`` lies inside one region."""
        try:
            self._region(gpa, length)
        except MemoryAccessError:
            return False
        return True

    def view(self, gpa: int, length: int, write: bool = True) -> memoryview:
        """A zero-copy view of ``length`` bytes at ``gpa``, inside one region.

        Raises RemoteMemoryError for a region without an fd, MemoryAccessError
        for a write view of a read-only region.
        """
        piece = self.piece(gpa, length, write)
        if isinstance(piece, RemoteRange):
            raise RemoteMemoryError(gpa, length)
        return piece

    def piece(self, gpa: int, length: int, write: bool = True) -> Piece:
        """``length`` bytes at ``gpa`` inside one region: a view, or a RemoteRange."""
        r = self._region(gpa, length)
        if write and not r.writable:
            raise MemoryAccessError(gpa, length, problem="is in read-only memory")
        if r.view is None:
            return RemoteRange(self, gpa, length)
        off = gpa - r.gpa
        return r.view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copies ``length`` bytes from ``gpa``."""
        r = self._region(gpa, length)  # view(), inlined: the virtqueues' hot path
        view = r.view
        if view is None:
            raise RemoteMemoryError(gpa, length)
        off = gpa - r.spec.gpa
        return bytes(view[off:off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to ``gpa``."""
        length = len(data)
        r = self._region(gpa, length)  # view(), inlined: the virtqueues' hot path
        if not r.writable:
            raise MemoryAccessError(gpa, length, problem="is in read-only memory")
        view = r.view
        if view is None:
            raise RemoteMemoryError(gpa, length)
        off = gpa - r.spec.gpa
        view[off:off + length] = data

    def uaddr_to_gpa(self, uaddr: int, length: int = 1) -> int:
        """Converts a frontend virtual address (vhost-user ring addresses) to a gpa."""
        for r in self._regions:
            s = r.spec
            if s.uaddr <= uaddr and uaddr + length <= s.uaddr + s.size:
                return uaddr - s.uaddr + s.gpa
        raise MemoryAccessError(uaddr, length, "frontend virtual address")
