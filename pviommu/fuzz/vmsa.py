"""The VMSAv8-64 table walker on random tables, against a reference walk.

The input picks a regime (stage 1 or 2; 4K, 16K or 64K granule; input and output
address sizes; SL0; hardware Access flag update) and writes descriptors anywhere in
256 KiB of table memory (those with bit 55, a software bit, set get an address
inside that memory, so walks go deep; the others point anywhere). Then it walks
input addresses with each access and privilege.

The reference is a plain walk written from the Arm ARM (D8.2, D8.3, D8.4): the
Translation fault of an address above the input size at level 0; per level an
external abort on a descriptor outside memory, a Translation fault for an invalid
descriptor, a block where the granule allows none or the reserved level-3
encoding, an Address size fault for a table or output address above the output
size; then the Access flag (set in memory with hardware update) and the
permission. Checks: the walker and the reference give the same translation
(output address, permissions, level, block size, attributes) or the same fault
(kind, level, stage), and leave the table memory the same.
"""

from __future__ import annotations

import struct

from ..vmsa.config import OA_SIZES, Granule, VmsaConfig
from ..vmsa.descriptors import AF, ATTRS_MASK, s1_permissions, s2_permissions
from ..vmsa.faults import Access, FaultKind, Perm, VmsaFault
from ..vmsa.memory import BufferMemory, TableAccessError
from ..vmsa.walker import Walker
from .common import Bytes, check

MEM_SIZE = 1 << 18
ADDR_48 = (1 << 48) - 1
RELOCATE = 1 << 55
_U64 = struct.Struct("<Q")


def reference_walk(cfg: VmsaConfig, mem: BufferMemory, root: int, ia: int,
                   access: Access | None, privileged: bool
                   ) -> tuple[int, Perm, int, int, int] | tuple[FaultKind, int, int]:
    """(oa, perms, level, block size, attrs), or (fault kind, level, stage)."""
    g = cfg.granule.value
    stride = g - 3
    if ia < 0 or ia >= 1 << cfg.ias:
        return FaultKind.F_TRANSLATION, 0, cfg.stage
    table, table_bits = root, 0
    above_oas = ((1 << 50) - 1) & ~((1 << cfg.oas) - 1)
    for level in range(cfg.start_level, 4):
        shift = g + (3 - level) * stride
        bits = cfg.ias - shift if level == cfg.start_level else stride
        pa = table + 8 * ((ia >> shift) & ((1 << bits) - 1))
        try:
            desc = mem.read_u64(pa)
        except TableAccessError:
            return FaultKind.F_WALK_EABT, level, cfg.stage
        if not desc & 1:
            return FaultKind.F_TRANSLATION, level, cfg.stage
        if level < 3 and desc & 2:
            if desc & above_oas:
                return FaultKind.F_ADDR_SIZE, level, cfg.stage
            table = desc & ADDR_48 & ~((1 << g) - 1)
            table_bits |= desc
            continue
        if level == 3 and not desc & 2:
            return FaultKind.F_TRANSLATION, level, cfg.stage
        if level < 3 and level not in cfg.granule.block_levels:
            return FaultKind.F_TRANSLATION, level, cfg.stage
        if desc & above_oas:
            return FaultKind.F_ADDR_SIZE, level, cfg.stage
        if not desc & AF:
            if not cfg.ha:
                return FaultKind.F_ACCESS, level, cfg.stage
            desc |= AF
            mem.write_u64(pa, desc)
        perms = s1_permissions(desc, table_bits, privileged) if cfg.stage == 1 \
            else s2_permissions(desc)
        if access is not None and not perms & Perm(access.value):
            return FaultKind.F_PERMISSION, level, cfg.stage
        size = 1 << shift
        return ((desc & ADDR_48 & ~(size - 1)) | (ia & (size - 1)), perms, level, size,
                desc & ATTRS_MASK)
    raise AssertionError("a walk without a leaf")


def _config(inp: Bytes) -> VmsaConfig | None:
    mode = inp.u8()
    stage = 1 + (mode & 1)
    granule = (Granule.G4K, Granule.G16K, Granule.G64K, Granule.G4K)[(mode >> 1) & 3]
    ias = 25 + inp.u8() % 24
    oas = OA_SIZES[inp.u8() % len(OA_SIZES)]
    sl0 = None if stage == 1 or mode & 8 else (mode >> 4) % 3
    try:
        return VmsaConfig(stage, granule, ias, oas, sl0=sl0, ha=bool(mode & 0x80))
    except ValueError:
        return None


def one_input(data: bytes) -> None:
    """Builds the tables ``data`` describes and compares walks with the reference."""
    inp = Bytes(data)
    cfg = _config(inp)
    if cfg is None:
        return
    mem = BufferMemory(MEM_SIZE)
    for _ in range(inp.u8() % 64):
        index, word = inp.u16() % (MEM_SIZE // 8), inp.u64()
        if word & RELOCATE:
            word = (word & ~ADDR_48) | ((word & ADDR_48) % MEM_SIZE & ~0xFFF)
        mem.write_u64(8 * index, word)
    walker = Walker(cfg, mem, 0)
    for _ in range(inp.u8() % 16 + 1):
        raw = inp.u64()
        ia = raw % (1 << cfg.ias) if raw & 1 else raw >> 1
        sel = inp.u8()
        access = (None, Access.READ, Access.WRITE, Access.EXEC)[sel & 3]
        privileged = bool(sel & 4)
        ref_mem = BufferMemory(MEM_SIZE)
        ref_mem.buffer[:] = mem.buffer
        expected = reference_walk(cfg, ref_mem, 0, ia, access, privileged)
        got: tuple[int, Perm, int, int, int] | tuple[FaultKind, int, int]
        try:
            walk = walker.walk(ia, access, privileged=privileged)
            got = (walk.oa, walk.perms, walk.level, walk.block_size, walk.attrs)
        except VmsaFault as fault:
            got = (fault.kind, fault.level, fault.stage)
            check(fault.ia == ia and fault.access == access, f"fault {fault!r} for {ia:#x}")
        check(got == expected, f"{cfg} walk of {ia:#x} ({access}, privileged {privileged}) "
                               f"gave {got}, the reference {expected}")
        check(mem.buffer == ref_mem.buffer, "the walk left the tables other than the reference")
