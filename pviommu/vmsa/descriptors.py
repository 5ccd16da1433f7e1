"""VMSAv8-64 translation table descriptors: the bits, by their Arm ARM names.

A descriptor is a plain ``int`` (64 bits, stored little-endian). Levels 0-2
hold table or block descriptors, level 3 page descriptors. The attribute
helpers build the attribute bits of a block or page descriptor (everything
but the type bits [1:0] and the output address); a leaf is
``output_address | attrs | leaf type``.

Not modelled: 52-bit addresses (FEAT_LPA/LPA2: bits [15:12] or [9:8] as
OA[51:48]); the walker treats bits [49:48] (OA[49:48] under FEAT_LPA2) as
address bits above a 48-bit OAS, so a non-zero value there is an Address
size fault; bits [51:50] are attributes (DBM, GP) in leaves, ignored in tables. FEAT_XNX (stage 2
XN[1:0]) is simplified to XN, bit 54; bit 53 is ignored at stage 2.
"""

from __future__ import annotations

from .faults import Perm

# Descriptor type, bits [1:0].
VALID = 1 << 0
TYPE_MASK = 0b11
TYPE_BLOCK = 0b01  # levels 0-2; at level 3 this encoding is reserved (invalid)
TYPE_TABLE = 0b11  # levels 0-2
TYPE_PAGE = 0b11  # level 3

# Output address / next-level table address, bits [47:12] (granule-aligned).
ADDR_MASK = ((1 << 48) - 1) & ~0xFFF
# Bits [49:0]: what the walker checks against the output address size.
OA_FIELD_MASK = (1 << 50) - 1

# Lower attributes of block and page descriptors, bits [11:2].
ATTRINDX_SHIFT = 2  # stage 1: AttrIndx[2:0], bits [4:2]
ATTRINDX_MASK = 0b111 << ATTRINDX_SHIFT
MEMATTR_SHIFT = 2  # stage 2: MemAttr[3:0], bits [5:2]
MEMATTR_MASK = 0b1111 << MEMATTR_SHIFT
MEMATTR_NORMAL_WB = 0b1111  # Normal, Outer and Inner Write-Back Cacheable
NS = 1 << 5  # stage 1
AP_SHIFT = 6  # stage 1: AP[2:1], bits [7:6]
AP_MASK = 0b11 << AP_SHIFT
S2AP_SHIFT = 6  # stage 2: S2AP[1:0], bits [7:6]
S2AP_MASK = 0b11 << S2AP_SHIFT
S2AP_R = 1 << 6
S2AP_W = 1 << 7
SH_SHIFT = 8
SH_MASK = 0b11 << SH_SHIFT
SH_NON = 0b00
SH_OUTER = 0b10
SH_INNER = 0b11
AF = 1 << 10
NG = 1 << 11  # stage 1

# Upper attributes of block and page descriptors, bits [63:50].
DBM = 1 << 51
CONTIGUOUS = 1 << 52  # a TLB hint; neither set by the builder nor used by the walker
PXN = 1 << 53  # stage 1
UXN = 1 << 54  # stage 1 (XN at EL2)
XN = 1 << 54  # stage 2 (XN[1] of XN[1:0]; see the module docstring)

# Attribute bits of a block or page descriptor: [11:2] and [63:50].
ATTRS_MASK = (0x3FF << 2) | (0x3FFF << 50)

# Hierarchical attributes of stage-1 table descriptors (RES0 at stage 2).
PXNTABLE = 1 << 59
UXNTABLE = 1 << 60
APTABLE_SHIFT = 61  # APTable[1:0], bits [62:61]
APTABLE_MASK = 0b11 << APTABLE_SHIFT
NSTABLE = 1 << 63

# Stage-1 AP[2:1] encodings (EL1&0 regime): AP[2] is read-only, AP[1] is EL0 access.
AP_RW_EL1 = 0b00  # EL1 read/write, EL0 none
AP_RW = 0b01  # EL1 and EL0 read/write
AP_RO_EL1 = 0b10  # EL1 read-only, EL0 none
AP_RO = 0b11  # EL1 and EL0 read-only

# The bits protect() replaces at each stage.
S1_PERM_MASK = AP_MASK | PXN | UXN
S2_PERM_MASK = S2AP_MASK | XN


def s1_attrs(*, ap: int = AP_RW, uxn: bool = False, pxn: bool = False, attr_indx: int = 0,
             sh: int = SH_INNER, af: bool = True, ng: bool = False, ns: bool = False) -> int:
    """Attribute bits of a stage-1 block or page descriptor."""
    if not 0 <= ap <= 3 or not 0 <= attr_indx <= 7 or not 0 <= sh <= 3:
        raise ValueError(f"bad stage-1 attribute field: ap={ap} attr_indx={attr_indx} sh={sh}")
    return ((attr_indx << ATTRINDX_SHIFT) | (ap << AP_SHIFT) | (sh << SH_SHIFT)
            | (AF if af else 0) | (NG if ng else 0) | (NS if ns else 0)
            | (UXN if uxn else 0) | (PXN if pxn else 0))


def s1_perm_bits(*, ap: int = AP_RW, uxn: bool = False, pxn: bool = False) -> int:
    """The stage-1 permission bits alone (for :meth:`Builder.protect`)."""
    return s1_attrs(ap=ap, uxn=uxn, pxn=pxn, sh=0, af=False) & S1_PERM_MASK


def s2_attrs(perm: Perm, *, memattr: int = MEMATTR_NORMAL_WB, sh: int = SH_INNER,
             af: bool = True) -> int:
    """Attribute bits of a stage-2 block or page descriptor granting ``perm``."""
    if not 0 <= memattr <= 15 or not 0 <= sh <= 3:
        raise ValueError(f"bad stage-2 attribute field: memattr={memattr} sh={sh}")
    return ((memattr << MEMATTR_SHIFT) | (sh << SH_SHIFT) | (AF if af else 0)
            | s2_perm_bits(perm))


def s2_perm_bits(perm: Perm) -> int:
    """The stage-2 permission bits (S2AP, XN) granting ``perm``."""
    return ((S2AP_R if perm & Perm.R else 0) | (S2AP_W if perm & Perm.W else 0)
            | (0 if perm & Perm.X else XN))


def s1_permissions(desc: int, table_bits: int = 0, privileged: bool = False) -> Perm:
    """Effective stage-1 permissions of a leaf, after its tables' APTable/XNTable.

    EL1&0 regime with two privilege levels, no PAN, no WXN: memory writable
    at EL0 is never executable at EL1 (the Arm ARM's implicit PXN).
    """
    ap2 = bool(desc & (1 << 7)) or bool(table_bits & (1 << 62))  # APTable[1]: no write
    ap1 = bool(desc & (1 << 6)) and not table_bits & (1 << 61)  # APTable[0]: no EL0
    uxn = bool(desc & UXN) or bool(table_bits & UXNTABLE)
    pxn = bool(desc & PXN) or bool(table_bits & PXNTABLE)
    user_w = ap1 and not ap2
    if privileged:
        r, w, x = True, not ap2, not (pxn or user_w)
    else:
        r, w, x = ap1, user_w, not uxn
    return (Perm.R if r else Perm.NONE) | (Perm.W if w else Perm.NONE) | (
        Perm.X if x else Perm.NONE)


def s2_permissions(desc: int) -> Perm:
    """Effective stage-2 permissions of a leaf: S2AP and XN."""
    return ((Perm.R if desc & S2AP_R else Perm.NONE) | (Perm.W if desc & S2AP_W else Perm.NONE)
            | (Perm.NONE if desc & XN else Perm.X))
