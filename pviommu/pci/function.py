"""What a PCI transport (vfio-user) asks of a PCI function the backend emulates.

The transport speaks the wire protocol; the function owns config space, BARs
and interrupts. Region and IRQ indices are VFIO's (``linux/vfio.h``): BARs 0-5,
ROM 6, config 7, VGA 8; IRQs INTx 0, MSI 1, MSI-X 2, ERR 3, REQ 4.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class RegionIndex(enum.IntEnum):
    """VFIO PCI region indices."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_REGIONS = 9


class IrqIndex(enum.IntEnum):
    """VFIO PCI interrupt indices."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_IRQS = 5


@dataclass(frozen=True)
class RegionInfo:
    """One region: its size (0 = not implemented) and whether it can be read/written.

    ``memory`` is True for memory BARs, whose writes a client may post.
    """

    index: int
    size: int
    readable: bool = True
    writable: bool = True
    memory: bool = True


class PciAccessError(Exception):
    """A region access the function refuses (bad index, offset, size)."""


class PciFunction(Protocol):
    """A PCI function served over a PCI transport."""

    def regions(self) -> list[RegionInfo]:
        """Every region index 0..NUM_REGIONS-1, in order (size 0 where absent)."""
        ...

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes of region ``index`` at ``offset``; PciAccessError if not."""
        ...

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Writes ``data`` to region ``index`` at ``offset``; PciAccessError if refused."""
        ...

    def irq_count(self, index: int) -> int:
        """How many interrupts of kind ``index`` (IrqIndex) the function has (0: none)."""
        ...

    def set_irq_eventfds(self, index: int, start: int, fds: list[int | None]) -> None:
        """Interrupts ``start..start+len(fds)-1`` of kind ``index`` signal these eventfds.

        ``None`` de-assigns that interrupt. The function owns the fds from now
        on (it closes the ones it replaces, and all of them on disable/close);
        ValueError (the fds then closed) if the range does not exist.
        """
        ...

    def disable_irqs(self, index: int) -> None:
        """Drops (and closes) every eventfd of interrupt kind ``index``."""
        ...

    def reset(self) -> None:
        """A function-level reset (vfio-user DEVICE_RESET); DMA mappings stay."""
        ...

    def disconnect(self) -> None:
        """The client went away: reset, and close every eventfd."""
        ...
