"""The table walk: real descriptors in, an output address or the exact fault out.

Order of checks, as in the Arm ARM's walk: input address range (Translation
fault, level 0); per level an invalid descriptor or a block where the granule
allows none (Translation fault at that level), a table address above the OAS
(Address size fault at the table descriptor's level); at the leaf an output
address above the OAS (Address size), AF=0 (Access flag), then the
permission check (Permission). QEMU's SMMUv3 checks the leaf's output size
after the permission; this walker follows the Arm ARM.
"""

from __future__ import annotations

from typing import NamedTuple

from .config import VmsaConfig
from .descriptors import AF, ATTRS_MASK, OA_FIELD_MASK, s1_permissions, s2_permissions
from .faults import Access, FaultKind, Perm, VmsaFault
from .memory import TableMemory

_ADDR_48 = (1 << 48) - 1


class Walk(NamedTuple):
    """A successful walk."""

    oa: int  # output address of the input address walked
    perms: Perm  # effective permissions (stage 1: for the privilege walked with)
    level: int  # level of the leaf descriptor
    block_size: int  # bytes the leaf maps (page or block size)
    attrs: int  # the leaf's attribute bits (descriptor & ATTRS_MASK)




_new_walk = tuple.__new__  # builds a Walk without NamedTuple's keyword-handling __new__


def _with_denied(perms: Perm) -> tuple[Perm, int]:
    # The plain-int complement keeps the hot path off IntFlag arithmetic.
    return perms, 7 & ~int(perms)


# Stage-1 (permissions, denied accesses) by AP[2:1], PXN, UXN, APTable,
# PXNTable/UXNTable and privilege: the index is built from the bits in walk().
_S1_PERMS = tuple(
    _with_denied(s1_permissions(((i & 3) << 6) | ((i >> 2) & 3) << 53,
                                ((i >> 4) & 3) << 61 | ((i >> 6) & 3) << 59, bool(i >> 8)))
    for i in range(512))
_S2_PERMS = tuple(_with_denied(s2_permissions(((i & 3) << 6) | ((i >> 2) & 1) << 54))
                  for i in range(8))


class Walker:
    """Walks the tables rooted at ``root`` (TTB0 / VTTBR BADDR) in ``memory``."""

    def __init__(self, config: VmsaConfig, memory: TableMemory, root: int) -> None:
        if root % config.root_size:
            raise ValueError(f"table base {root:#x} is not aligned to {config.root_size:#x}")
        self.config = config
        self.memory = memory
        self.root = root
        self._read = memory.read_u64
        self._stage = config.stage
        self._ias = config.ias
        self._ha = config.ha
        self._over_oas = OA_FIELD_MASK & ~((1 << config.oas) - 1)
        self._table_addr = _ADDR_48 & ~(config.granule.size - 1)
        # Per level: level, shift, index mask, leaf allowed, last level, OA mask of a leaf.
        self._steps = tuple(
            (lv.level, lv.shift, lv.index_mask, lv.leaf_ok, lv.level == 3,
             _ADDR_48 & ~(lv.size - 1))
            for lv in config.levels)

    def walk(self, ia: int, access: Access | None = None, *,
             privileged: bool = False) -> Walk:
        """Translate ``ia``; raise :class:`VmsaFault` if the tables refuse it.

        With ``access`` None no permission is checked (the caller caches
        ``perms``); the access flag still is.
        """
        if ia < 0 or ia >> self._ias:
            raise VmsaFault(FaultKind.F_TRANSLATION, 0, self._stage, ia, access, privileged)
        read = self._read
        over_oas = self._over_oas
        table = self.root
        table_bits = 0
        level = self._steps[0][0]
        try:
            for level, shift, mask, leaf_ok, last, oa_mask in self._steps:
                pa = table + (((ia >> shift) & mask) << 3)
                desc = read(pa)
                if not desc & 1:
                    break
                if desc & 2 and not last:
                    if desc & over_oas:
                        raise VmsaFault(FaultKind.F_ADDR_SIZE, level, self._stage, ia,
                                        access, privileged)
                    table = desc & self._table_addr
                    table_bits |= desc
                    continue
                if not leaf_ok or (last and not desc & 2):
                    break  # a block where none may be, or the reserved level-3 0b01
                if desc & over_oas:
                    raise VmsaFault(FaultKind.F_ADDR_SIZE, level, self._stage, ia, access,
                                    privileged)
                if not desc & AF:
                    if not self._ha:
                        raise VmsaFault(FaultKind.F_ACCESS, level, self._stage, ia, access,
                                        privileged)
                    desc |= AF
                    self.memory.write_u64(pa, desc)
                if self._stage == 1:
                    perms, denied = _S1_PERMS[((desc >> 6) & 3) | ((desc >> 51) & 0xC)
                                      | ((table_bits >> 57) & 0x30)
                                      | ((table_bits >> 53) & 0xC0)
                                      | (256 if privileged else 0)]
                else:
                    perms, denied = _S2_PERMS[((desc >> 6) & 3) | ((desc >> 52) & 4)]
                if access is not None and access & denied:
                    raise VmsaFault(FaultKind.F_PERMISSION, level, self._stage, ia, access,
                                    privileged)
                return _new_walk(Walk, ((desc & oa_mask) | (ia & ~oa_mask & _ADDR_48), perms,
                                        level, 1 << shift, desc & ATTRS_MASK))
        except LookupError:
            raise VmsaFault(FaultKind.F_WALK_EABT, level, self._stage, ia, access,
                            privileged) from None
        raise VmsaFault(FaultKind.F_TRANSLATION, level, self._stage, ia, access, privileged)
