"""The generic type-0 PCI configuration space: header, BARs, command, capabilities."""

from __future__ import annotations

import struct

import pytest

from pviommu.pci.config import (
    CAP_ID_MSIX,
    CAP_ID_VNDR,
    CONFIG_SIZE,
    Bar,
    ConfigSpace,
    PciIds,
)
from pviommu.pci.function import PciAccessError

IDS = PciIds(vendor=0x1AF4, device=0x1042, revision=1, class_code=0x010000,
             subsystem_vendor=0x1AF4, subsystem_id=0x1100)


def space(bars: list[Bar] | None = None) -> ConfigSpace:
    if bars is None:
        bars = [Bar(1, 0x1000), Bar(4, 0x4000, mem64=True, prefetchable=True)]
    return ConfigSpace(IDS, bars)


def u(cfg: ConfigSpace, offset: int, size: int) -> int:
    return int.from_bytes(cfg.read(offset, size), "little")


def test_header_identity_and_type():
    cfg = space()
    assert u(cfg, 0x00, 2) == 0x1AF4
    assert u(cfg, 0x02, 2) == 0x1042
    assert u(cfg, 0x08, 4) == 0x01000001  # revision 1, prog-if 0, subclass 0, class 1
    assert u(cfg, 0x0E, 1) == 0  # header type 0, single function
    assert u(cfg, 0x2C, 2) == 0x1AF4
    assert u(cfg, 0x2E, 2) == 0x1100
    assert u(cfg, 0x3D, 1) == 0  # interrupt pin: none
    assert u(cfg, 0x04, 2) == 0
    assert u(cfg, 0x06, 2) == 0  # no capability yet: no CAP_LIST
    assert cfg.capabilities() == []


def test_bar_type_bits_and_writes_ignored():
    cfg = space()
    assert [u(cfg, 0x10 + 4 * i, 4) for i in range(6)] == [0, 0, 0, 0, 0xC, 0]
    for i in range(6):  # QEMU writes 0 to every BAR after a reset; sizing writes all-ones
        cfg.write(0x10 + 4 * i, bytes(4))
        cfg.write(0x10 + 4 * i, b"\xff" * 4)
    assert [u(cfg, 0x10 + 4 * i, 4) for i in range(6)] == [0, 0, 0, 0, 0xC, 0]
    assert cfg.bar_size(1) == 0x1000
    assert cfg.bar_size(4) == 0x4000
    assert [cfg.bar_size(i) for i in (0, 2, 3, 5)] == [0, 0, 0, 0]


@pytest.mark.parametrize("kwargs", [
    dict(index=1, size=0x1800),            # not a power of 2
    dict(index=1, size=8),                 # below the 16-byte minimum
    dict(index=5, size=0x1000, mem64=True),  # no upper half left
    dict(index=6, size=0x1000),
    dict(index=-1, size=0x1000),
])
def test_bar_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        Bar(**kwargs)


def test_overlapping_bars_rejected():
    with pytest.raises(ValueError):
        space([Bar(0, 0x1000, mem64=True), Bar(1, 0x1000)])


def test_rom_bar_reads_zero_after_sizing():
    cfg = space()
    assert u(cfg, 0x30, 4) == 0
    cfg.write(0x30, struct.pack("<I", 0xFFFFF800))  # QEMU's ROM sizing
    assert u(cfg, 0x30, 4) == 0


def test_command_writable_bits_and_reset():
    cfg = space()
    cfg.write(0x04, struct.pack("<H", 0xFFFF))
    # memory, master, parity, SERR, INTx disable; I/O stays 0 (there is no I/O BAR)
    assert cfg.command == 0x0546
    cfg.write(0x04, struct.pack("<H", 0x0006))
    assert cfg.command == 0x0006
    cfg.write(0x0C, b"\x10")   # cache line size: scratch
    cfg.write(0x3C, b"\x2a")   # interrupt line: scratch
    cfg.write(0x3D, b"\x01")   # interrupt pin: read-only
    cfg.write(0x00, b"\0\0\0\0")  # IDs: read-only
    assert (u(cfg, 0x0C, 1), u(cfg, 0x3C, 1), u(cfg, 0x3D, 1)) == (0x10, 0x2A, 0)
    assert u(cfg, 0x00, 4) == 0x10421AF4
    cfg.reset()
    assert cfg.command == 0
    assert (u(cfg, 0x0C, 1), u(cfg, 0x3C, 1)) == (0, 0)


def test_status_is_read_only():
    cfg = space()
    cfg.add_capability(CAP_ID_VNDR, bytes(2))
    cfg.write(0x06, b"\xff\xff")
    assert u(cfg, 0x06, 2) == 0x0010


def test_capability_chain_and_write_masks():
    cfg = space()
    first = cfg.add_capability(CAP_ID_MSIX, struct.pack("<HII", 1, 1, 0x801),
                               struct.pack("<HII", 0xC000, 0, 0))
    second = cfg.add_capability(CAP_ID_VNDR, bytes(3), b"\x00\xff\x00")  # 5 bytes
    third = cfg.add_capability(CAP_ID_VNDR, bytes(2))
    assert (first, second, third) == (0x40, 0x4C, 0x54)  # dword-aligned
    assert u(cfg, 0x34, 1) == 0x40
    assert u(cfg, 0x06, 2) & 0x10
    assert cfg.capabilities() == [(0x40, CAP_ID_MSIX), (0x4C, CAP_ID_VNDR), (0x54, CAP_ID_VNDR)]
    assert u(cfg, 0x41, 1) == 0x4C and u(cfg, 0x4D, 1) == 0x54 and u(cfg, 0x55, 1) == 0
    cfg.write(0x42, b"\xff\xff")  # MSI-X: only enable and function mask are writable
    assert u(cfg, 0x42, 2) == 0xC001
    cfg.write(0x4C, b"\x99\x99\x99\x99\x99")  # ID and next are read-only, one byte writable
    assert cfg.read(0x4C, 5) == bytes([CAP_ID_VNDR, 0x54, 0, 0x99, 0])
    cfg.reset()
    assert u(cfg, 0x42, 2) == 0x0001
    assert u(cfg, 0x4F, 1) == 0


def test_capability_must_fit():
    cfg = space()
    with pytest.raises(ValueError):
        cfg.add_capability(CAP_ID_VNDR, bytes(CONFIG_SIZE - 0x40 - 1))
    with pytest.raises(ValueError):
        cfg.add_capability(CAP_ID_VNDR, bytes(4), bytes(3))


def test_reads_at_any_width_and_whole_space():
    cfg = space()
    cfg.add_capability(CAP_ID_VNDR, bytes(range(1, 15)))
    whole = cfg.read(0, CONFIG_SIZE)
    assert len(whole) == CONFIG_SIZE
    for size in (1, 2, 4):
        for offset in range(0, CONFIG_SIZE - size + 1):
            assert cfg.read(offset, size) == whole[offset:offset + size]


@pytest.mark.parametrize(("offset", "size"), [(-1, 1), (0, 0), (255, 2), (256, 1), (0, 257)])
def test_out_of_range_is_pci_access_error(offset, size):
    cfg = space()
    with pytest.raises(PciAccessError):
        cfg.read(offset, size)
    with pytest.raises(PciAccessError):
        cfg.write(offset, bytes(max(size, 0)))
