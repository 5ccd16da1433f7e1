"""Guest RAM as QEMU's memory-backend-memfd creates it: a memfd sealed against resizing.

The micro-benchmark's clients make theirs the same way: one function serves both.
"""

from pviommu.microbench.guest import QEMU_SEALS, sealed_memfd

__all__ = ["QEMU_SEALS", "sealed_memfd"]
