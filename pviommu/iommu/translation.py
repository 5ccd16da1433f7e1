"""The translation seam: what every IOMMU mode offers the DMA spaces and revocation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Revoked:
    """A range taken away from ``endpoint`` behind the guest's back: I/O virtual
    ``[virt_start, virt_end]`` (inclusive) that translated to ``phys_start`` in
    ``domain`` (the translation context it was removed from)."""

    endpoint: int
    domain: int
    virt_start: int
    virt_end: int
    phys_start: int

    @property
    def size(self) -> int:
        """The length of the range in bytes."""
        return self.virt_end - self.virt_start + 1
