"""Type-0 PCI configuration space (conventional PCI, 256 bytes) as a register file.

The space is a byte image plus a per-byte mask of the bits the driver may
write; everything else is read-only and a write to it is ignored (logged at
debug level). BAR registers only carry their type bits, because the client
(QEMU's vfio-user-pci) emulates the address part; the expansion ROM BAR reads
0, which means "no ROM". Capabilities are chained from 0x40 on.

Offsets and bit values are those of ``linux/pci_regs.h``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .function import PciAccessError

log = logging.getLogger(__name__)

CONFIG_SIZE = 256

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_PARITY = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400

STATUS_CAP_LIST = 0x0010

BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

CAP_ID_VNDR = 0x09
CAP_ID_MSIX = 0x11
FIRST_CAPABILITY = 0x40
NUM_BARS = 6


@dataclass(frozen=True)
class Bar:
    """A memory BAR: its index, size (a power of 2) and type."""

    index: int
    size: int
    mem64: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        last = NUM_BARS - 2 if self.mem64 else NUM_BARS - 1
        if not 0 <= self.index <= last:
            raise ValueError(f"BAR index {self.index} invalid (64-bit: {self.mem64})")
        # QEMU asserts on a BAR size that is not a power of 2; memory BARs are >= 16 bytes.
        if self.size < 16 or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index} size {self.size:#x} is not a power of 2 >= 16")

    @property
    def type_bits(self) -> int:
        """The low bits of the BAR register: memory space, 32/64-bit, prefetchable."""
        return (BAR_MEM_TYPE_64 if self.mem64 else 0) | (BAR_MEM_PREFETCH if self.prefetchable
                                                         else 0)


@dataclass(frozen=True)
class PciIds:
    """What identifies a function: IDs, revision, 24-bit class code (class, subclass, prog-if)."""

    vendor: int
    device: int
    revision: int
    class_code: int
    subsystem_vendor: int
    subsystem_id: int


class ConfigSpace:
    """A 256-byte type-0 configuration space.

    Writable after construction: command (memory, bus master, parity, SERR,
    INTx disable; I/O space stays 0 as there is no I/O BAR), cache line size,
    interrupt line, and whatever capability bytes :meth:`add_capability`
    declares writable. :meth:`reset` brings all of them back to their initial
    values.
    """

    def __init__(self, ids: PciIds, bars: Sequence[Bar], interrupt_pin: int = 0) -> None:
        self._data = bytearray(CONFIG_SIZE)
        self._wmask = bytearray(CONFIG_SIZE)
        self.bars: dict[int, Bar] = {}
        self._put(VENDOR_ID, ids.vendor.to_bytes(2, "little"))
        self._put(DEVICE_ID, ids.device.to_bytes(2, "little"))
        self._put(REVISION_ID, bytes([ids.revision]))
        self._put(CLASS_PROG, ids.class_code.to_bytes(3, "little"))
        self._put(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor.to_bytes(2, "little"))
        self._put(SUBSYSTEM_ID, ids.subsystem_id.to_bytes(2, "little"))
        self._put(INTERRUPT_PIN, bytes([interrupt_pin]))
        command_mask = (COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR
                        | COMMAND_INTX_DISABLE)
        self._wmask[COMMAND:COMMAND + 2] = command_mask.to_bytes(2, "little")
        self._wmask[CACHE_LINE_SIZE] = 0xFF
        self._wmask[INTERRUPT_LINE] = 0xFF
        for bar in bars:
            used = {bar.index, bar.index + 1} if bar.mem64 else {bar.index}
            if used & self._bar_slots():
                raise ValueError(f"BAR{bar.index} overlaps another BAR")
            self.bars[bar.index] = bar
            self._put(BAR0 + 4 * bar.index, bar.type_bits.to_bytes(4, "little"))
        self._last_cap = 0
        self._next_cap = FIRST_CAPABILITY
        self._initial = bytes(self._data)

    def _bar_slots(self) -> set[int]:
        slots = set()
        for bar in self.bars.values():
            slots.add(bar.index)
            if bar.mem64:
                slots.add(bar.index + 1)
        return slots

    def _put(self, offset: int, data: bytes) -> None:
        self._data[offset:offset + len(data)] = data

    def bar_size(self, index: int) -> int:
        """The size of BAR ``index`` (0 when absent or the upper half of a 64-bit BAR)."""
        bar = self.bars.get(index)
        return bar.size if bar is not None else 0

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Appends a capability (ID, next pointer, then ``body``) and returns its offset.

        ``writable`` is the driver-writable bit mask of ``body`` (default: none).
        Capabilities are dword-aligned and chained in the order they are added.
        """
        offset = self._next_cap
        end = offset + 2 + len(body)
        if end > CONFIG_SIZE:
            raise ValueError(f"capability {cap_id:#x} does not fit in config space")
        if writable is not None and len(writable) != len(body):
            raise ValueError("capability write mask and body differ in length")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        self._put(offset + 2, body)
        if writable is not None:
            self._wmask[offset + 2:end] = writable
        if self._last_cap:
            self._data[self._last_cap + 1] = offset
        else:
            self._data[CAPABILITY_LIST] = offset
            self._put(STATUS, STATUS_CAP_LIST.to_bytes(2, "little"))
        self._last_cap = offset
        self._next_cap = (end + 3) & ~3
        self._initial = bytes(self._data)
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """The (offset, capability ID) chain as a driver walks it."""
        caps: list[tuple[int, int]] = []
        offset = self._data[CAPABILITY_LIST] if self.status & STATUS_CAP_LIST else 0
        while offset and len(caps) < CONFIG_SIZE // 4:
            caps.append((offset, self._data[offset]))
            offset = self._data[offset + 1]
        return caps

    def _check(self, offset: int, size: int) -> None:
        if size <= 0 or offset < 0 or offset + size > CONFIG_SIZE:
            raise PciAccessError(f"config access {offset:#x}+{size} outside {CONFIG_SIZE} bytes")

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (any width; PciAccessError outside the space)."""
        self._check(offset, size)
        return bytes(self._data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """A driver write: only writable bits change, the rest is ignored."""
        self._check(offset, len(data))
        ignored = False
        for i, value in enumerate(data):
            pos = offset + i
            mask = self._wmask[pos]
            old = self._data[pos]
            self._data[pos] = (old & ~mask) | (value & mask)
            ignored |= bool((old ^ value) & ~mask & 0xFF)
        if ignored:
            log.debug("config write %#x+%d (%s): read-only bits ignored", offset, len(data),
                      data.hex())

    def store(self, offset: int, data: bytes) -> None:
        """Sets bytes as the function (not the driver) sees fit, write mask or not."""
        self._check(offset, len(data))
        self._put(offset, data)

    def u8(self, offset: int) -> int:
        """The byte at ``offset``."""
        return self._data[offset]

    def u16(self, offset: int) -> int:
        """The little-endian 16-bit value at ``offset``."""
        return int.from_bytes(self._data[offset:offset + 2], "little")

    def u32(self, offset: int) -> int:
        """The little-endian 32-bit value at ``offset``."""
        return int.from_bytes(self._data[offset:offset + 4], "little")

    @property
    def command(self) -> int:
        """The command register."""
        return self.u16(COMMAND)

    @property
    def status(self) -> int:
        """The status register."""
        return self.u16(STATUS)

    def reset(self) -> None:
        """Every register back to its value after construction (command 0 included)."""
        self._data[:] = self._initial
