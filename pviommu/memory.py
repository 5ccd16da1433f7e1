"""Guest memory: regions mmapped from the frontend's fds, every access bounds-checked.

The guest is untrusted: any address it hands us is checked against the regions
before it is touched, and an address outside every region raises
:class:`MemoryAccessError`, never a crash.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


class MemoryAccessError(Exception):
    """An access that falls outside every guest memory region."""

    def __init__(self, address: int, length: int, what: str = "guest address") -> None:
        super().__init__(f"{what} range {address:#x}+{length:#x} is outside guest memory")
        self.address = address
        self.length = length


@dataclass(frozen=True)
class RegionSpec:
    """A region as the frontend describes it (vhost-user memory region layout)."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int


class Region:
    """One mapped region: ``size`` bytes of the fd at ``mmap_offset``, seen at ``gpa``."""

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        if spec.size <= 0:
            raise ValueError(f"memory region at {spec.gpa:#x} has size {spec.size}")
        if spec.gpa + spec.size > 1 << 64 or spec.uaddr + spec.size > 1 << 64:
            raise ValueError(f"memory region at {spec.gpa:#x} wraps the address space")
        self.spec = spec
        page_off = spec.mmap_offset % mmap.PAGESIZE
        self._mmap = mmap.mmap(fd, spec.size + page_off, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE,
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
        return self.spec.gpa + self.spec.size

    def close(self) -> None:
        """Unmaps the region; views still held elsewhere keep it alive until released."""
        self.view.release()
        self._base.release()
        try:
            self._mmap.close()
        except BufferError:
            log.debug("region %#x still has views; unmapped when they go", self.gpa)


class GuestMemory:
    """The guest's memory regions, looked up by guest-physical or frontend-virtual address."""

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []

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
                new.append(Region(spec, fd))
            new.sort(key=lambda r: r.gpa)
            for a, b in zip(new, new[1:], strict=False):
                if a.end > b.gpa:
                    raise ValueError(f"memory regions {a.gpa:#x} and {b.gpa:#x} overlap")
        except (ValueError, OSError) as e:
            for r in new:
                r.close()
            raise ValueError(f"cannot map guest memory: {e}") from e
        finally:
            for fd in fds:
                os.close(fd)
        self.clear()
        self._regions = new
        self._starts = [r.gpa for r in new]

    def clear(self) -> None:
        """Unmaps every region."""
        for r in self._regions:
            r.close()
        self._regions = []
        self._starts = []

    def _region(self, gpa: int, length: int) -> Region:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self._regions[i]
            if gpa + length <= r.end:
                return r
        raise MemoryAccessError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa+length)`` lies inside one region."""
        try:
            self._region(gpa, length)
        except MemoryAccessError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of ``length`` bytes at ``gpa``, inside one region."""
        r = self._region(gpa, length)
        off = gpa - r.gpa
        return r.view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copies ``length`` bytes from ``gpa``."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` to ``gpa``."""
        self.view(gpa, len(data))[:] = data

    def uaddr_to_gpa(self, uaddr: int, length: int = 1) -> int:
        """Converts a frontend virtual address (vhost-user ring addresses) to a gpa."""
        for r in self._regions:
            s = r.spec
            if s.uaddr <= uaddr and uaddr + length <= s.uaddr + s.size:
                return uaddr - s.uaddr + s.gpa
        raise MemoryAccessError(uaddr, length, "frontend virtual address")
