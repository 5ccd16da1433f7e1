"""VMSAv8-64 translation tables: a library of its own, usable without the rest of pviommu.

Stage-1 and stage-2 descriptors with 4 KiB, 16 KiB and 64 KiB granules, as
real little-endian 64-bit descriptors in a caller-supplied memory. A
:class:`Builder` maps, unmaps and changes permissions (splitting and merging
blocks); a :class:`Walker` translates an input address or raises the exact
:class:`VmsaFault`. See docs/ARCHITECTURE.md, "VMSAv8-64 tables".
"""

from .builder import Builder, Mapping
from .config import OA_SIZES, PS_BITS, Granule, LevelInfo, VmsaConfig
from .faults import Access, FaultKind, Perm, VmsaFault
from .memory import (
    BufferMemory,
    PoolAllocator,
    TableAccessError,
    TableAllocator,
    TableMemory,
    TablePoolExhausted,
)
from .walker import Walk, Walker

__all__ = [
    "OA_SIZES", "PS_BITS", "Access", "Builder", "BufferMemory", "FaultKind", "Granule",
    "LevelInfo", "Mapping", "Perm", "PoolAllocator", "TableAccessError", "TableAllocator",
    "TableMemory", "TablePoolExhausted", "VmsaConfig", "VmsaFault", "Walk", "Walker",
]
